"""Converts a PyTorch/transformers checkpoint directory into an Orbax params checkpoint for blip3o_jax.

    python convert_torch_weights.py --src HF_DIR --dst OUT_DIR [--kind K] [--dtype bfloat16] [--force]
                                    [--allow-pickle] [--allow-nonfinite]

The model kind comes from config.json's `model_type` (qwen2, qwen3, qwen2_5_vl, ...) or from --kind (e.g.
--kind qwen2_5_vl_text takes only the language model out of a full Qwen2.5-VL checkpoint). OUT_DIR receives
`params/` (Orbax), a copy of config.json and the tokenizer files, and `blip3o_jax.json`; it is written to a
temporary directory beside it and renamed into place at the end, and an existing OUT_DIR is only replaced with
--force, and only when it is an earlier output of this tool; OUT_DIR may not overlap HF_DIR. Weights holding
NaN/Inf are refused unless --allow-nonfinite; integer/bool weights are refused. Read the output back with
`blip3o_jax.load_pretrained(OUT_DIR)`.

OUT_DIR may be a bucket (`--dst gs://BUCKET/name`): every file goes there (Orbax writes `params/` itself), written
in place since an object store cannot rename a directory: a hidden `.incomplete` marker first and `blip3o_jax.json`
last, so an interrupted output is never taken for a complete one and --force may replace it. HF_DIR is read from
local disk (or a gcsfuse mount).

Exit status: 0 on success (and for --help), 2 with one `error: ...` line for a bad flag or a bad checkpoint.
"""
from __future__ import annotations

from absl import flags

from blip3o_jax import cli

_SRC = flags.DEFINE_string("src", None, "HF checkpoint directory (config.json + safetensors) or a weights file.")
_DST = flags.DEFINE_string("dst", None, "Output directory (must not exist unless --force; must not overlap --src).")
_KIND = flags.DEFINE_string("kind", None, "Model kind; default: from config.json model_type.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Store the params in this dtype.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --dst that is an earlier output of this tool.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow reading .bin/.pt pickles (runs torch.load).")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False, "Convert weights holding NaN/Inf (with a warning).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")
flags.register_validator("src", lambda v: v is not None, "--src is required")
flags.register_validator("dst", lambda v: v is not None, "--dst is required")

# absl spells these with underscores; the dashed forms documented above are accepted too
_DASHED = {"--allow-pickle": "--allow_pickle", "--noallow-pickle": "--noallow_pickle",
           "--allow-nonfinite": "--allow_nonfinite", "--noallow-nonfinite": "--noallow_nonfinite"}
_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; use --src and --dst")
    from absl import logging

    from blip3o_jax import pretrained

    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    kind = pretrained.convert_checkpoint(
        _SRC.value, _DST.value, kind=_KIND.value, dtype=_DTYPE.value, force=_FORCE.value,
        allow_pickle=_ALLOW_PICKLE.value, progress=_PROGRESS.value, allow_nonfinite=_ALLOW_NONFINITE.value,
    )
    print(f"wrote {kind} params to {_DST.value}")


def _undash(arg: str) -> str:
    name, eq, value = arg.partition("=")
    return _DASHED.get(name, name) + eq + value


def main():
    import sys

    sys.argv = [sys.argv[0]] + ["--help" if a == "-h" else _undash(a) for a in sys.argv[1:]]
    asked_for_help = any(a in _HELP for a in sys.argv[1:])
    try:
        cli.run(_main, module=__name__, doc=__doc__)
    except SystemExit as e:
        if asked_for_help and e.code == 1:  # absl exits 1 after printing the help; asking for it is no failure
            sys.exit(0)
        raise


if __name__ == "__main__":
    main()
