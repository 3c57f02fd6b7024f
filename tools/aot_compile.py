"""Ahead-of-time TPU plans: a shim for `blip3o-plan` (the code is blip3o_jax/plan.py)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from blip3o_jax.plan import main  # noqa: E402

if __name__ == "__main__":
    main()
