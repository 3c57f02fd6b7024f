"""The input pipeline: sources -> deterministic shuffled mixture -> per-process slice -> decode/transform ->
static-shape batches, on Grain, with multi-worker decoding, checkpointable state and global-array assembly.

Determinism (levanter style): every batch is a pure function of (config, seed, step). Global sample `g` of the
run is the mixture's element `g`; each source is shuffled by Grain's index shuffle with a per-epoch seed, and
the mixture interleaves the sources exactly in proportion to their weights (`grain.MapDataset.mix`). The global
batch at step `s` holds samples `s*B .. s*B+B-1`; process `p` of `P` takes the contiguous block of rows
`g = s*B + p*B/P + j` (j < B/P), which `make_global_batch` places at global rows `p*B/P + j` (process p's devices
hold that block of the batch axis): the global batch is the same array, row for row, for any process count, so a
run's losses do not depend on how many hosts it uses. Bad samples are replaced
by a deterministic other record of the same source (a hash of seed, source, record and attempt), so
replacement never depends on timing, worker count or what was seen before. The iterator's state is therefore
just the step (plus metric counters): restoring it replays exactly the batches of an uninterrupted run.

Batch schema (dict of NumPy arrays, B = global_batch_size / process_count rows, L = the smallest entry of
`seq_buckets` that holds the batch's longest row; every field present in every batch of a pipeline):

  always
    input_ids       (B, L)  int32  chat-formatted tokens, right-padded with the tokenizer's pad id
    attention_mask  (B, L)  int32  1 on real tokens
    positions       (B, L)  int32  0..n-1 on real tokens, 0 on padding
    task            (B,)    int32  0 text-to-image, 1 image-to-text, 2 text-only (transforms.TASKS)
    sample_valid    (B,)    int32  0 only for padding rows at the end of a finite epoch
    source_id       (B,)    int32  index of the dataset in `datasets`
    record_id       (B,)    int32  record within that dataset actually used (after bad-sample replacement)
  with a text-to-image dataset (rows of other tasks hold zeros)
    query_index     (B, n_query) int32  positions of the n_query latent-query slots (for take_along_axis):
                                        prompt_length + arange(n_query)
    prompt_length   (B,)    int32  tokens before the first query slot = index of [IMG] + 1; the prefix
                                   input_ids[:prompt_length] does not depend on the queries and can be cached
    gen_image       (B, S, S, 3) uint8  EVA-CLIP input (resize short side + centre crop, S = gen_image_size);
                                   normalise on the device with preprocessing.normalize(x, CLIP_MEAN, CLIP_STD)
    targets         (B, g, g, C) bfloat16 (or float32: `target_dtype`)  instead of gen_image when `target_shape` is set: the precomputed
                                   target grids read from companion shards (data/targets.py); no image decode
  with an image-to-text or text-only dataset
    labels          (B, L)  int32  pre-shifted targets: labels[:, t] = input_ids[:, t + 1]
    loss_mask       (B, L)  int32  1 where labels[:, t] is an assistant token (content or its <|im_end|>)
  with an image-to-text dataset
    und_patches     (B, N, 1176) float32  Qwen2.5-VL patches of the und_image_size crop (N = (S/14)^2)
    und_grid_thw    (B, 3)  int32  (1, S/14, S/14)
    und_index       (B, N/4) int32  positions of the <|image_pad|> slots (merged vision tokens go there)
    mrope_positions (B, 3, L) int32  Qwen2.5-VL 3-D rotary positions (text rows: positions on all three)

Token layout of a text-to-image row: chat prompt, [IMG], n_query x
<image>, padding. Use `make_global_batch` to turn a host batch into global `jax.Array`s sharded over
(data, fsdp).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Any, Sequence

import grain
import numpy as np

from blip3o_jax.data import prompts, sources, transforms

log = logging.getLogger(__name__)


def default_config():
    """Defaults of the `data` section of a training config (ml_collections)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    # each: {"name", "paths" (glob or list), "kind": "tar"|"json" (default from the extension),
    #        "task": "t2i"|"i2t"|"text", "weight", optional "image_root" (json), "index_cache_dir" (tar)}
    #   or {"kind": "tfds", "name", "split", "data_dir" (or "builder_dir"), field names...: data/tfds_source.py}
    c.datasets = []
    c.tokenizer = ""  # local directory of a transformers tokenizer
    c.global_batch_size = 16
    c.seq_buckets = (512,)  # original: 447 prompt tokens + [IMG] + 64 queries = 512
    c.n_query = 64
    c.gen_image_size = 448
    c.und_image_size = 448
    c.prompt_format = "train"
    c.tokens = ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(prompts.TokenNames)})
    c.system_prompt = prompts.SYSTEM_PROMPT
    c.seed = 0
    c.shuffle = True
    c.num_epochs = ml_collections.FieldReference(None, field_type=int)  # None: repeat forever
    c.min_image_size = 16
    c.max_aspect_ratio = 20.0
    c.jpeg_draft = True
    c.index_cache_dir = ml_collections.FieldReference(None, field_type=str)  # None: next to each shard
    c.num_threads = 2  # decoding threads per process (or per worker)
    c.worker_count = 0  # >0: decode in that many Grain worker processes (mp_prefetch)
    c.prefetch_batches = 4
    c.max_retries = 32  # replacement attempts for a bad sample before the source is declared unusable
    # precomputed targets (tools/precompute_targets.py, data/targets.py): "auto" uses them when every text-to-image
    # shard has them for this config's encoder (the trainer switches model.target to "precomputed"), True requires
    # them, False ignores them. `target_shape` (set by that switch, or by hand with model.target="precomputed")
    # makes the pipeline read `<shard>.targets.tar` instead of images; a dataset's `targets_dir` moves them.
    c.precomputed_targets = "auto"
    c.target_shape = ml_collections.FieldReference(None, field_type=tuple)
    c.targets_fingerprint = ml_collections.FieldReference(None, field_type=str)  # checked against the shards
    c.target_dtype = "bfloat16"  # of the stored targets (set by the switch from the shards' metadata)
    return c


def _get(cfg, key, default=None):
    try:
        v = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if v is None and default is not None else v


def _mix64(*values: int) -> int:
    """splitmix64 over a sequence of ints: a stateless, platform-independent hash for replacement choices."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x


@dataclasses.dataclass(frozen=True)
class BadRecord:
    source: str
    shard: str
    key: str
    reason: str
    detail: str


class SampleLoader:
    """(source id, record id) -> transformed sample, replacing bad records deterministically."""

    def __init__(self, srcs: Sequence[Any], tasks: Sequence[str], transform: transforms.SampleTransform,
                 seed: int, max_retries: int = 32, scan_limit: int = 4096):
        self.sources, self.tasks, self.transform = list(srcs), list(tasks), transform
        self.seed, self.max_retries, self.scan_limit = int(seed), int(max_retries), int(scan_limit)
        self._known_bad: dict[tuple[int, int], BadRecord] = {}  # per process; only a cache, never changes output

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_known_bad"] = {}
        return state

    def _try(self, d: int, r: int) -> tuple[dict | None, BadRecord | None]:
        bad = self._known_bad.get((d, r))
        if bad is not None:
            return None, bad
        src = self.sources[d]
        try:
            return self.transform(src[r], self.tasks[d], src.name), None
        except sources.BadSampleError as e:
            bad = BadRecord(e.source or src.name, e.shard, e.key, e.reason, e.detail)
            if len(self._known_bad) < 100_000:
                self._known_bad[(d, r)] = bad
            return None, bad

    def load(self, d: int, r: int) -> tuple[dict, int, list[BadRecord]]:
        """Returns (sample, record used, bad records met on the way)."""
        n = len(self.sources[d])
        bad_seen = []
        candidate = r
        for attempt in range(self.max_retries + 1):
            sample, bad = self._try(d, candidate)
            if sample is not None:
                return sample, candidate, bad_seen
            bad_seen.append(bad)
            candidate = _mix64(self.seed, d, r, attempt + 1) % n
        name = self.sources[d].name
        last = bad_seen[-1]
        if n <= self.scan_limit:  # small source: look at every record before giving up
            for k in range(1, n + 1):
                candidate = (r + k) % n
                sample, bad = self._try(d, candidate)
                if sample is not None:
                    return sample, candidate, bad_seen
            raise sources.NoValidSampleError(
                f"dataset {name!r}: none of its {n} samples is usable (last problem: {last.reason}: {last.detail}, "
                f"shard {last.shard}, key {last.key})")
        raise sources.NoValidSampleError(
            f"dataset {name!r}: {self.max_retries + 1} samples in a row were unusable (last problem: {last.reason}: "
            f"{last.detail}, shard {last.shard}, key {last.key}); check the data or raise data.max_retries")


class LocalSample:
    """Local sample index -> loaded sample (a Grain MapDataset `map`; a pure function of the index).

    Local index i of process p is global sample g = (i // B) * B_global + p * B + (i % B) (B the local batch): each
    process reads its contiguous block of every global batch. Past the end of a finite run it returns a padding
    marker, so every process yields the same number of batches.
    """

    def __init__(self, elements: grain.MapDataset, num_elements: int | None, loader: SampleLoader, *,
                 process_index: int, local_batch_size: int, global_batch_size: int):
        self.elements, self.num_elements, self.loader = elements, num_elements, loader
        self.process_index, self.local_batch_size = int(process_index), int(local_batch_size)
        self.global_batch_size = int(global_batch_size)

    def global_index(self, i: int) -> int:
        b = self.local_batch_size
        return (i // b) * self.global_batch_size + self.process_index * b + i % b

    def __call__(self, i: int) -> dict[str, Any]:
        g = self.global_index(int(i))
        if self.num_elements is not None and g >= self.num_elements:
            return {"pad": True}
        d, r = self.elements[g]
        sample, used, bad_seen = self.loader.load(d, r)
        return {"sample": sample, "source_id": d, "record_id": used,
                "bad": tuple(dataclasses.astuple(b) for b in bad_seen)}


class BatchCollator:
    """Loaded samples -> batch dict (+ "_bad": bad-record metadata for the iterator's metrics, not an array)."""

    def __init__(self, collator: transforms.Collator):
        self.collator = collator

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        samples = [None if it.get("pad") else it["sample"] for it in items]
        batch = self.collator(samples, [it.get("source_id", 0) for it in items],
                              [it.get("record_id", 0) for it in items])
        batch["_bad"] = tuple(b for it in items for b in it.get("bad", ()))
        return batch


class _Tag:
    def __init__(self, d: int):
        self.d = d

    def __call__(self, r):
        return self.d, int(r)


def _make_source(spec: dict, index_cache_dir: str | None):
    if spec.get("kind") == "tfds":  # a TFDS ArrayRecord dataset, read without TensorFlow
        from blip3o_jax.data import tfds_source

        return tfds_source.TfdsSource.from_spec(spec)
    return sources.make_source(spec, index_cache_dir)


class DataPipeline:
    """This process's share of the input from a `data` config (see `default_config`): `samples` (a Grain
    MapDataset of loaded samples), `batch(step)` (the pure function) and `iterator(start_step)`."""

    def __init__(self, cfg, tokenizer=None, *, process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        self.cfg = cfg
        self.process_index, self.process_count = int(process_index), int(process_count)
        gbs = int(cfg.global_batch_size)
        if gbs % self.process_count:
            raise ValueError(f"global_batch_size {gbs} is not divisible by the {self.process_count} processes")
        self.global_batch_size = gbs
        self.local_batch_size = gbs // self.process_count
        if tokenizer is None:
            from blip3o_jax.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)
        self.tokenizer = tokenizer
        specs = [dict(s) for s in cfg.datasets]
        if not specs:
            raise ValueError("data.datasets is empty: list at least one dataset")
        for s in specs:
            if s.get("task", "t2i") not in transforms.TASKS:
                raise ValueError(f"dataset {s.get('name')!r}: task must be one of {list(transforms.TASKS)}")
        self.tasks = [s.get("task", "t2i") for s in specs]
        self.weights = [float(s.get("weight", 1.0)) for s in specs]
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"dataset weights must be positive, got {self.weights}")
        self.sources = [_make_source(s, _get(cfg, "index_cache_dir")) for s in specs]
        target_shape = _get(cfg, "target_shape")
        if target_shape is not None:  # text-to-image samples read their precomputed target instead of the image
            from blip3o_jax.data import targets

            self.sources = targets.wrap_sources(self.sources, specs, self.tasks,
                                                fp_id=_get(cfg, "targets_fingerprint"),
                                                index_cache_dir=_get(cfg, "index_cache_dir"))
        for s in self.sources:
            if len(s) == 0:
                raise sources.NoValidSampleError(f"dataset {s.name!r} has no samples")
        names = prompts.TokenNames.from_config(_get(cfg, "tokens"))
        self.transform_config = transforms.TransformConfig(
            seq_buckets=tuple(int(n) for n in cfg.seq_buckets), n_query=int(cfg.n_query),
            gen_image_size=int(cfg.gen_image_size), und_image_size=int(_get(cfg, "und_image_size", 448)),
            prompt_format=cfg.prompt_format, token_names=names,
            system_prompt=_get(cfg, "system_prompt", prompts.SYSTEM_PROMPT),
            min_image_size=int(_get(cfg, "min_image_size", 16)),
            max_aspect_ratio=float(_get(cfg, "max_aspect_ratio", 20.0)),
            jpeg_draft=bool(_get(cfg, "jpeg_draft", True)),
            target_shape=None if target_shape is None else tuple(int(n) for n in target_shape),
            target_dtype=str(_get(cfg, "target_dtype", "bfloat16")))
        from blip3o_jax.data.tokenizer import FastTokenizer

        transform = transforms.SampleTransform(self.transform_config, FastTokenizer.from_transformers(tokenizer))
        self.special_ids = transform.ids
        self.loader = SampleLoader(self.sources, self.tasks, transform, int(cfg.seed),
                                   int(_get(cfg, "max_retries", 32)))
        self.collator = transforms.Collator(self.transform_config, sorted(set(self.tasks)), transform.ids.pad,
                                            transform.ids.image_pad)
        self.seed = int(cfg.seed)
        self.num_epochs = _get(cfg, "num_epochs")
        self.elements = self._mixture()
        slicing = dict(process_index=self.process_index, local_batch_size=self.local_batch_size,
                       global_batch_size=self.global_batch_size)
        if self.num_epochs is None:
            self.num_steps = None
            self.samples = grain.MapDataset.range(sys.maxsize).map(
                LocalSample(self.elements, None, self.loader, **slicing))
        else:
            self.num_steps = math.ceil(len(self.elements) / self.global_batch_size)
            self.samples = grain.MapDataset.range(self.num_steps * self.local_batch_size).map(
                LocalSample(self.elements, len(self.elements), self.loader, **slicing))
        self.batch_collator = BatchCollator(self.collator)

    def _mixture(self) -> grain.MapDataset:
        """(source id, record id) for every global sample index, shuffled per source and epoch, mixed by weight."""
        per_source = []
        for d, src in enumerate(self.sources):
            ds = grain.MapDataset.range(len(src))
            if _get(self.cfg, "shuffle", True):
                # Grain's index shuffle folds the epoch into the seed: every epoch has its own order.
                ds = ds.shuffle(seed=_mix64(self.seed, d) % 2**32)
            ds = ds.repeat(self.num_epochs)
            per_source.append(ds.map(_Tag(d)))
        if len(per_source) == 1:
            return per_source[0]
        return grain.MapDataset.mix(per_source, self.weights)

    @property
    def schema(self) -> dict[str, tuple]:
        return transforms.batch_schema(self.transform_config, sorted(set(self.tasks)), self.local_batch_size)

    def batch(self, step: int, with_bad: bool = False) -> dict[str, np.ndarray]:
        """This process's batch at `step`, computed directly (no iterator): the pure function of the step."""
        b = self.local_batch_size
        batch = self.batch_collator([self.samples[step * b + j] for j in range(b)])
        if not with_bad:
            batch.pop("_bad")
        return batch

    def iterator(self, start_step: int = 0) -> "DataIterator":
        return DataIterator(self, start_step)


def _ensure_absl_flags_parsed():
    """Grain's worker processes read absl flags; outside an absl app they have not been parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator(grain.DatasetIterator):
    """Iterator over a pipeline's batches with checkpointable state (the step) and bad-sample metrics.

    A grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` store and
    restore it as an item of an Orbax `CheckpointManager` (one JSON per process).
    """

    def __init__(self, pipeline: DataPipeline, start_step: int = 0):
        super().__init__()
        self.pipeline = pipeline
        self.step = int(start_step)
        self.counters: dict[str, int] = {"samples": 0, "bad_samples": 0}
        self._logged: set[tuple[str, str]] = set()
        self._it = None

    def _make(self):
        """Samples from this step on, decoded by Grain threads (and worker processes), batched in order.

        Prefetch works per sample (so the first batch is decoded by all threads together); batching comes after
        the prefetch, in this process, so the batches do not depend on the number of threads or workers.
        """
        p, cfg = self.pipeline, self.pipeline.cfg
        b = p.local_batch_size
        ds = p.samples[self.step * b :]
        threads = int(_get(cfg, "num_threads", 2))
        buffer = int(_get(cfg, "prefetch_batches", 4)) * b
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer if threads else 0))
        workers = int(_get(cfg, "worker_count", 0))
        if workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=max(1, buffer // workers)))
        return iter(ds.batch(b, drop_remainder=True, batch_fn=p.batch_collator))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make()
        batch = dict(next(self._it))
        self.step += 1
        bad = batch.pop("_bad", ())
        self.counters["samples"] += int(batch["sample_valid"].sum())
        for source, shard, key, reason, detail in bad:
            self.counters["bad_samples"] += 1
            self.counters[f"bad/{reason}"] = self.counters.get(f"bad/{reason}", 0) + 1
            if (shard, key) not in self._logged:
                self._logged.add((shard, key))
                log.warning("skipped bad sample (%s): dataset %r, shard %s, key %s: %s", reason, source, shard, key,
                            detail)
        return batch

    def metrics(self) -> dict[str, int]:
        """Counters for the trainer's metric writer, e.g. {"data/bad_samples": 3, "data/bad/empty_caption": 1}."""
        return {f"data/{k}": v for k, v in self.counters.items()} | {"data/step": self.step}

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.pipeline.seed, "global_batch_size": self.pipeline.global_batch_size,
                "counters": dict(self.counters)}

    def set_state(self, state: dict[str, Any]) -> None:
        for k, mine in (("seed", self.pipeline.seed), ("global_batch_size", self.pipeline.global_batch_size)):
            if k in state and int(state[k]) != mine:
                raise ValueError(f"data iterator state was saved with {k}={state[k]} but this pipeline has {k}="
                                 f"{mine}; the restored batches would differ")
        self.close_underlying()
        self.step = int(state["step"])
        self.counters = {"samples": 0, "bad_samples": 0} | {k: int(v) for k, v in state.get("counters", {}).items()}

    def start_prefetch(self) -> None:
        if self._it is None:
            self._it = self._make()
        start = getattr(self._it, "start_prefetch", None)
        if start is not None:
            start()

    def close_underlying(self):
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def close(self) -> None:
        self.close_underlying()
        super().close()

    def __str__(self):
        return f"DataIterator(step={self.step})"


def make_global_batch(host_batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Per-process host batch -> global `jax.Array`s, batch dimension sharded over (data, fsdp).

    Every process passes its own rows; the global batch has process_count x local rows. Non-array entries and
    keys starting with "_" are dropped.
    """
    import jax

    from blip3o_jax.sharding import batch_sharding

    out = {}
    for k, v in host_batch.items():
        if k.startswith("_") or not isinstance(v, np.ndarray):
            continue
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, global_shape)
    return out


def build(cfg, tokenizer=None, **kwargs) -> DataPipeline:
    return DataPipeline(cfg, tokenizer, **kwargs)
