"""Writes procedurally generated shapes scenes as WebDataset tar shards and/or JSONL (see
blip3o_jax/data/synthetic.py), and optionally the tiny test tokenizer.

  python tools/make_synthetic_shards.py --out /tmp/shapes --num-samples 2000 --samples-per-shard 500 \
      --image-size 64 --max-objects 1 --seed 0 [--tokenizer-out /tmp/shapes/tokenizer]
  --image-size 0 draws random 400-900 px sizes (--min-size/--max-size), like real photos.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip3o_jax.data import synthetic  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tok_out = None
    if "--tokenizer-out" in argv:
        k = argv.index("--tokenizer-out")
        tok_out = argv[k + 1]
        del argv[k : k + 2]
    synthetic.main(argv)
    if tok_out:
        from blip3o_jax.data.tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer(tok_out)
        print(f"tokenizer with {len(tok)} tokens in {tok_out}")


if __name__ == "__main__":
    main()
