"""Host memory: glibc's malloc settings for programs that run XLA on the CPU.

XLA:CPU allocates each execution's temporary buffer afresh, as one block (the 44M-parameter DiT's train step in
`tools/bench_dit.py`: 955 MB; the SDXL-architecture UNet step in `tools/bench_decoder.py`: 73 MB). glibc serves a
block above its mmap threshold (which it raises by itself to at most 32 MB) with a fresh `mmap` and gives it back with
`munmap` on free, so every call page-faults, and the kernel zeroes, every page the program touches: ~0.4 ms per MB
on the 2-core machine of docs/benchmarks.md. `keep_freed_memory` raises glibc's mmap and trim thresholds, so such
blocks come from the heap and stay there for the next call (what PyTorch's and jemalloc's caching allocators do for
their own tensors). Peak memory is unchanged; memory freed after the peak is kept by the process instead of returned.

Every CLI (`blip3o_jax.cli.run`) and every `tools/bench_*.py` calls it first. A user's own `MALLOC_*` variables or
`GLIBC_TUNABLES`, a preloaded jemalloc / tcmalloc / mimalloc, or `BLIP3O_MALLOC=default` leave glibc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# the largest value mallopt takes (a C int): blocks up to 2 GiB come from the heap
THRESHOLD = (1 << 31) - 1

_state: str | None = None


def keep_freed_memory(threshold: int = THRESHOLD) -> str:
    """Raises glibc's mmap and trim thresholds to `threshold` bytes (once per process). Returns what happened:
    "set", or why nothing was changed."""
    global _state
    if _state is not None:
        return _state
    _state = _decide(threshold)
    return _state


def _decide(threshold: int) -> str:
    if not 0 < threshold <= THRESHOLD:
        raise ValueError(f"threshold must be in (0, {THRESHOLD}], got {threshold}")
    if os.environ.get("BLIP3O_MALLOC", "").strip().lower() == "default":
        return "unchanged (BLIP3O_MALLOC=default)"
    if not sys.platform.startswith("linux"):
        return f"unchanged ({sys.platform})"
    if any(v in os.environ for v in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "unchanged (the user's MALLOC_* / GLIBC_TUNABLES settings)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return "unchanged (another allocator is preloaded)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    if not (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
            and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold))):
        return "unchanged (mallopt refused)"
    return "set"


def state() -> str:
    """What `keep_freed_memory` did in this process ("not requested" when it was not called)."""
    return _state or "unchanged (not requested)"
