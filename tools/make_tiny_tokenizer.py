"""Builds the tiny Qwen-like test tokenizer offline (byte-level BPE on the synthetic captions + prompt words,
with the Qwen/BLIP3-o special tokens): `python tools/make_tiny_tokenizer.py --out DIR`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip3o_jax.data.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()
