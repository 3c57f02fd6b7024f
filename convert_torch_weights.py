"""Converts a PyTorch/transformers checkpoint directory into an Orbax params checkpoint for blip3o_jax.

    python convert_torch_weights.py --src HF_DIR --dst OUT_DIR [--kind K] [--dtype bfloat16] [--force]
                                    [--allow-pickle]

The model kind comes from config.json's `model_type` (qwen2, qwen3, qwen2_5_vl, ...) or from --kind (e.g.
--kind qwen2_5_vl_text takes only the language model out of a full Qwen2.5-VL checkpoint). OUT_DIR receives
`params/` (Orbax), a copy of config.json and the tokenizer files, and `blip3o_jax.json`; it is written to a
temporary directory beside it and renamed into place at the end, and an existing OUT_DIR is only replaced with
--force. Read it back with `blip3o_jax.load_pretrained(OUT_DIR)`.
"""
from __future__ import annotations

from absl import flags

from blip3o_jax import cli

_SRC = flags.DEFINE_string("src", None, "HF checkpoint directory (config.json + safetensors) or a weights file.")
_DST = flags.DEFINE_string("dst", None, "Output directory (must not exist unless --force).")
_KIND = flags.DEFINE_string("kind", None, "Model kind; default: from config.json model_type.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Store the params in this dtype.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --dst.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow reading .bin/.pt pickles (runs torch.load).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")
flags.register_validator("src", lambda v: v is not None, "--src is required")
flags.register_validator("dst", lambda v: v is not None, "--dst is required")


def _main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; use --src and --dst")
    from absl import logging

    from blip3o_jax import pretrained

    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    kind = pretrained.convert_checkpoint(
        _SRC.value, _DST.value, kind=_KIND.value, dtype=_DTYPE.value, force=_FORCE.value,
        allow_pickle=_ALLOW_PICKLE.value, progress=_PROGRESS.value,
    )
    print(f"wrote {kind} params to {_DST.value}")


def main():
    # absl spells the flag --allow_pickle; accept the dashed form documented above too
    import sys

    sys.argv = [a.replace("--allow-pickle", "--allow_pickle") if a.startswith("--allow-pickle") else a for a in sys.argv]
    cli.run(_main)


if __name__ == "__main__":
    main()
