"""Random-access sources of raw samples: WebDataset tar shards and JSON/JSONL files.

Both are Grain-compatible random-access data sources (`__len__`, `__getitem__`) returning `RawSample`s: still
undecoded image bytes plus text. Decoding and validation happen in `transforms`, so a bad sample surfaces as
`BadSampleError` (with source, shard and key) where the pipeline can replace it deterministically.

Sources are cheap to pickle (paths and counts only): Grain worker processes reopen files and memory-map the
cached tar indices lazily, so nothing large crosses the process boundary.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import logging
import os
import threading
from typing import Any, Sequence

import numpy as np

from blip3o_jax.data import tar_index

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")
META_EXTS = ("json",)
JSON_IMAGE_FIELDS = ("image", "image_path", "img", "file_name")
JSON_TEXT_FIELDS = ("caption", "txt", "text", "prompt")


class BadSampleError(ValueError):
    """A sample that cannot be used; `reason` is a short metric name (e.g. "undecodable_image")."""

    def __init__(self, reason: str, detail: str = "", *, source: str = "", shard: str = "", key: str = ""):
        self.reason, self.detail, self.source, self.shard, self.key = reason, detail, source, shard, key
        super().__init__(f"{reason}: {detail} (source {source!r}, shard {shard!r}, key {key!r})")


class DatasetError(ValueError):
    """A data set that cannot be opened at all (a shard that is not a tar file, a JSON file that does not parse, an
    unreadable file, a bad dataset entry): one line naming the data set, the file and, for JSON, the line."""


class NoValidSampleError(RuntimeError):
    """A source in which no valid sample can be found (raised instead of retrying forever)."""


@dataclasses.dataclass
class RawSample:
    """Undecoded sample. `text` stays bytes for tar members so invalid UTF-8 is detected by the transform."""

    shard: str
    key: str
    image: bytes | None = None
    image_ext: str | None = None
    text: bytes | str | None = None
    meta: bytes | dict | None = None  # `<key>.json` member (bytes) or the JSON record itself (dict)
    conversations: list | None = None
    target: Any = None  # precomputed generation target (data/targets.py), read instead of the image


class _ThreadHandles:
    """One thread's open descriptors, closed when the thread ends (its thread-local storage is released)."""

    def __init__(self):
        self.pid = os.getpid()
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __del__(self):
        if self.pid == os.getpid():
            for fd in self.fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


class FileHandles:
    """Read-only descriptors cached per thread and per process (LRU). A descriptor is only ever used and closed
    by the thread that opened it, so decoding threads never read through a descriptor another thread closed
    (or whose number the OS has already reused); after a fork the child opens its own."""

    def __init__(self, limit: int = 128):
        self.limit = limit
        self._local = threading.local()

    def __getstate__(self):
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])

    def get(self, path: str) -> int:
        handles = getattr(self._local, "handles", None)
        if handles is None or handles.pid != os.getpid():
            handles = self._local.handles = _ThreadHandles()
        fd = handles.fds.get(path)
        if fd is None:
            if len(handles.fds) >= self.limit:
                os.close(handles.fds.popitem(last=False)[1])
            fd = handles.fds[path] = os.open(path, os.O_RDONLY)
        else:
            handles.fds.move_to_end(path)
        return fd


def expand_paths(patterns: str | Sequence[str], what: str = "data") -> list[str]:
    """Sorted, de-duplicated files matching glob patterns (or plain paths); a pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        p = os.path.expanduser(str(p))
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{what}: no file matches {p!r}")
        out.extend(m for m in matches if m not in out)
    return out


class TarShardSource:
    """All samples of one or many WebDataset tar shards, addressed by a global record index."""

    def __init__(self, patterns: str | Sequence[str], *, name: str = "tar", index_cache_dir: str | None = None,
                 num_index_threads: int = 8, image_exts=IMAGE_EXTS, text_exts=TEXT_EXTS, meta_exts=META_EXTS):
        self.name = name
        # `*.tar` globs also match index files and precomputed-target companions (`name.targets.tar`): not samples
        self.shards = [s for s in expand_paths(patterns, f"dataset {name!r}")
                       if not s.endswith((".idx", ".targets.tar"))]
        self.index_cache_dir = index_cache_dir
        self.image_exts, self.text_exts, self.meta_exts = tuple(image_exts), tuple(text_exts), tuple(meta_exts)
        # Index every shard (headers only; cached), in threads since it is I/O bound.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(num_index_threads, len(self.shards)))) as pool:
            try:
                indices = list(pool.map(lambda s: tar_index.get_index(s, index_cache_dir), self.shards))
            except tar_index.TarIndexError as e:  # names the shard: "/data/x.tar: not a tar file (...)"
                raise DatasetError(f"dataset {name!r}: {e}") from None
        counts = np.array([len(ix) for ix in indices], np.int64)
        for shard, n in zip(self.shards, counts):
            if n == 0:
                log.warning("dataset %r: shard %s holds no samples", name, shard)
        self._cum = np.concatenate([[0], np.cumsum(counts)])
        self._indices: dict[int, tar_index.TarIndex] = dict(enumerate(indices))
        self._files = FileHandles()

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __repr__(self):
        return f"TarShardSource({self.name!r}, shards={len(self.shards)}, samples={len(self)})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_indices"] = {}  # memory-mapped again, lazily, in the receiving process
        return state

    def _index(self, s: int) -> tar_index.TarIndex:
        ix = self._indices.get(s)
        if ix is None:
            ix = self._indices[s] = tar_index.get_index(self.shards[s], self.index_cache_dir)
        return ix

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {self!r}")
        s = int(np.searchsorted(self._cum, i, side="right")) - 1
        return s, int(i - self._cum[s])

    def __getitem__(self, i: int) -> RawSample:
        s, j = self.locate(int(i))
        ix = self._index(s)
        shard, key = self.shards[s], ix.sample_key(j)
        members = ix.sample_members(j)
        wanted: dict[str, tuple[str, int, int]] = {}
        for ext, off, size in members:
            for group, exts in (("image", self.image_exts), ("text", self.text_exts), ("meta", self.meta_exts)):
                if ext in exts and group not in wanted:
                    wanted[group] = (ext, off, size)
        groups = list(wanted)
        blobs = tar_index.read_ranges(self._files.get(shard), [(o, n) for _, o, n in wanted.values()])
        sample = RawSample(shard=shard, key=key)
        for group, blob in zip(groups, blobs):
            ext, _, size = wanted[group]
            if len(blob) != size:
                raise BadSampleError("truncated", f"member .{ext} has {len(blob)} of {size} bytes (shard cut off)",
                                     source=self.name, shard=shard, key=key)
            if group == "image":
                sample.image, sample.image_ext = blob, ext
            else:
                setattr(sample, group, blob)
        return sample


class JsonSource:
    """Records of JSON (a list) or JSONL files: `{"image": path, "caption": str}` for generation data,
    `{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}` for
    understanding data, or a conversation without image for text-only data.

    Relative image paths are resolved against `image_root` (default: the JSON file's directory). JSONL files are
    indexed by line offsets and read with positioned reads, so large files are never held in memory.
    """

    def __init__(self, patterns: str | Sequence[str], *, name: str = "json", image_root: str | None = None):
        self.name = name
        self.files = expand_paths(patterns, f"dataset {name!r}")
        self.image_root = image_root
        self._records: dict[int, list] = {}  # .json files: parsed list of records
        self._lines: dict[int, np.ndarray] = {}  # .jsonl files: (n, 3) int64 [offset, length, line no]
        counts = []
        for f_id, path in enumerate(self.files):
            try:
                if path.endswith(".jsonl"):
                    self._lines[f_id] = _line_spans(path)
                    counts.append(len(self._lines[f_id]))
                    continue
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise DatasetError(f"dataset {name!r}: {path}: cannot read ({e.strerror})") from None
            try:
                records = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                raise DatasetError(f"dataset {name!r}: {path}: not UTF-8 text (line {line})") from None
            except json.JSONDecodeError as e:
                raise DatasetError(f"dataset {name!r}: {path}: not valid JSON ({e.msg} at line {e.lineno}, "
                                   f"column {e.colno})") from None
            if isinstance(records, dict):
                records = records.get("data", [records])
            if not isinstance(records, list):
                raise DatasetError(f"dataset {name!r}: {path}: must hold a list of records (or {{\"data\": [...]}}), "
                                   f"not a JSON {type(records).__name__}")
            self._records[f_id] = records
            counts.append(len(records))
        self._cum = np.concatenate([[0], np.cumsum(np.array(counts, np.int64))])
        self._files = FileHandles()

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __repr__(self):
        return f"JsonSource({self.name!r}, files={len(self.files)}, samples={len(self)})"

    def _read_line(self, f_id: int, j: int) -> bytes:
        off, n, _ = self._lines[f_id][j]
        return os.pread(self._files.get(self.files[f_id]), int(n), int(off))

    def __getitem__(self, i: int) -> RawSample:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {self!r}")
        f_id = int(np.searchsorted(self._cum, i, side="right")) - 1
        j = i - int(self._cum[f_id])
        path = self.files[f_id]
        key = f"record {j}"
        if f_id in self._lines:
            line = self._read_line(f_id, j)
            key = f"line {int(self._lines[f_id][j][2])}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadSampleError("bad_text_encoding", "line is not UTF-8", source=self.name, shard=path,
                                     key=key) from None
            except ValueError as e:
                raise BadSampleError("bad_record", f"invalid JSON ({e})", source=self.name, shard=path,
                                     key=key) from None
        else:
            record = self._records[f_id][j]
        if not isinstance(record, dict):
            raise BadSampleError("bad_record", "record is not a JSON object", source=self.name, shard=path, key=key)
        key = str(record.get("id", key))
        sample = RawSample(shard=path, key=key, meta=record)
        text = next((record[k] for k in JSON_TEXT_FIELDS if k in record), None)
        sample.text = text
        conv = record.get("conversations")
        if conv is not None:
            if not isinstance(conv, list):
                raise BadSampleError("bad_record", "conversations is not a list", source=self.name, shard=path,
                                     key=key)
            sample.conversations = conv
        image_path = next((record[k] for k in JSON_IMAGE_FIELDS if record.get(k)), None)
        if image_path is not None:
            if not isinstance(image_path, str):
                raise BadSampleError("bad_record", "image path is not a string", source=self.name, shard=path,
                                     key=key)
            root = self.image_root if self.image_root is not None else os.path.dirname(path)
            full = image_path if os.path.isabs(image_path) else os.path.join(root, image_path)
            try:
                with open(full, "rb") as f:
                    sample.image = f.read()
            except OSError as e:
                raise BadSampleError("missing_image", f"cannot read {full} ({e.strerror})", source=self.name,
                                     shard=path, key=key) from None
            sample.image_ext = os.path.splitext(full)[1].lstrip(".").lower()
        return sample


def _line_spans(path: str, chunk: int = 1 << 24) -> np.ndarray:
    """(n, 3) int64 [offset, length, line number] of each non-blank line, streaming the file in chunks."""
    spans = []
    with open(path, "rb") as f:
        carry_start, line_no = 0, 0
        buf = b""
        while True:
            block = f.read(chunk)
            if not block:
                break
            buf += block
            starts = 0
            while True:
                nl = buf.find(b"\n", starts)
                if nl < 0:
                    break
                if buf[starts:nl].strip():
                    spans.append((carry_start + starts, nl - starts, line_no))
                line_no += 1
                starts = nl + 1
            carry_start += starts
            buf = buf[starts:]
        if buf.strip():
            spans.append((carry_start, len(buf), line_no))
    return np.array(spans, np.int64).reshape(-1, 3)


def make_source(spec: dict[str, Any], index_cache_dir: str | None = None):
    """A source from a dataset spec: {"name", "paths", "kind": "tar"|"json" (default from the extension), ...}."""
    if not hasattr(spec, "get"):
        raise DatasetError(f"dataset entry {spec!r}: expected a dict like {{'name': ..., 'paths': 'dir/*.tar'}}")
    paths = spec.get("paths")
    if not paths or not isinstance(paths, (str, list, tuple)):
        raise DatasetError(f"dataset {spec.get('name', '?')!r}: 'paths' must be a glob or a list of globs, "
                           f"got {paths!r}")
    first = paths if isinstance(paths, str) else paths[0]
    kind = spec.get("kind") or ("json" if str(first).endswith((".json", ".jsonl")) else "tar")
    name = spec.get("name", os.path.basename(str(first)))
    if kind == "tar":
        return TarShardSource(paths, name=name, index_cache_dir=spec.get("index_cache_dir", index_cache_dir))
    if kind == "json":
        return JsonSource(paths, name=name, image_root=spec.get("image_root"))
    raise DatasetError(f"dataset {name!r}: unknown kind {kind!r} (expected 'tar' or 'json')")
