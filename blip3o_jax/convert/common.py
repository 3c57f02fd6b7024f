"""Key-mapping machinery shared by every converter, and streaming safetensors I/O.

A converter is a table of `Rule`s (torch key <-> flax param path, with a small transform each way) plus the
expected parameter shapes of the Flax module. `from_torch_by_rules` is strict: an unknown key, a missing key or a
shape mismatch raises `ConversionError` naming the key and both shapes. Keys containing `{i}` are per-layer
tensors stacked along axis 0 of one Flax leaf (the `nn.scan` layer axis).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax
import jax
import ml_dtypes
import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not match the model: one sentence naming the key and the problem."""


def _identity(x):
    return x


def transpose(x):
    return np.transpose(x)


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_key: str  # may contain "{i}": per-layer tensors stacked on axis 0 of the flax leaf
    flax_path: str  # "/"-separated path inside the params tree
    to_flax: Callable[[np.ndarray], np.ndarray] = _identity
    to_torch: Callable[[np.ndarray], np.ndarray] = _identity

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch_key


def linear_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """torch nn.Linear(weight (out, in), bias) <-> our Dense(kernel (in, out), bias)."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", transpose, transpose)]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


def conv_to_flax(w):
    """torch Conv2d weight (O, I/groups, kh, kw) -> flax Conv kernel (kh, kw, I/groups, O)."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k):
    return np.transpose(k, (3, 2, 0, 1))


def conv_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """torch nn.Conv2d(weight (O, I/g, kh, kw), bias) <-> flax nn.Conv(kernel (kh, kw, I/g, O), bias); channels-last."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", conv_to_flax, conv_to_torch)]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


def conv1x1_as_linear_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """torch 1x1 Conv2d(weight (O, I, 1, 1)) <-> our Dense(kernel (I, O)) applied channels-last."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel",
                  lambda w: np.transpose(w[:, :, 0, 0]), lambda k: np.transpose(k)[:, :, None, None])]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


def layer_prefixes(scan: bool, n: int, torch_fmt: str, flax_name: str) -> list[tuple[str, str]]:
    """(torch prefix, flax prefix) per repeated layer: one stacked `{i}` entry when scanned, n entries otherwise.

    torch_fmt holds `{i}` (e.g. "model.layers.{i}"); unrolled flax layers are named `<flax_name>_<i>`.
    """
    if scan:
        return [(torch_fmt, flax_name)]
    return [(torch_fmt.format(i=i), f"{flax_name}_{i}") for i in range(n)]


def norm_rules(torch_prefix: str, flax_prefix: str, bias: bool = False) -> list[Rule]:
    """torch norm `weight` (and `bias`) <-> our `scale` (and `bias`)."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale")]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


def _flatten(tree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _unflatten(flat: Mapping[str, Any]):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def abstract_shapes(module, *init_args, rng=None, method=None, **init_kwargs) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of a module's params without allocating them."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    variables = jax.eval_shape(lambda: module.init(rng, *init_args, method=method, **init_kwargs))
    params = flax.linen.unbox(variables["params"])
    return {k: tuple(v.shape) for k, v in _flatten(params).items()}


def strip_prefix(state_dict: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """Selects and strips the first prefix that any key carries (e.g. a DiT inside a full BLIP3o checkpoint)."""
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def from_torch_by_rules(
    rules: Iterable[Rule],
    state_dict: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
    key_prefix: str = "",
):
    """Converts a torch-named state dict into a nested params dict, strictly."""
    rules = list(rules)
    ignore_re = [re.compile(p) for p in ignore]
    remaining = {k: v for k, v in state_dict.items() if not any(r.fullmatch(k) for r in ignore_re)}
    flat: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.flax_path not in expected:
            raise ConversionError(f"internal: rule for {rule.torch_key} targets unknown param {rule.flax_path}")
        want = expected[rule.flax_path]
        if rule.stacked:
            n = want[0]
            parts = []
            for i in range(n):
                key = rule.torch_key.format(i=i)
                parts.append(_take(remaining, key, want[1:], rule, what, key_prefix))
            extra = rule.torch_key.format(i=n)
            if extra in remaining:
                raise ConversionError(f"{what}: unexpected key {key_prefix + extra!r}: the config has only {n} layers")
            value = np.stack(parts, axis=0)
        else:
            value = _take(remaining, rule.torch_key, want, rule, what, key_prefix)
        flat[rule.flax_path] = value
    if remaining:
        keys = sorted(key_prefix + k for k in remaining)
        shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise ConversionError(f"{what}: unexpected key {shown}: not a parameter of this model/config")
    missing_params = sorted(set(expected) - set(flat))
    if missing_params:
        raise ConversionError(f"internal: no rule produces params {missing_params[:5]}")
    return _unflatten(flat)


def _take(remaining, key, want_shape, rule: Rule, what: str, key_prefix: str = "") -> np.ndarray:
    if key not in remaining:
        raise ConversionError(f"{what}: missing key {key_prefix + key!r}")
    value = np.asarray(remaining.pop(key))
    converted = rule.to_flax(value)
    if tuple(converted.shape) != tuple(want_shape):
        torch_want = tuple(rule.to_torch(np.empty(want_shape, dtype=np.float32)).shape)
        raise ConversionError(
            f"{what}: key {key_prefix + key!r} has shape {tuple(value.shape)} but the config expects {torch_want}"
        )
    return converted


def to_torch_by_rules(rules: Iterable[Rule], params) -> dict[str, np.ndarray]:
    """The inverse of `from_torch_by_rules`: every rule's torch key(s) from the params tree."""
    flat = _flatten(flax.linen.unbox(params))
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        value = np.asarray(jax.device_get(flat[rule.flax_path]))
        if rule.stacked:
            for i in range(value.shape[0]):
                out[rule.torch_key.format(i=i)] = np.ascontiguousarray(rule.to_torch(value[i]))
        else:
            out[rule.torch_key] = np.ascontiguousarray(rule.to_torch(value))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The engine: every registered kind converts through these, driven by its converter module's table.
#
# A converter module (blip3o_jax/convert/<name>.py) defines `rules(cfg) -> list[Rule]` and optionally
#   PREFIXES   key prefixes under which the tensors may sit in a bigger checkpoint (the first one present is stripped)
#   IGNORED    regexes of checkpoint keys that are dropped (buffers, heads the model never reads), or
#   ignored(cfg) the same, when they depend on the config
#   SAVE_PREFIX  prefix `to_torch` writes in front of every key (the upstream on-disk layout)
#   prepare(kind, state_dict, cfg) -> state_dict    checks and layout normalisation of the raw state dict,
#              before the prefix is stripped and the table applied
# A composite kind (a checkpoint made of other kinds) defines `from_torch(kind, sd, cfg)` and
# `to_torch(kind, params, cfg)` itself and calls `convert.from_torch` for its parts.


def _registry():
    from blip3o_jax.models import registry

    return registry


def converter_module(kind: str):
    spec = _registry().get(kind)
    if spec.converter is None:
        raise ConversionError(f"model kind {kind!r} has no weight converter")
    import importlib

    return importlib.import_module(f"blip3o_jax.convert.{spec.converter}")


def expected_shapes(kind: str, cfg) -> dict[str, tuple[int, ...]] | None:
    """{flax param path: shape} of the module for `cfg`, without allocating; None for a kind without `init_args`."""
    spec = _registry().get(kind)
    if spec.init_args is None:
        return None
    args, kwargs, method = spec.init_args(cfg)
    return abstract_shapes(spec.build(cfg), *args, method=method, **kwargs)


def _cast_floats(params, dtype_name):
    from blip3o_jax.models import layers

    if dtype_name is None:
        return params
    dtype = layers.to_dtype(dtype_name)
    # jnp.issubdtype: NumPy's own issubdtype does not count ml_dtypes' bfloat16 as floating
    return jax.tree.map(
        lambda x: np.asarray(x).astype(dtype) if jax.numpy.issubdtype(np.asarray(x).dtype, jax.numpy.floating)
        else np.asarray(x), params)


def engine_from_torch(kind: str, state_dict, cfg):
    """Flax params of `kind` from {checkpoint key: array}; strict about unknown, missing and mis-shaped keys."""
    conv = converter_module(kind)
    if hasattr(conv, "from_torch"):
        return conv.from_torch(kind, state_dict, cfg)
    sd = conv.prepare(kind, dict(state_dict), cfg) if hasattr(conv, "prepare") else state_dict
    prefix = next((p for p in getattr(conv, "PREFIXES", ()) if p and any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise ConversionError(f"{kind} checkpoint: no tensors found")
    ignore = conv.ignored(cfg) if hasattr(conv, "ignored") else getattr(conv, "IGNORED", ())
    params = from_torch_by_rules(conv.rules(cfg), sd, expected_shapes(kind, cfg), ignore=ignore,
                                 what=f"{kind} checkpoint", key_prefix=prefix)
    return _cast_floats(params, getattr(cfg, "param_dtype", None))


def engine_to_torch(kind: str, params, cfg) -> dict[str, np.ndarray]:
    """{checkpoint key: array} with the keys of the upstream module (no prefix)."""
    conv = converter_module(kind)
    if hasattr(conv, "to_torch"):
        return conv.to_torch(kind, params, cfg)
    prefix = getattr(conv, "SAVE_PREFIX", "")
    return {prefix + k: v for k, v in to_torch_by_rules(conv.rules(cfg), params).items()}


# ----------------------------------------------------------------------------------------------------------------
# safetensors, read and written by hand: streaming, bf16 through ml_dtypes, and every header field checked before a
# byte of tensor data is touched, so a damaged or hostile file is one ConversionError naming the file and the key.

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors reference implementation refuses headers above 100 MB too


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: str, key: str, info) -> tuple[int, int]:
    """(begin, end) of one header entry after checking its structure; sizes are checked by the caller."""
    where = f"{path}: corrupt safetensors header: tensor {key!r}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where} is described by a JSON {type(info).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ConversionError(f"{where} has no {field!r}")
    if not isinstance(info["dtype"], str):
        raise ConversionError(f"{where} has dtype {info['dtype']!r}, not a string")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ConversionError(f"{where} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ConversionError(f"{where} has data_offsets {offsets!r}, not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ConversionError(f"{where} has data_offsets {offsets!r}: negative or reversed")
    return begin, end


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """({key: {"dtype", "shape", "data_offsets"}}, offset of the data section), every entry validated: a header
    that is not a JSON object, an entry without dtype/shape/offsets, offsets that are negative, reversed, run past
    the end of the file, disagree with the shape and dtype, or overlap another tensor's bytes are ConversionErrors."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > _MAX_HEADER:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    spans = sorted((*_check_entry(path, key, info), key) for key, info in header.items())
    end = max((e for _, e, _ in spans), default=0)
    if data_start + end > size:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, header needs {data_start + end})")
    for begin, stop, key in spans:
        info = header[key]
        if info["dtype"] in _ST_DTYPES:  # an unknown dtype is reported when (and if) the tensor is read
            want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if stop - begin != want:
                raise ConversionError(
                    f"{path}: corrupt safetensors header: tensor {key!r} ({info['dtype']} {info['shape']}) needs "
                    f"{want} bytes but its data_offsets span {stop - begin}")
    for (_, prev_end, prev_key), (begin, stop, key) in zip(spans, spans[1:]):
        if begin < prev_end and stop > begin:
            raise ConversionError(f"{path}: corrupt safetensors header: tensors {prev_key!r} and {key!r} overlap")
    return header, data_start


def iter_safetensors(path: str, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) one tensor at a time through a read-only memory map."""
    header, data_start = read_safetensors_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for key in (keys if keys is not None else header.keys()):
        info = header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        arr = np.frombuffer(mm[data_start + begin: data_start + end], dtype=_ST_DTYPES[info["dtype"]])
        yield key, np.array(arr.reshape(info["shape"]))  # copy: detach from the map


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write {key!r}: dtype {arr.dtype} has no safetensors name")
        header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def read_weight_map(index: str) -> dict[str, str]:
    """{key: shard file name} of a `*.index.json` (sharded safetensors or pickles), checked: a JSON object with a
    `weight_map` object whose values are plain file names in the index's own directory."""
    try:
        with open(index, "rb") as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{index}: not valid JSON ({e.__class__.__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: no 'weight_map' object")
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or os.path.basename(fname) != fname or fname in (".", ".."):
            raise ConversionError(f"{index}: key {key!r} maps to {fname!r}, not a file name in this directory")
    return weight_map


# HF Trainer checkpoint folders keep these pickles next to the weights; they are never model weights.
_TRAINER_STATE = re.compile(r"(optimizer|scheduler|scaler|rng_state.*|training_args|trainer_state)\.(bin|pt|pth)")


def _pickled_weight_files(path: str) -> list[str]:
    """The pickles of a directory that hold the model's weights: an index's shards, else `pytorch_model.bin`, else
    every pickle but the trainer-state files (which are read, and refused by name, only when nothing else is there)."""
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        files = sorted(set(read_weight_map(index).values()))
        for fname in files:
            if not os.path.exists(os.path.join(path, fname)):
                raise ConversionError(f"{index}: shard {fname} is missing")
        return files
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
    if "pytorch_model.bin" in pickles:
        return ["pytorch_model.bin"]
    return [f for f in pickles if not _TRAINER_STATE.fullmatch(f)] or pickles


def load_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a HF checkpoint (file or directory): safetensors single/sharded first; pickles only if allowed."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            files: dict[str, list[str]] = {}
            for key, fname in read_weight_map(index).items():
                files.setdefault(fname, []).append(key)
            out = {}
            for fname, keys in sorted(files.items()):
                fpath = os.path.join(path, fname)
                if not os.path.exists(fpath):
                    raise ConversionError(f"{index}: shard {fname} is missing")
                header, _ = read_safetensors_header(fpath)
                absent = [k for k in keys if k not in header]
                if absent:
                    raise ConversionError(f"{fpath}: index lists {absent[0]!r} but the shard does not hold it")
                out.update(iter_safetensors(fpath, keys))
            return out
        if os.path.exists(single):
            return dict(iter_safetensors(single))
        st = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if st:
            out = {}
            for f in st:
                out.update(iter_safetensors(os.path.join(path, f)))
            return out
        pickles = _pickled_weight_files(path)
        if pickles:
            out = {}
            for f in pickles:
                out.update(load_state_dict(os.path.join(path, f), allow_pickle=allow_pickle))
            return out
        raise ConversionError(f"{path}: no .safetensors (or .bin) weights in this directory")
    if path.endswith(".safetensors"):
        return dict(iter_safetensors(path))
    if path.endswith((".bin", ".pt", ".pth")):
        if not allow_pickle:
            raise ConversionError(
                f"{path}: refusing to unpickle a PyTorch file; convert it to safetensors or pass --allow-pickle"
            )
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{path}: reading .bin/.pt needs torch installed (pip install torch==2.13.0)") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConversionError(f"{path}: cannot read PyTorch file ({e.__class__.__name__}: {first})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return _flat_tensor_dict(path, sd)
    raise ConversionError(f"{path}: unknown weights format (expected .safetensors, or .bin/.pt with --allow-pickle)")


def _flat_tensor_dict(path: str, sd) -> dict[str, np.ndarray]:
    """{name: array} of an unpickled object that must be a flat {str: tensor} state dict (not an optimizer state,
    a trainer's arguments, a list or a nested dict)."""
    import torch

    hint = "; is it an optimizer or trainer state file rather than model weights?"
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors{hint}")
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: not a flat state dict of tensors (entry {key!r} is a "
                                  f"{type(value).__name__}){hint}")
        try:
            out[key] = _torch_to_numpy(value)
        except (TypeError, RuntimeError) as e:
            raise ConversionError(f"{path}: tensor {key!r} ({value.dtype}, {value.layout}) cannot be read "
                                  f"({e.__class__.__name__})") from None
    return out


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
