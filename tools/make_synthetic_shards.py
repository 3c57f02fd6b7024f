"""Writes procedurally generated shapes scenes as WebDataset tar shards and/or JSONL (see
blip3o_jax/data/synthetic.py), and optionally the tiny test tokenizer.

  python tools/make_synthetic_shards.py --out /tmp/shapes --num-samples 2000 --samples-per-shard 500 \
      --image-size 64 --max-objects 1 --seed 0 [--tokenizer-out /tmp/shapes/tokenizer]
  --image-size 0 draws random 400-900 px sizes (--min-size/--max-size), like real photos.
A bad option (e.g. --num-samples 0) is one `error: ...` line with exit status 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip3o_jax.data import synthetic  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tok_out = None
    for k, arg in enumerate(argv):
        if arg == "--tokenizer-out" or arg.startswith("--tokenizer-out="):
            tok_out = arg.partition("=")[2] if "=" in arg else (argv[k + 1] if k + 1 < len(argv) else "")
            if not tok_out or tok_out.startswith("--"):
                print("error: --tokenizer-out expects a directory", file=sys.stderr)
                sys.exit(2)
            del argv[k : k + (1 if "=" in arg else 2)]
            break
    synthetic.main(argv)
    if tok_out:
        from blip3o_jax.data.tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer(tok_out)
        print(f"tokenizer with {len(tok)} tokens in {tok_out}")


if __name__ == "__main__":
    main()
