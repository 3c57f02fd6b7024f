"""Random access into WebDataset tar shards without extracting them.

A shard is indexed once: every regular member's name, data offset and size, and the grouping of consecutive
members that share a key into samples (WebDataset convention: `dir/abc.jpg` and `dir/abc.txt` form sample
`dir/abc` with fields `jpg` and `txt`). The index is a small binary file stored next to the shard (or in a
cache directory) and reused while the shard's content fingerprint is unchanged. Samples are then read
with positioned reads (`os.pread`): no extraction, and member names are never used as file-system paths.

Why a content fingerprint and not size + mtime: a shard rewritten with other samples but the same size and
modification time (a regenerated data set copied with `cp -p`, `rsync -t`, a restored backup) would otherwise be
read through the old member table, silently returning wrong or torn samples. The fingerprint hashes the shard's
size and its first and last 64 KiB (the first member's header, the last members and the end-of-archive blocks); on
load the header of the middle member is also checked against the index, so a layout change between head and tail
is caught too. Three small reads per shard, and a copied data set keeps its indices.

Why our own header parser instead of `tarfile`: it touches only the 512-byte headers (one `pread` each), keeps
the members of a truncated or corrupt shard that are still complete, and lets a member whose data runs past the
end of the file be indexed so that reading it is reported as a bad sample (with shard and key) instead of
silently vanishing.

Index file layout (little endian): 8-byte magic, 8-byte header length, a JSON header (format version, shard
size, fingerprint, counts, array descriptors), then the raw arrays, each memory-mapped on load so that many worker
processes share one copy through the page cache:
  member_name  (M,) S<n>  raw member names (bytes; pax/GNU long names resolved)
  member_offset(M,) int64 offset of the member's data in the shard
  member_size  (M,) int64 size of the member's data
  sample_first (N+1,) int64 sample j owns members [sample_first[j], sample_first[j+1])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import threading

import numpy as np

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: keyed on a content fingerprint instead of size + mtime
_MAGIC = b"B3OTIDX1"
_BLOCK = 512
_KEY_RE = re.compile(rb"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "blip3o_jax", "tar_index")
_FINGERPRINT_BYTES = 64 * 1024


class TarIndexError(ValueError):
    """A shard that cannot be indexed at all (not a tar file, unreadable); the message names the shard."""


def fingerprint(fd: int, size: int) -> str:
    """sha1 of the shard's size and its first and last 64 KiB (two positioned reads)."""
    h = hashlib.sha1(str(size).encode())
    h.update(os.pread(fd, _FINGERPRINT_BYTES, 0))
    if size > _FINGERPRINT_BYTES:
        h.update(os.pread(fd, _FINGERPRINT_BYTES, max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES)))
    return h.hexdigest()


def split_member_name(name: bytes) -> tuple[bytes, str] | None:
    """`b"dir/abc.seg.png"` -> `(b"dir/abc", "seg.png")`; None for names without an extension."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).decode("utf-8", "replace").lower()


def _parse_octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = field[0] & 0x3F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _parse_octal(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
    return stored in (unsigned, signed)


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


@dataclasses.dataclass
class ScanResult:
    names: list
    offsets: list
    sizes: list
    truncated: bool
    problem: str | None


def scan_tar(fd: int, file_size: int) -> ScanResult:
    """Walks the tar headers of an open file with positioned reads (never reading member data)."""
    names, offsets, sizes = [], [], []
    pos = 0
    long_name = None
    pax: dict[bytes, bytes] = {}
    truncated, problem = False, None
    while True:
        header = os.pread(fd, _BLOCK, pos)
        if len(header) < _BLOCK:
            if header.strip(b"\0") and pos == 0:
                raise TarIndexError(f"not a tar file ({len(header)} bytes, less than one tar header)")
            if header.strip(b"\0"):
                truncated, problem = True, f"header at offset {pos} is cut off by the end of the file"
            elif pos == 0 and not header:
                problem = "empty file"
            break
        if header == b"\0" * _BLOCK:
            break  # end-of-archive marker
        if not _checksum_ok(header):
            if pos == 0:
                raise TarIndexError("not a tar file (bad header checksum at offset 0)")
            problem = f"corrupt header at offset {pos}; members after it are ignored"
            break
        size = _parse_octal(header[124:136])
        typeflag = header[156:157]
        data_offset = pos + _BLOCK
        next_pos = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if typeflag in (b"L", b"x", b"g", b"K"):
            data = os.pread(fd, size, data_offset)
            if len(data) < size:
                truncated, problem = True, f"extended header at offset {pos} is cut off by the end of the file"
                break
            if typeflag == b"L":
                long_name = data.split(b"\0", 1)[0]
            elif typeflag == b"x":
                pax = _parse_pax(data)
            pos = next_pos
            continue
        if typeflag in (b"0", b"\0", b"7"):  # regular files only: no dirs, links, devices
            if long_name is not None:
                name = long_name
            elif b"path" in pax:
                name = pax[b"path"]
            else:
                name = header[0:100].split(b"\0", 1)[0]
                if header[257:263] == b"ustar\0":  # POSIX prefix field (GNU format uses that area otherwise)
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
            if b"size" in pax:
                size = int(pax[b"size"])
                next_pos = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            names.append(name)
            offsets.append(data_offset)
            sizes.append(size)
            if data_offset + size > file_size:
                truncated, problem = True, f"member {name!r} is cut off by the end of the file"
                break
        long_name, pax = None, {}
        pos = next_pos
    return ScanResult(names, offsets, sizes, truncated, problem)


@dataclasses.dataclass
class TarIndex:
    """The index of one shard. Arrays may be memory-mapped (read-only)."""

    shard: str
    shard_size: int
    shard_mtime_ns: int
    fingerprint: str
    member_name: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray
    sample_first: np.ndarray
    truncated: bool = False
    problem: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.sample_first) - 1

    def __len__(self) -> int:
        return self.num_samples

    def sample_key(self, j: int) -> str:
        parts = split_member_name(bytes(self.member_name[self.sample_first[j]]))
        return parts[0].decode("utf-8", "replace") if parts else "?"

    def sample_members(self, j: int) -> list[tuple[str, int, int]]:
        """[(field, data offset, size)] of sample j, in tar order."""
        a, b = int(self.sample_first[j]), int(self.sample_first[j + 1])
        out = []
        for m in range(a, b):
            parts = split_member_name(bytes(self.member_name[m]))
            out.append((parts[1], int(self.member_offset[m]), int(self.member_size[m])))
        return out

    def members(self):
        """Yields (name, offset, size) for every indexed member (names decoded for display)."""
        for n, o, s in zip(self.member_name, self.member_offset, self.member_size):
            yield bytes(n).decode("utf-8", "replace"), int(o), int(s)


def _group(names: list[bytes]) -> tuple[list[int], list[int]]:
    """Keeps members with an extension and groups consecutive equal keys. Returns (kept member ids, sample starts)."""
    kept, first = [], []
    prev_key = None
    for i, name in enumerate(names):
        parts = split_member_name(name)
        if parts is None:
            continue
        if parts[0] != prev_key:
            first.append(len(kept))
            prev_key = parts[0]
        kept.append(i)
    first.append(len(kept))
    return kept, first


def build_index(shard: str) -> TarIndex:
    """Scans one shard (headers only) and returns its in-memory index; TarIndexError (naming the shard) if it is
    not a tar file at all or cannot be read."""
    try:
        fd = os.open(shard, os.O_RDONLY)
    except OSError as e:
        raise TarIndexError(f"{shard}: cannot read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        scan = scan_tar(fd, st.st_size)
        print_ = fingerprint(fd, st.st_size)
    except TarIndexError as e:
        raise TarIndexError(f"{shard}: {e}") from None
    except OSError as e:
        raise TarIndexError(f"{shard}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if scan.problem:
        log.warning("tar shard %s: %s", shard, scan.problem)
    kept, first = _group(scan.names)
    names = [scan.names[i] for i in kept]
    width = max([len(n) for n in names] + [1])
    return TarIndex(
        shard=shard,
        shard_size=st.st_size,
        shard_mtime_ns=st.st_mtime_ns,
        fingerprint=print_,
        member_name=np.array(names, dtype=f"S{width}"),
        member_offset=np.array([scan.offsets[i] for i in kept], np.int64),
        member_size=np.array([scan.sizes[i] for i in kept], np.int64),
        sample_first=np.array(first, np.int64),
        truncated=scan.truncated,
        problem=scan.problem,
    )


_ARRAYS = ("member_name", "member_offset", "member_size", "sample_first")


def save_index(index: TarIndex, path: str) -> None:
    """Writes atomically (temp file + rename) so concurrent processes never read half an index."""
    arrays = {k: np.ascontiguousarray(getattr(index, k)) for k in _ARRAYS}
    descr, offset = {}, 0
    for k, a in arrays.items():
        descr[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        offset += a.nbytes
    header = json.dumps({
        "version": INDEX_VERSION,
        "shard_size": index.shard_size,
        "shard_mtime_ns": index.shard_mtime_ns,
        "fingerprint": index.fingerprint,
        "truncated": index.truncated,
        "problem": index.problem,
        "arrays": descr,
    }).encode()
    header += b" " * (-(len(_MAGIC) + 8 + len(header)) % 64)  # 64-byte aligned array section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-idx-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for a in arrays.values():
                f.write(a.tobytes())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes it 0600: others sharing the data set could not read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (changing it races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _member_header_ok(fd: int, offset: int, size: int) -> bool:
    """Whether a valid tar header describing a member of `size` bytes sits right before `offset`."""
    header = os.pread(fd, _BLOCK, offset - _BLOCK)
    if len(header) < _BLOCK or not _checksum_ok(header):
        return False
    try:
        return _parse_octal(header[124:136]) == size
    except ValueError:
        return False


def load_index(path: str, shard: str) -> TarIndex | None:
    """Loads a stored index if it exists, is complete and well formed, and matches the shard's current content
    (size and fingerprint, plus the middle member's header); None otherwise, so that the caller rebuilds it. A
    truncated or damaged index file is treated like a missing one."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > file_size:
                return None
            header = json.loads(f.read(header_len))
        if header.get("version") != INDEX_VERSION:
            return None
        base = len(_MAGIC) + 8 + header_len
        descr = {k: header["arrays"][k] for k in _ARRAYS}
        for d in descr.values():
            if base + d["offset"] + int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize > file_size:
                return None  # truncated index file
        fd = os.open(shard, os.O_RDONLY)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:
        st = os.fstat(fd)
        if header["shard_size"] != st.st_size or header.get("fingerprint") != fingerprint(fd, st.st_size):
            return None
        arrays = {}
        for k, d in descr.items():
            shape = tuple(d["shape"])
            if int(np.prod(shape)) == 0:
                arrays[k] = np.zeros(shape, np.dtype(d["dtype"]))
            else:
                arrays[k] = np.memmap(path, dtype=np.dtype(d["dtype"]), mode="r", offset=base + d["offset"],
                                      shape=shape)
        n = len(arrays["member_offset"])
        first = arrays["sample_first"]
        if (len(arrays["member_name"]) != n or len(arrays["member_size"]) != n or len(first) < 1
                or first[0] != 0 or first[-1] != n):
            return None
        if n:
            m = n // 2
            if not _member_header_ok(fd, int(arrays["member_offset"][m]), int(arrays["member_size"][m])):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
    return TarIndex(shard=shard, shard_size=st.st_size, shard_mtime_ns=st.st_mtime_ns,
                    fingerprint=header["fingerprint"], truncated=header["truncated"], problem=header["problem"],
                    **arrays)


def index_path(shard: str, cache_dir: str | None) -> str:
    """Next to the shard (`<shard>.idx`) when cache_dir is None, else `<cache_dir>/<hash>-<name>.idx`."""
    if cache_dir is None:
        return shard + ".idx"
    digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{digest}-{os.path.basename(shard)}.idx")


_stats_lock = threading.Lock()
STATS = {"built": 0, "reused": 0}  # process-wide counters (tests check that a second run reuses the index)


def get_index(shard: str, cache_dir: str | None = None) -> TarIndex:
    """The shard's index: reused from its cache file when still valid, else built and stored.

    With cache_dir None the index goes next to the shard; if that directory is not writable it falls back to
    DEFAULT_CACHE_DIR (shards on read-only mounts).
    """
    candidates = [index_path(shard, cache_dir)]
    if cache_dir is None:
        candidates.append(index_path(shard, DEFAULT_CACHE_DIR))
    for path in candidates:
        index = load_index(path, shard)
        if index is not None:
            with _stats_lock:
                STATS["reused"] += 1
            return index
    index = build_index(shard)
    with _stats_lock:
        STATS["built"] += 1
    for path in candidates:
        try:
            save_index(index, path)
            break
        except OSError as e:
            log.info("cannot write tar index %s (%s); trying the next location", path, e)
    return index


def read_ranges(fd: int, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Positioned reads of (offset, size) ranges; one read covers ranges that are close together."""
    if not ranges:
        return []
    lo = min(o for o, _ in ranges)
    hi = max(o + s for o, s in ranges)
    if hi - lo <= sum(s for _, s in ranges) + 4 * _BLOCK * len(ranges):
        buf = os.pread(fd, hi - lo, lo)
        return [buf[o - lo : o - lo + s] for o, s in ranges]
    return [os.pread(fd, s, o) for o, s in ranges]
