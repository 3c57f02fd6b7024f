r"""A trained run -> a directory in the released checkpoint's PyTorch layout (BLIP3o-Model-8B style), for the
original BLIP3-o code, `transformers`/`diffusers` users, and `convert_torch_weights.py --kind blip3o`.

    python tools/export_release.py --workdir /runs/blip3o_8b --out /export/BLIP3o-mine \
        [--decoder BLIP3o/BLIP3o-Model-8B/diffusion-decoder] [--base BLIP3o-Model-8B] [--dtype bfloat16]

    from blip3o_jax.export import export_release
    export_release("/runs/blip3o_8b", "/export/BLIP3o-mine")            # a training workdir (latest checkpoint)
    export_release(params, "/export/x", config=config)                  # or params + the training config

What is written (into a temporary directory beside `out`, renamed into place when complete):
- `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` above
  `max_shard_size`: every tensor under the original's key (`model.latent_queries`, `model.dit.model.*`,
  `model.gen_vision_tower.vision_tower.model.*`, `model.embed_tokens/layers/norm`, `lm_head`) by the same
  `convert.to_torch("blip3o", ...)` table that reads release checkpoints, so reading the export back gives the
  trained params exactly (at the stored dtype; `dtype` casts floating tensors, e.g. to bfloat16 as released).
  With `base` (the checkpoint the run started from, e.g. BLIP3o-Model-8B), the tensors of parts this package does
  not train or hold are carried over from it unchanged: the Qwen2.5-VL ViT `visual.*`, and the EVA-CLIP tower
  when the run trained on precomputed targets.
- `config.json`: the release's fields (`architectures: ["blip3oQwenForCausalLM"]`, `model_type: "blip3o_qwen"`,
  the backbone's transformers fields, `n_query`, and for EVA-CLIP targets `gen_vision_tower`, `gen_pooling`,
  `gen_hidden_size`), on top of `base`'s config.json when given, plus this run's nested model config
  (`backbone_kind`, `backbone`, `dit`, `target`, ...), which `models.config_from_hf("blip3o", ...)` reads first so
  that the exact architecture comes back (tiny or non-release shapes included).
- the tokenizer files of `config.data.tokenizer` (or `tokenizer`), as the release ships them;
- `diffusion-decoder/`: the pixel decoder folder `decoder` (a path or a Hub id), copied or symlinked;
- `blip3o_jax.json`: `{"kind": "blip3o", ...}` and where the weights came from, so `convert_torch_weights.py` and
  `load_pretrained` need no `--kind`.

For a run with the EMA of its weights (`config.train.ema_decay`) the EMA weights are exported (as
`sampling.load_trained` returns them).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from blip3o_jax import convert, hub
from blip3o_jax.convert.common import (ConversionError, iter_safetensors, read_safetensors_header, read_weight_map,
                                       write_safetensors)

DECODER_DIR = "diffusion-decoder"
META_FILE = "blip3o_jax.json"  # pretrained.META_FILE: names the kind for `load_pretrained` / the converter
ARCHITECTURE = "blip3oQwenForCausalLM"
MODEL_TYPE = "blip3o_qwen"  # the original's `blip3oQwenConfig.model_type`
# tokenizer (and processor) files of a HF directory; never its config or weights
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_TOKENIZER = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", META_FILE)


def parse_size(size: int | str) -> int:
    """Bytes from 5000000000, "5GB", "500MB" or "2GiB" (the transformers spelling of max_shard_size)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _model_dict(config) -> dict:
    model = config["model"]
    return json.loads(json.dumps(model.to_dict() if hasattr(model, "to_dict") else dict(model), default=list))


def release_config(config, mcfg, base_config: Mapping[str, Any] | None = None, dtype: str | None = None) -> dict:
    """The exported config.json (see the module docstring)."""
    from blip3o_jax.models import qwen as qwen_lib

    hf: dict[str, Any] = dict(base_config or {})
    backbone = qwen_lib.config_to_hf(mcfg.backbone_kind, mcfg.backbone)
    if mcfg.backbone_kind == "qwen2_5_vl_text":  # the spelling of transformers 4.51, which the original runs on
        backbone["rope_theta"] = mcfg.backbone.rope_theta
        backbone["rope_scaling"] = {"type": "mrope", "rope_type": "default",
                                    "mrope_section": list(mcfg.backbone.mrope_section)}
    hf.update(backbone)
    hf.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, n_query=int(mcfg.n_query))
    if mcfg.target == "eva_clip" or (mcfg.target == "precomputed" and mcfg.target_channels == 1792):
        hf.update(gen_vision_tower="eva-clip-E-14-plus", gen_pooling="early_pool2d_4",
                  gen_hidden_size=int(mcfg.target_channels))
    if dtype:
        hf["torch_dtype"] = dtype
    # ours last: `models.config_from_hf("blip3o", hf)` takes this nested form first and rebuilds the exact config
    model = _model_dict(config)
    model["query_path"] = mcfg.query_path  # "auto" is resolved by the training config's freeze settings
    hf.update(model)
    return hf


# ---------------------------------------------------------------------------------------------------------------
# reading a base checkpoint lazily


def _weight_files(path: str) -> dict[str, str]:
    """{key: safetensors file} of a HF directory, headers only."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return {k: os.path.join(path, f) for k, f in read_weight_map(index).items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{path}: no safetensors weights (the base checkpoint must be safetensors)")
    out = {}
    for f in files:
        for key in read_safetensors_header(os.path.join(path, f))[0]:
            out[key] = os.path.join(path, f)
    return out


def carried_keys(base_keys, ours: Mapping[str, Any]) -> list[str]:
    """Base tensors to carry over: the parts our params do not hold (the Qwen2.5-VL ViT, the EVA-CLIP tower of a
    run on precomputed targets). Backbone, DiT and queries always come from the run."""
    from blip3o_jax.convert import blip3o as blip3o_conv

    parts = blip3o_conv.split_state_dict({k: None for k in base_keys if k not in ours})
    return sorted([*parts["skipped"], *parts["gen_encoder"]])


# ---------------------------------------------------------------------------------------------------------------
# writing


def _cast(x, dtype: str | None) -> np.ndarray:
    x = np.asarray(x)
    if dtype is None or not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):  # integer buffers stay as they are
        return x
    from blip3o_jax.models import layers

    return x.astype(layers.to_dtype(dtype))


def write_weights(tensors: Mapping[str, np.ndarray], out_dir: str, max_shard_size: int | str = "5GB") -> list[str]:
    """`model.safetensors`, or HF-style shards + `model.safetensors.index.json`; returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = np.asarray(tensors[key]).nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        write_safetensors({k: tensors[k] for k in shards[0]}, os.path.join(out_dir, "model.safetensors"),
                          metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        write_safetensors({k: tensors[k] for k in keys}, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = int(sum(np.asarray(v).nbytes for v in tensors.values()))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return [*names, "model.safetensors.index.json"]


def copy_tokenizer(src: str, out_dir: str) -> list[str]:
    if not src or not os.path.isdir(src):
        raise FileNotFoundError(f"tokenizer directory {src or '(config.data.tokenizer is empty)'} not found; pass "
                                "--tokenizer DIR (the tokenizer the run was trained with)")
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name.endswith(_TOKENIZER_SUFFIXES) and name not in _NOT_TOKENIZER:
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    if not any(n.startswith("tokenizer") for n in copied):
        raise FileNotFoundError(f"{src}: no tokenizer files (tokenizer.json / tokenizer_config.json) to copy")
    return copied


def _latest_step(workdir: str) -> int | None:
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def export_release(source, out_dir: str, *, config=None, step: int | None = None, decoder: str | None = None,
                   decoder_mode: str = "copy", base: str | None = None, tokenizer: str | None = None,
                   dtype: str | None = None, max_shard_size: int | str = "5GB", force: bool = False) -> dict:
    """Writes `out_dir` (see the module docstring). `source`: a training workdir, or a params tree (then `config`,
    the run's training config, is required). Returns a summary dict."""
    import jax

    from blip3o_jax.training import model_setup

    if decoder_mode not in ("copy", "link"):
        raise ValueError(f"decoder_mode must be 'copy' or 'link', got {decoder_mode!r}")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out_dir = os.path.abspath(os.path.normpath(os.path.expanduser(out_dir)))
    if os.path.lexists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} already exists; pass --force to replace it")
    # paths and Hub ids first: a typo fails before a large checkpoint is read
    if base:
        base = hub.resolve_path(base, what="--base")
    if decoder:
        decoder = hub.resolve_path(decoder, what="--decoder")
        if not os.path.isdir(decoder):
            raise FileNotFoundError(f"--decoder {decoder}: not a directory (expected e.g. BLIP3o-Model-8B/"
                                    f"{DECODER_DIR} with unet/, vae/, scheduler/)")
    provenance: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        from blip3o_jax import sampling

        workdir = os.path.abspath(os.fspath(source))
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            raise FileNotFoundError(f"{workdir}: not a training workdir (no config.json); pass --workdir of a run")
        _, params, config = sampling.load_trained(workdir, step=step, config=config)
        provenance = {"workdir": workdir, "step": step if step is not None else _latest_step(workdir)}
    else:
        if config is None:
            raise ValueError("export_release(params, ...) needs config= (the run's training config)")
        params = source
    mcfg = model_setup.model_config(config)
    params = jax.device_get(params)
    tensors = {k: _cast(v, dtype) for k, v in convert.to_torch("blip3o", params, mcfg).items()}

    base_config, carried = None, []
    if base:
        if os.path.isfile(os.path.join(base, "config.json")):
            with open(os.path.join(base, "config.json")) as f:
                base_config = json.load(f)
        files = _weight_files(base)
        carried = carried_keys(files, tensors)
        for key in carried:  # one tensor at a time through a memory map
            (_, value), = iter_safetensors(files[key], [key])
            tensors[key] = _cast(value, dtype)
    tokenizer_dir = tokenizer or config["data"].get("tokenizer", "")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        weight_files = write_weights(tensors, tmp, max_shard_size)
        tokenizer_files = copy_tokenizer(tokenizer_dir, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(release_config(config, mcfg, base_config, dtype), f, indent=2)
        if decoder:
            target = os.path.join(tmp, DECODER_DIR)
            if decoder_mode == "copy":
                shutil.copytree(decoder, target, symlinks=False)
            else:
                os.symlink(os.path.abspath(decoder), target)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"kind": "blip3o", "format": "torch-release", **provenance, "base": base,
                       "decoder": decoder and os.path.abspath(decoder), "dtype": dtype}, f, indent=2)
        if os.path.lexists(out_dir):  # force: swap in, then drop the old copy
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": out_dir, "tensors": len(tensors), "bytes": int(sum(v.nbytes for v in tensors.values())),
            "weight_files": weight_files, "tokenizer_files": tokenizer_files, "carried_from_base": len(carried),
            "decoder": decoder and (decoder_mode, os.path.abspath(decoder)), **provenance}


# ---------------------------------------------------------------------------------------------------------------
# CLI (tools/export_release.py)


def _main(argv):
    from absl import flags, logging

    from blip3o_jax.cli import UserError

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; use --workdir and --out")
    f = flags.FLAGS
    if not f.workdir or not f.out:
        raise UserError("--workdir and --out are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        summary = export_release(f.workdir, f.out, step=f.step, decoder=f.decoder, decoder_mode=f.decoder_mode,
                                 base=f.base, tokenizer=f.tokenizer, dtype=f.dtype, max_shard_size=f.max_shard_size,
                                 force=f.force)
    except ValueError as e:
        if isinstance(e, ConversionError):
            raise
        raise UserError(str(e)) from None
    print(json.dumps(summary))


def main():
    from absl import flags

    from blip3o_jax import cli

    flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint unless --step).")
    flags.DEFINE_string("out", None, "Output directory in the release's PyTorch layout (must not exist unless --force).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_string("decoder", None, "Pixel decoder folder (or Hub id, e.g. BLIP3o/BLIP3o-Model-8B/"
                        "diffusion-decoder) to place in OUT/diffusion-decoder.")
    flags.DEFINE_enum("decoder_mode", "copy", ["copy", "link"], "Copy the decoder folder or symlink it.")
    flags.DEFINE_string("base", None, "The checkpoint the run started from (path or Hub id): its config.json fields "
                        "and the tensors the run does not hold (visual.*) are carried over.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the run's config.data.tokenizer).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast floating tensors (default: as stored).")
    flags.DEFINE_string("max_shard_size", "5GB", "Split the safetensors above this size (e.g. 5GB, 500MB).")
    flags.DEFINE_bool("force", False, "Replace an existing --out.")
    cli.run(_main, module=__name__, doc=__doc__)


if __name__ == "__main__":
    main()
