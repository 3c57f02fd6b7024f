r"""Exports a training run in the released checkpoint's PyTorch layout: a shim for `blip3o_jax/export.py`.

    python tools/export_release.py --workdir DIR --out HF_DIR [--decoder DIR_OR_HUB_ID] [--base DIR_OR_HUB_ID]
"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from blip3o_jax.export import main  # noqa: E402

if __name__ == "__main__":
    main()
