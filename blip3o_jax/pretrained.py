"""Loading pretrained weights: HF-format directories and our converted Orbax output, for any registered kind.

Two on-disk formats are read by `load_pretrained`:
- a transformers or diffusers directory: `config.json` (its `model_type` or `_class_name` names the kind through the
  model registry) and
  safetensors weights (single file, or sharded with `model.safetensors.index.json`; `.bin` only when allowed);
- our converted output (written by `convert_checkpoint`, i.e. `convert_torch_weights.py`): the same `config.json`,
  `blip3o_jax.json` (kind, stored dtype, source) and `params/`, an Orbax checkpoint of the Flax params tree.

`convert_checkpoint` streams the tensors one by one (progress bar over tensors), converts them strictly (unknown,
missing or mis-shaped keys are errors naming the key), and writes into a temporary directory beside the
destination that is renamed into place only once complete, so a failure never leaves a half-written destination.
A `gs://` destination (an object store has no directory rename) is written in place through the path layer of
`blip3o_jax/paths.py` (Orbax writes `params/` to the bucket itself): a hidden `.incomplete` marker first,
`blip3o_jax.json` last, so a destination counts as converted output only once complete, and an interrupted one
(marker, no `blip3o_jax.json`) may be replaced with `force`.

What is refused, always with one ConversionError naming the file and key (both when converting and when loading a
HF directory): NaN or Inf in a weight (unless `allow_nonfinite`, then a warning), an integer or bool tensor where
the model has a floating-point parameter (refused, not cast: such a tensor is a quantized or damaged weight, whose
cast value would be wrong without a word), a config.json or blip3o_jax.json that is not a JSON object, a missing
config.json (reported as missing), and a destination that overlaps the source or, even with `force`, is something
other than an earlier converted output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Iterator

import numpy as np

from blip3o_jax import convert, models
from blip3o_jax import paths as fs
from blip3o_jax.data.tar_index import process_umask
from blip3o_jax.models import registry
from blip3o_jax.convert.common import (ConversionError, iter_safetensors, load_state_dict, read_safetensors_header,
                                       read_weight_map)

META_FILE = "blip3o_jax.json"
PARAMS_DIR = "params"
# small files copied next to the converted params so the output also serves as a tokenizer/config directory
_AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
INCOMPLETE_FILE = ".incomplete"  # a remote destination being written (no atomic rename on an object store)


def local_path(path: str, what: str = "checkpoint") -> str:
    """`path` itself, unless it does not exist and reads as a Hugging Face repo id (`owner/name[/sub][@rev]`):
    then the repo's local snapshot, downloaded only when online (blip3o_jax/hub.py)."""
    from blip3o_jax import hub

    if os.path.exists(path) or hub.parse_repo_id(os.fspath(path)) is None:
        return path
    return hub.resolve_path(path, what=what)


def is_converted(path: str) -> bool:
    return fs.isdir(fs.join(path, PARAMS_DIR)) and fs.isfile(fs.join(path, META_FILE))


def _read_json(path: str) -> dict:
    """A JSON object from `path`; anything else (invalid JSON, a list, unreadable) is one ConversionError."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object (a JSON {type(data).__name__})")
    return data


def _config_dir(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def resolve(path: str, kind: str | None = None) -> tuple[str, dict]:
    """(kind, HF config dict) of a checkpoint path; `kind` overrides what config.json / blip3o_jax.json say."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    cdir = _config_dir(path)
    config_path = os.path.join(cdir, "config.json")
    hf = _read_json(config_path) if os.path.isfile(config_path) else None
    meta = _read_json(os.path.join(cdir, META_FILE)) if os.path.isfile(os.path.join(cdir, META_FILE)) else {}
    kind = kind or meta.get("kind")
    if kind is None:
        if hf is None:
            raise ConversionError(f"{config_path}: missing, so the model kind is unknown; pass --kind")
        kind = registry.kind_of_config(hf)
        if kind is None:
            field = "model_type" if "model_type" in hf or "_class_name" not in hf else "_class_name"
            raise ConversionError(
                f"{config_path}: {field} {hf.get(field)!r} is not supported; expected one of "
                f"{registry.known_identifiers()} (or pass --kind)"
            )
    if kind not in registry.kinds():
        raise ConversionError(f"unknown model kind {kind!r}; expected one of {sorted(registry.kinds())}")
    return kind, (hf or {})


def _config(kind: str, hf: dict, where: str, dtype: str | None = None, param_dtype: str | None = None):
    if not os.path.isfile(where):  # the model's sizes come from it: defaults would only fail later, misleadingly
        raise ConversionError(f"{where}: missing; the model's configuration is read from it")
    try:
        cfg = models.config_from_hf(kind, hf)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("blip3o_jax"):
            raise ConversionError(f"model kind {kind!r} is not implemented in this version ({e.name} is missing)") from None
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not a valid {kind} config ({e.__class__.__name__}: {e})") from None
    fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
    changes = {}
    if dtype is not None and "dtype" in fields:
        changes["dtype"] = dtype
    if (param_dtype or dtype) is not None and "param_dtype" in fields:
        changes["param_dtype"] = param_dtype or dtype
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _tensor_plan(path: str) -> list[tuple[str, list[str]]] | None:
    """[(safetensors file, keys)] in read order, headers checked up front; None when the weights are pickles."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return [(path, list(read_safetensors_header(path)[0]))]
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files: dict[str, list[str]] = {}
        for key, fname in read_weight_map(index).items():
            files.setdefault(fname, []).append(key)
        plan = []
        for fname, keys in sorted(files.items()):
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath):
                raise ConversionError(f"{index}: shard {fname} is missing")
            header, _ = read_safetensors_header(fpath)
            absent = [k for k in keys if k not in header]
            if absent:
                raise ConversionError(f"{fpath}: index lists {absent[0]!r} but the shard does not hold it")
            plan.append((fpath, keys))
        return plan
    single = os.path.join(path, "model.safetensors")
    files_ = [single] if os.path.exists(single) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
    )
    if files_:
        return [(f, list(read_safetensors_header(f)[0])) for f in files_]
    return None


def _is_float(dtype) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(dtype, jnp.floating)  # numpy's own issubdtype says no for bfloat16 and float8


def _count_nonfinite(arr: np.ndarray) -> int:
    if not _is_float(arr.dtype) or arr.size == 0:
        return 0
    # a float64 sum is finite exactly when every element is (no overflow from <= 32-bit floats), without the
    # full-size temporary of np.isfinite; count only when something is wrong (or the sum of float64 overflowed)
    if np.isfinite(arr.sum(dtype=np.float64)):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def iter_state_dict(path: str, *, allow_pickle: bool = False, progress: bool = False,
                    allow_nonfinite: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Streams (checkpoint key, array) tensor by tensor, with an optional tqdm bar over tensors.

    A tensor holding NaN or Inf is a ConversionError naming the file and key, or with `allow_nonfinite` a warning.
    """
    plan = _tensor_plan(path)
    if plan is None:  # pickled weights: torch.load reads a file whole
        pickled = load_state_dict(path, allow_pickle=allow_pickle)
        items: Any = ((path, k, v) for k, v in pickled.items())
        total = len(pickled)
    else:
        total = sum(len(keys) for _, keys in plan)
        items = ((fpath, k, v) for fpath, keys in plan for k, v in iter_safetensors(fpath, keys))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=total, unit="tensor", desc=f"reading {os.path.basename(os.path.normpath(path))}")
    for fpath, key, value in items:
        bad = _count_nonfinite(value)
        if bad:
            message = f"{fpath}: tensor {key!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}"
            if not allow_nonfinite:
                raise ConversionError(f"{message}; pass --allow_nonfinite to convert it anyway")
            warnings.warn(f"{message} (kept: --allow_nonfinite)", stacklevel=2)
        yield key, value


def _from_torch(kind: str, state_dict: dict, cfg, where: str):
    """`convert.from_torch`, refusing an integer or bool tensor where the model has a floating-point parameter.

    Integer tensors that the converter drops (position-id buffers, `num_batches_tracked`) are fine, so the check
    converts without them first: only if a non-float key then turns out to be needed is it refused, by name.
    """
    non_float = sorted(k for k, v in state_dict.items() if not _is_float(np.asarray(v).dtype))
    if not non_float:
        return convert.from_torch(kind, state_dict, cfg)
    try:
        return convert.from_torch(kind, {k: v for k, v in state_dict.items() if k not in set(non_float)}, cfg)
    except ConversionError as e:
        needed = [k for k in non_float if repr(k) in str(e)]
    if not needed:
        convert.from_torch(kind, state_dict, cfg)  # raises the checkpoint's real problem, if it has another one
        needed = non_float
    key = needed[0]
    raise ConversionError(
        f"{where}: tensor {key!r} is stored as {np.asarray(state_dict[key]).dtype} but the model's parameter is "
        "floating point; integer/bool weights (a quantized or damaged checkpoint) are refused, not cast")


def _cast(params, param_dtype):
    import jax
    import jax.numpy as jnp

    from blip3o_jax.models import layers

    target = layers.to_dtype(param_dtype)

    def one(x):
        x = np.asarray(x) if not hasattr(x, "dtype") else x
        return x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != target else x

    return jax.tree.map(one, params)


def _check_shapes(kind: str, cfg, params, where: str) -> None:
    """Our converted output against the model's expected shapes (when the converter can say them) and dtypes."""
    import flax

    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    for key, value in sorted(flat.items()):
        if not _is_float(value.dtype):
            raise ConversionError(f"{where}: param {key!r} is stored as {value.dtype}, not a floating-point type")
    want = convert.expected_shapes(kind, cfg)
    if want is None:
        return
    have = {k: tuple(np.shape(v)) for k, v in flat.items()}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise ConversionError(f"{where}: missing param {key!r}")
        if key not in want:
            raise ConversionError(f"{where}: unexpected param {key!r}: not a parameter of this model/config")
        if want[key] != have[key]:
            raise ConversionError(f"{where}: param {key!r} has shape {have[key]} but the config expects {want[key]}")


def restore_params(path: str, target=None):
    """Restores the Orbax params of a converted directory; `target` (ShapeDtypeStructs with shardings) places them."""
    import orbax.checkpoint as ocp

    if not is_converted(path):
        hint = (" (it is a PyTorch/HF checkpoint)" if os.path.isfile(os.path.join(path, "config.json")) else "")
        raise ConversionError(
            f"{path}: not a converted checkpoint, no {PARAMS_DIR}/ and {META_FILE}{hint}; run "
            f"convert_torch_weights.py --src {path} --dst OUT first and use OUT")

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(fs.storage_path(fs.join(fs.abspath(path), PARAMS_DIR)), target)


def relayout(tree, want):
    """`tree` rearranged to the layer layout of `want` (a tree of anything with `.shape`): stacked `name` (one
    `nn.scan` leaf with a leading layer axis) <-> unrolled `name_0`, `name_1`, ... The numbers are the same; a
    converter's `scan_layers` and a training config's may differ. Keys it cannot match are left for the caller's
    shape check to report."""
    import re

    import jax

    if not isinstance(want, dict) or not isinstance(tree, dict):
        return tree
    out = {}
    for key, sub in want.items():
        if key in tree:
            out[key] = relayout(tree[key], sub)
            continue
        m = re.fullmatch(r"(.+)_(\d+)", key)
        if m and isinstance(tree.get(m.group(1)), dict):  # want unrolled, have stacked
            i = int(m.group(2))
            out[key] = relayout(jax.tree.map(lambda x: x[i], tree[m.group(1)]), sub)
            continue
        parts = sorted((int(k.rsplit("_", 1)[1]), k) for k in tree if re.fullmatch(re.escape(key) + r"_\d+", k))
        if parts and [i for i, _ in parts] == list(range(len(parts))):  # want stacked, have unrolled
            out[key] = relayout(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                             *[tree[k] for _, k in parts]), sub)
    return out


def restore_params_as(path: str, target):
    """`restore_params` into `target`'s tree (ShapeDtypeStructs with shardings), converting between stacked and
    unrolled layers when the stored layout differs; ConversionError naming the first mismatch otherwise."""
    import jax

    try:
        return restore_params(path, target)
    except (ValueError, KeyError, TypeError):  # Orbax: structure or shapes differ; try the other layer layout
        pass
    stored = jax.tree.map(np.asarray, restore_params(path))
    moved = relayout(stored, target)
    flat_want = {"/".join(map(str, k)): v for k, v in _flatten(target).items()}
    flat_have = {"/".join(map(str, k)): v for k, v in _flatten(moved).items()}
    for key, want in flat_want.items():
        if key not in flat_have:
            raise ConversionError(f"{path}/{PARAMS_DIR}: no param {key!r} for the model's layout")
        if tuple(flat_have[key].shape) != tuple(want.shape):
            raise ConversionError(f"{path}/{PARAMS_DIR}: param {key!r} has shape {tuple(flat_have[key].shape)}, "
                                  f"the model wants {tuple(want.shape)}")
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), getattr(t, "sharding", None)), moved, target)


def _flatten(tree):
    import flax

    return flax.traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {(): tree}


def load_pretrained(path: str, *, allow_pickle: bool = False, dtype: str | None = None, kind: str | None = None,
                    allow_nonfinite: bool = False):
    """(module, params) from a HF directory or our converted output.

    dtype (e.g. "bfloat16") sets the compute and parameter dtype; by default the config's own policy (fp32 compute,
    fp32 params for HF checkpoints, the stored dtype for converted output). NaN/Inf weights of a HF directory are
    refused unless `allow_nonfinite`.
    """
    import jax.numpy as jnp
    import jax

    path = local_path(path)
    kind, hf = resolve(path, kind)
    if is_converted(path):
        meta = _read_json(os.path.join(path, META_FILE))
        cfg = _config(kind, hf, os.path.join(path, "config.json"), dtype=dtype,
                      param_dtype=dtype or meta.get("dtype"))
        try:
            params = restore_params(path)
        except Exception as e:  # noqa: BLE001 (orbax raises many types for damaged checkpoints)
            raise ConversionError(f"{path}/{PARAMS_DIR}: cannot restore the Orbax checkpoint ({e.__class__.__name__})") from None
        _check_shapes(kind, cfg, params, f"{path}/{PARAMS_DIR}")
    else:
        cfg = _config(kind, hf, os.path.join(_config_dir(path), "config.json"), dtype=dtype)
        state_dict = dict(iter_state_dict(path, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite))
        params = _from_torch(kind, state_dict, cfg, path)
    if getattr(cfg, "param_dtype", None) is not None:
        params = _cast(params, cfg.param_dtype)
    return models.build(kind, cfg), jax.tree.map(jnp.asarray, params)


def _check_destination(src: str, dst: str, force: bool) -> None:
    """Refuses, before anything is read or deleted, a destination that overlaps the source (equal to it, a parent
    of it, or inside it: replacing it would delete the source weights or write into them) and, with or without
    --force, an existing destination that is not an earlier converted output (e.g. a home or data directory)."""
    if fs.is_remote(dst):
        _check_remote_destination(src, dst, force)
        return
    src_dir = os.path.realpath(_config_dir(src))
    real_dst = os.path.realpath(dst)
    for place in {src_dir, os.path.realpath(src)}:
        if real_dst == place:
            raise ConversionError(f"--dst {dst} is the source {src}; choose a new directory")
        if os.path.commonpath([real_dst, place]) == real_dst:
            raise ConversionError(f"--dst {dst} contains the source {src}; replacing it would delete the source")
        if os.path.commonpath([real_dst, place]) == place:
            raise ConversionError(f"--dst {dst} is inside the source directory {src_dir}; choose a directory "
                                  "outside it")
    if not os.path.lexists(dst):
        return
    if not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    replaceable = not os.path.islink(dst) and os.path.isdir(dst) and (is_converted(dst) or not os.listdir(dst))
    if not replaceable:
        raise ConversionError(f"{dst} exists and is not an output of convert_torch_weights.py (no {META_FILE}); "
                              "refusing to replace it even with --force: remove it yourself or choose another --dst")


def _check_remote_destination(src: str, dst: str, force: bool) -> None:
    """`_check_destination` for a bucket: the same refusals (a local source cannot overlap it); an interrupted
    earlier output (its `.incomplete` marker, no blip3o_jax.json) is replaceable with --force too."""
    if fs.is_remote(src) and (src == dst or src.startswith(dst + "/") or dst.startswith(src + "/")):
        raise ConversionError(f"--dst {dst} overlaps the source {src}; choose a directory outside it")
    if not fs.exists(dst):
        return
    if not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    replaceable = fs.isdir(dst) and (is_converted(dst) or fs.exists(fs.join(dst, INCOMPLETE_FILE))
                                     or not fs.listdir(dst))
    if not replaceable:
        raise ConversionError(f"{dst} exists and is not an output of convert_torch_weights.py (no {META_FILE}); "
                              "refusing to replace it even with --force: remove it yourself or choose another --dst")


def _write_remote(dst: str, params, cdir: str, meta: dict) -> None:
    """Writes a converted output into a bucket in place (checked by `_check_remote_destination`): the marker
    first, the old output's blip3o_jax.json removed before anything else of it, our blip3o_jax.json last."""
    import orbax.checkpoint as ocp

    marker = fs.join(dst, INCOMPLETE_FILE)
    fs.write_text(marker, json.dumps({"source": meta["source"]}) + "\n")
    if fs.exists(fs.join(dst, META_FILE)):
        fs.remove(fs.join(dst, META_FILE))  # from here on the old output no longer counts as one
    for name in fs.listdir(dst):  # the rest of the earlier output (--force)
        if name != INCOMPLETE_FILE:
            path = fs.join(dst, name)
            if fs.isdir(path):
                fs.rmtree(path)
            else:
                fs.remove(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(fs.storage_path(fs.join(dst, PARAMS_DIR)), params)
    for name in _aux_files(cdir):
        with open(os.path.join(cdir, name), "rb") as f:
            fs.write_bytes(fs.join(dst, name), f.read())
    fs.write_text(fs.join(dst, META_FILE), json.dumps(meta, indent=2))
    fs.remove(marker)


def _aux_files(cdir: str) -> list[str]:
    """The small files of the source directory copied beside the params (config, tokenizer, generation config)."""
    return [name for name in sorted(os.listdir(cdir))
            if os.path.isfile(os.path.join(cdir, name)) and name.endswith(_AUX_SUFFIXES)
            and name not in _WEIGHT_FILES and name != META_FILE]


def convert_checkpoint(src: str, dst: str, *, kind: str | None = None, dtype: str | None = None, force: bool = False,
                       allow_pickle: bool = False, progress: bool = True, allow_nonfinite: bool = False) -> str:
    """Converts a HF checkpoint into our format at `dst` atomically; returns the kind.

    The new directories get the permissions the umask allows (as `mkdir` would), not the 0700 of a temporary
    directory. NaN/Inf weights are refused unless `allow_nonfinite` (then kept, with a warning).
    """
    import orbax.checkpoint as ocp

    src = local_path(src)
    src = os.path.abspath(src)
    dst = fs.abspath(dst) if fs.is_remote(dst) else os.path.abspath(os.path.normpath(dst))
    kind, hf = resolve(src, kind)
    _check_destination(src, dst, force)
    cdir = _config_dir(src)
    cfg = _config(kind, hf, os.path.join(cdir, "config.json"))
    state_dict = dict(iter_state_dict(src, allow_pickle=allow_pickle, progress=progress,
                                      allow_nonfinite=allow_nonfinite))
    params = _from_torch(kind, state_dict, cfg, src)
    del state_dict
    stored = dtype or getattr(cfg, "param_dtype", None)
    if dtype is not None:
        params = _cast(params, dtype)
    meta = {"kind": kind, "dtype": stored, "source": src, "format": "orbax-standard-params"}
    if fs.is_remote(dst):
        _write_remote(dst, params, cdir, meta)
        return kind

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes it 0700 whatever the umask; it becomes dst
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
        for name in _aux_files(cdir):
            shutil.copy2(os.path.join(cdir, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.lexists(dst):  # --force over an earlier output (checked above): swap in, then drop the old copy
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rmdir(backup)
            os.replace(dst, backup)
            os.replace(tmp, dst)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return kind
