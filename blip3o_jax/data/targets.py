"""Precomputed generation targets: companion tar shards next to the image shards, their writer and reader.

The frozen target encoder (EVA-CLIP-E/14+ in the release, ~9.4 TFLOPs per image, re-run on every epoch in the
original; or the VAE encoder of `model.target="vae"`) gives one image the same grid every time.
`tools/precompute_targets.py` runs it once over the image shards and writes, for every shard `DIR/name.tar`, a
companion pair:

    DIR/name.targets.tar    one member `<key>.target.npy` per sample, same keys and order as the image shard:
                            the (g, g, C) target grid (8x8x1792 for the release) as .npy, bfloat16 stored as its
                            uint16 bit pattern (`.view(ml_dtypes.bfloat16)`; dtype "float32" stores float32)
    DIR/name.targets.json   written last (atomically): what produced the targets (the encoder's fingerprint),
                            shape, dtype, counts and the keys whose image could not be used ("missing")

A shard counts as done when its `.targets.json` exists and carries the current fingerprint, so an interrupted
run resumes shard by shard; both files are written under temporary names and renamed into place.

At training time (`resolve(config)`), when every text-to-image tar dataset has complete companions with the
model's fingerprint, the run switches to `model.target="precomputed"`: the data pipeline reads each sample's grid
from the companion shard instead of decoding its image (`TargetSource` below), and the train step has no encoder.
A sample whose target is missing is a bad sample (reason "missing_target") and is replaced like any other.

A dataset's `targets_dir` may be a bucket (`gs://...`): the companions are written there through the path layer of
`blip3o_jax/paths.py` (each object uploaded whole under its final name, the old metadata removed first and the new
written last, so a shard still counts as done only when complete). Training reads companion shards by byte ranges
of local files: point `targets_dir` at a gcsfuse mount of that bucket for the training run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from blip3o_jax import paths as fs
from blip3o_jax.data import sources, tar_index

log = logging.getLogger(__name__)

SUFFIX = ".targets.tar"
META_SUFFIX = ".targets.json"
MEMBER_EXT = "target.npy"
FORMAT_VERSION = 1
DTYPES = ("bfloat16", "float32")
# execution-only encoder fields: they change how the encoder runs, not what it computes
_EXECUTION_FIELDS = ("scan_layers", "remat", "remat_policy", "attention_impl")


# ---------------------------------------------------------------------------------------------------------------
# paths and identity


def companion_paths(shard: str, targets_dir: str | None = None) -> tuple[str, str]:
    """(companion tar, metadata json) of an image shard; next to it unless `targets_dir` is given."""
    base = os.path.basename(shard)
    stem = base[: -len(".tar")] if base.endswith(".tar") else base
    directory = targets_dir if targets_dir else os.path.dirname(os.path.abspath(shard))
    return fs.join(directory, stem + SUFFIX), fs.join(directory, stem + META_SUFFIX)


def is_companion(path: str) -> bool:
    return path.endswith(SUFFIX)


def _plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def fingerprint(config) -> dict[str, Any]:
    """What determines the targets of a config: encoder kind, architecture and compute dtype, weights (the
    `init_from` entry that loads it, else the random init's seed), frozen-weight storage dtype, image size and
    preprocessing, target grid. Execution-only fields (scan, remat, attention kernel) are left out."""
    m, d = config.model, config.data
    encoder = {k: v for k, v in _plain(m.get("gen_encoder") or {}).items() if k not in _EXECUTION_FIELDS}
    init_from = [s.strip() for s in str(config.get("init_from", "") or "").split(",") if s.strip()]
    weights = [s for s in init_from if s.startswith("gen_encoder=")] or init_from
    dit = _plain(m.get("dit") or {})
    return {
        "target": m.get("target", "eva_clip"),
        "gen_encoder_kind": m.get("gen_encoder_kind", "eva_clip"),
        "gen_encoder": encoder,
        "weights": weights if weights else f"random init, seed {int(config.get('seed', 0))}",
        "frozen_param_dtype": config.train.get("frozen_param_dtype", "float32") if "train" in config else "float32",
        "image_size": int(m.get("image_size", 448)),
        "jpeg_draft": bool(d.get("jpeg_draft", True)),
        "min_image_size": int(d.get("min_image_size", 16)),
        "max_aspect_ratio": float(d.get("max_aspect_ratio", 20.0)),
        "target_grid": int(m.get("target_grid", dit.get("input_size", 8))),
        "target_channels": int(m.get("target_channels", dit.get("in_channels", 1792))),
    }


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(shard: str, targets_dir: str | None = None) -> dict | None:
    _, meta_path = companion_paths(shard, targets_dir)
    try:
        return json.loads(fs.read_bytes(meta_path))
    except (OSError, ValueError):
        return None


def is_complete(shard: str, fp_id: str, targets_dir: str | None = None) -> bool:
    meta = read_meta(shard, targets_dir)
    tar_path, _ = companion_paths(shard, targets_dir)
    return bool(meta and meta.get("complete") and meta.get("fingerprint_id") == fp_id and fs.exists(tar_path))


# ---------------------------------------------------------------------------------------------------------------
# encoding one grid


def encode_grid(grid: np.ndarray, dtype: str = "bfloat16") -> bytes:
    """(g, g, C) float -> .npy bytes (bfloat16 as its uint16 bit pattern)."""
    import ml_dtypes

    if dtype == "bfloat16":
        arr = np.asarray(grid).astype(ml_dtypes.bfloat16).view(np.uint16)
    elif dtype == "float32":
        arr = np.asarray(grid, np.float32)
    else:
        raise ValueError(f"target dtype must be one of {DTYPES}, got {dtype!r}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_grid(data: bytes, dtype: str = "bfloat16") -> np.ndarray:
    import ml_dtypes

    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise ValueError(f"expected bfloat16 bits stored as uint16, got {arr.dtype}")
        return arr.view(ml_dtypes.bfloat16)
    return arr.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# writing one companion shard


class CompanionWriter:
    """Streams `<key>.target.npy` members into a temporary tar, then renames it and writes the metadata json.

    On an object store (no rename: a "rename" copies the object) the tar is uploaded straight to its final name
    after the shard's old metadata is removed, and the metadata object, written last, marks it complete."""

    def __init__(self, shard: str, fp: dict, *, shape: Sequence[int], dtype: str = "bfloat16",
                 targets_dir: str | None = None, num_samples: int | None = None):
        import tarfile

        self.shard, self.fp, self.shape, self.dtype = shard, fp, tuple(int(s) for s in shape), dtype
        self.tar_path, self.meta_path = companion_paths(shard, targets_dir)
        self.remote = fs.is_remote(self.tar_path)
        fs.makedirs(fs.dirname(self.tar_path))
        if self.remote:
            fs.remove(self.meta_path)  # the tar below replaces the one it describes
            self.tmp_path, self._file = self.tar_path, fs.open_file(self.tar_path, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w")
        else:
            self.tmp_path, self._file = f"{self.tar_path}.tmp-{os.getpid()}", None
            self._tar = tarfile.open(self.tmp_path, "w")
        self.written, self.missing, self.num_samples = 0, [], num_samples

    def add(self, key: str, grid: np.ndarray) -> None:
        import tarfile

        if tuple(grid.shape) != self.shape:
            raise ValueError(f"target of {key} has shape {grid.shape}, expected {self.shape}")
        data = encode_grid(grid, self.dtype)
        info = tarfile.TarInfo(f"{key}.{MEMBER_EXT}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self.written += 1

    def skip(self, key: str, reason: str) -> None:
        self.missing.append({"key": key, "reason": reason})

    def commit(self) -> dict:
        self._tar.close()
        if self._file is not None:
            self._file.close()  # the upload completes here
        else:
            os.replace(self.tmp_path, self.tar_path)
        meta = {"format": FORMAT_VERSION, "shard": os.path.basename(self.shard), "complete": True,
                "fingerprint_id": fingerprint_id(self.fp), "fingerprint": self.fp, "shape": list(self.shape),
                "dtype": self.dtype, "num_samples": self.num_samples, "num_targets": self.written,
                "missing": self.missing}
        fs.atomic_write(self.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()),
                        tmp_name=f"{fs.basename(self.meta_path)}.tmp-{os.getpid()}")
        return meta

    def abort(self) -> None:
        try:
            self._tar.close()
            if self._file is not None:
                self._file.close()
        finally:
            fs.remove(self.tmp_path)  # remote: the partial upload (no metadata describes it)


# ---------------------------------------------------------------------------------------------------------------
# reading: a source wrapper that attaches each sample's target


class TargetSource:
    """A `TarShardSource` whose samples carry their precomputed target (`RawSample.target`) and no image.

    The image member is not read at all. Picklable (Grain workers): companion indices and descriptors are
    reopened lazily in the receiving process.
    """

    def __init__(self, source: sources.TarShardSource, *, targets_dir: str | None = None, fp_id: str | None = None,
                 index_cache_dir: str | None = None):
        self.source = source
        self.name = source.name
        self.targets_dir, self.index_cache_dir = targets_dir, index_cache_dir
        self.companions, self.metas = [], []
        if targets_dir and fs.is_remote(targets_dir):
            raise ValueError(f"dataset {source.name!r}: targets_dir {targets_dir} is on an object store; training "
                             "reads the companion shards from local files: mount the bucket with gcsfuse "
                             "(tpu_launch.sh --mount-bucket) and point targets_dir at the mount")
        for shard in source.shards:
            tar_path, meta_path = companion_paths(shard, targets_dir)
            meta = read_meta(shard, targets_dir)
            if meta is None or not meta.get("complete") or not os.path.exists(tar_path):
                raise FileNotFoundError(f"dataset {source.name!r}: no precomputed targets for {shard} (expected "
                                        f"{tar_path} and {meta_path}); run tools/precompute_targets.py")
            if fp_id is not None and meta.get("fingerprint_id") != fp_id:
                raise ValueError(f"dataset {source.name!r}: the targets in {tar_path} were computed by another "
                                 f"encoder/config (fingerprint {meta.get('fingerprint_id')}, this run {fp_id}); "
                                 f"rerun tools/precompute_targets.py")
            self.companions.append(tar_path)
            self.metas.append(meta)
        self.dtype = self.metas[0]["dtype"] if self.metas else "bfloat16"
        self.shape = tuple(self.metas[0]["shape"]) if self.metas else None
        self._files = sources.FileHandles()  # per-thread descriptors, as the image source does
        self._keys: dict[int, dict[str, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self):
        return f"TargetSource({self.source!r})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_keys"] = {}  # rebuilt lazily in the receiving process
        return state

    def _lookup(self, s: int) -> dict[str, tuple[int, int]]:
        """{key: (offset, size)} of the target members of companion shard s (built once per process; a
        concurrent duplicate build is harmless)."""
        keys = self._keys.get(s)
        if keys is None:
            ix = tar_index.get_index(self.companions[s], self.index_cache_dir)
            keys = {}
            for j in range(len(ix)):
                for ext, off, size in ix.sample_members(j):
                    if ext == MEMBER_EXT:
                        keys[ix.sample_key(j)] = (off, size)
            self._keys[s] = keys
        return keys

    def __getitem__(self, i: int) -> sources.RawSample:
        s, j = self.source.locate(int(i))
        ix = self.source._index(s)
        shard, key = self.source.shards[s], ix.sample_key(j)
        sample = sources.RawSample(shard=shard, key=key)
        text_exts, meta_exts = self.source.text_exts, self.source.meta_exts
        wanted = {}
        for ext, off, size in ix.sample_members(j):
            for group, exts in (("text", text_exts), ("meta", meta_exts)):
                if ext in exts and group not in wanted:
                    wanted[group] = (off, size)
        blobs = tar_index.read_ranges(self.source._files.get(shard), list(wanted.values()))
        for group, blob in zip(wanted, blobs):
            setattr(sample, group, blob)
        loc = self._lookup(s).get(key)
        if loc is None:
            raise sources.BadSampleError("missing_target", f"no {key}.{MEMBER_EXT} in {self.companions[s]}",
                                         source=self.name, shard=shard, key=key)
        (blob,) = tar_index.read_ranges(self._files.get(self.companions[s]), [loc])
        try:
            sample.target = decode_grid(blob, self.dtype)
        except ValueError as e:
            raise sources.BadSampleError("bad_target", str(e), source=self.name, shard=shard, key=key) from None
        return sample


def wrap_sources(srcs: list, specs: list[dict], tasks: list[str], *, fp_id: str | None,
                 index_cache_dir: str | None = None) -> list:
    """Text-to-image tar sources -> `TargetSource`s (other sources unchanged)."""
    out = []
    for src, spec, task in zip(srcs, specs, tasks):
        if task == "t2i":
            if not isinstance(src, sources.TarShardSource):
                raise ValueError(f"dataset {src.name!r}: precomputed targets exist for tar shards only")
            src = TargetSource(src, targets_dir=spec.get("targets_dir"), fp_id=fp_id,
                               index_cache_dir=spec.get("index_cache_dir", index_cache_dir))
        out.append(src)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the training-time switch


def _t2i_shards(config) -> list[tuple[dict, list[str]]]:
    out = []
    for spec in config.data.datasets:
        spec = dict(spec)
        if spec.get("task", "t2i") != "t2i":
            continue
        if spec.get("kind") == "tfds":  # no tar shards: targets are computed in the step
            out.append((spec, []))
            continue
        paths = spec["paths"]
        first = paths if isinstance(paths, str) else paths[0]
        kind = spec.get("kind") or ("json" if str(first).endswith((".json", ".jsonl")) else "tar")
        if kind != "tar":
            out.append((spec, []))
            continue
        shards = [s for s in sources.expand_paths(paths, f"dataset {spec.get('name')!r}")
                  if not s.endswith(".idx") and not is_companion(s)]
        out.append((spec, shards))
    return out


@dataclasses.dataclass
class Resolution:
    use: bool
    reason: str
    shape: tuple[int, int, int] | None = None
    fp_id: str | None = None
    dtype: str | None = None


def check(config) -> Resolution:
    """Whether every text-to-image dataset has complete companion targets for this config's encoder."""
    m = config.model
    if m.get("target") == "pixels":
        return Resolution(False, "target 'pixels' is the image itself")
    fp = fingerprint(config)
    fp_id = fingerprint_id(fp)
    datasets = _t2i_shards(config)
    if not datasets:
        return Resolution(False, "no text-to-image dataset")
    for spec, shards in datasets:
        if not shards:
            return Resolution(False, f"dataset {spec.get('name')!r} is not made of tar shards")
        if fs.is_remote(spec.get("targets_dir") or ""):
            return Resolution(False, f"dataset {spec.get('name')!r}: targets_dir {spec['targets_dir']} is on an "
                                     "object store; training reads companion shards from a local (gcsfuse) mount")
        for shard in shards:
            meta = read_meta(shard, spec.get("targets_dir"))
            if meta is None or not meta.get("complete"):
                return Resolution(False, f"no precomputed targets for {shard}")
            if meta.get("fingerprint_id") != fp_id:
                return Resolution(False, f"the targets of {shard} come from another encoder/config "
                                         f"({meta.get('fingerprint_id')} != {fp_id})")
    dtypes = {meta_dtype for meta_dtype in _dtypes(datasets)}
    if len(dtypes) != 1:
        return Resolution(False, f"the precomputed targets mix dtypes {sorted(dtypes)}")
    return Resolution(True, "every text-to-image shard has precomputed targets",
                      (fp["target_grid"], fp["target_grid"], fp["target_channels"]), fp_id, dtypes.pop())


def _dtypes(datasets):
    for spec, shards in datasets:
        for shard in shards:
            yield (read_meta(shard, spec.get("targets_dir")) or {}).get("dtype", "bfloat16")


def resolve(config):
    """Returns (config, Resolution): with `data.precomputed_targets` "auto" (default) or True and complete
    companion targets for every text-to-image shard, a copy of the config switched to `model.target=
    "precomputed"` and `data.target_shape` set (the pipeline then reads targets, not images; the step has no
    encoder). True with missing targets raises ValueError naming the shard; False leaves the config alone."""
    import ml_collections

    mode = config.data.get("precomputed_targets", "auto")
    # an explicit model.target="precomputed" reads whatever complete companions exist (data.target_shape set by
    # hand, fingerprint not checked); "auto"/True derive both from the encoder config
    if mode in (False, "false", "never", None) or config.model.get("target") in ("precomputed", "pixels"):
        return config, Resolution(False, f"data.precomputed_targets={mode!r}, model.target="
                                         f"{config.model.get('target')!r}")
    res = check(config)
    if not res.use:
        if mode is True or mode in ("true", "always"):
            raise ValueError(f"data.precomputed_targets=True but {res.reason}; run tools/precompute_targets.py "
                             f"with this config")
        return config, res
    new = ml_collections.ConfigDict(config.to_dict())
    new.data.targets_fingerprint = res.fp_id
    new.data.target_shape = tuple(res.shape)
    new.data.target_dtype = res.dtype
    new.model.target = "precomputed"
    return new, res
