"""Precomputed targets: a shim for `blip3o-precompute` (the code is blip3o_jax/precompute.py)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from blip3o_jax.precompute import main  # noqa: E402

if __name__ == "__main__":
    main()
