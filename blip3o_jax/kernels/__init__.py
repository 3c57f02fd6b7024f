"""Compiled CPU kernels, registered with XLA as FFI custom calls.

One kernel so far: `few_row_matmul(x, w)`, `x @ w.T` for a few-row fp32 `x` (rows, in) and a weight in torch's
(out, in) layout, the product a greedy decode step is made of (`layers.matmul_out_in` calls it on a CPU for at
most `MAX_ROWS` rows). It streams each weight row once for every row of `x`, with a software prefetch into the
last-level cache 8 KB ahead, and splits the weight's rows over XLA's intra-op threads; at 4 rows it reads the
weights at the memory's stream rate, where XLA:CPU's GEMM reads them at ~2/3 of it (docs/benchmarks.md).

The source (`few_row_matmul.cc`) is compiled at first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`) against the XLA FFI headers that jaxlib ships, into a per-user cache directory, and loaded from
there afterwards (the file name carries a hash of the source, the jaxlib version and the compiler). One binary
serves AVX-512 and AVX2 CPUs, chosen at run time. Where the kernel cannot be used (not x86-64, no AVX2, no
compiler, a failed build) `available()` is False, the reason is logged once, and callers use XLA's dot: the same
math, only slower.

Environment:
- `BLIP3O_CPU_KERNELS=0` turns the kernels off (XLA's dot everywhere);
- `BLIP3O_KERNEL_CACHE=DIR` where the built library goes (default `$XDG_CACHE_HOME/blip3o_jax/kernels`, i.e.
  `~/.cache/blip3o_jax/kernels`);
- `BLIP3O_CPU_KERNEL_ISA=avx2` caps the instruction set (the tests run both paths on an AVX-512 machine).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

DISABLE_ENV = "BLIP3O_CPU_KERNELS"
CACHE_ENV = "BLIP3O_KERNEL_CACHE"
ISA_ENV = "BLIP3O_CPU_KERNEL_ISA"
ISAS = {"none": 0, "avx2": 1, "avx512": 2}

# at most this many rows of x go to the kernel: it reads the weight once per 8 rows, and from ~16 rows on XLA's
# GEMM is as fast (docs/benchmarks.md)
MAX_ROWS = 8

TARGET = "blip3o_few_row_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "few_row_matmul.cc")
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type")

_lock = threading.Lock()
_state: dict = {}


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (the message says why). `expected`: by design (switched
    off, another architecture or instruction set), logged at INFO; otherwise a failure, logged as a warning."""

    def __init__(self, message: str, expected: bool = False):
        super().__init__(message)
        self.expected = expected


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C++ compiler found (set CXX, or install g++)")


def cache_dir() -> str:
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "blip3o_jax", "kernels")
    return root


def _private_dir(path: str) -> str:
    """`path`, created owner-only if missing; refuses a directory another user owns or can write (a library loaded
    from there runs as us)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise KernelUnavailable(f"kernel cache {path} is owned or writable by another user; set {CACHE_ENV}")
    return path


def build(force: bool = False) -> str:
    """Compiles `few_row_matmul.cc` into the cache (if not there yet) and returns the library's path."""
    cxx = _compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256(b"\0".join([source, jax.lib.__version__.encode(), version.encode(), cxx.encode(),
                                      " ".join(CXXFLAGS).encode()])).hexdigest()[:16]
    out_dir = _private_dir(cache_dir())
    out = os.path.join(out_dir, f"few_row_matmul-{key}.so")
    if os.path.exists(out) and not force:
        return out
    fd, tmp = tempfile.mkstemp(prefix=".few_row_matmul-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    log.info("building the CPU decode kernel: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
            raise KernelUnavailable(f"compiling {os.path.basename(SOURCE)} failed: {first}")
        os.replace(tmp, out)  # atomic: concurrent builders each rename a complete library
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling {os.path.basename(SOURCE)} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _open():
    """Builds (if needed) and loads the library: (ctypes library, "avx512" | "avx2"). Registers nothing."""
    path = build()
    try:
        lib = ctypes.CDLL(path)
    except OSError:  # a damaged file in the cache (the build itself only ever renames complete ones): build again
        log.warning("could not load %s; building it again", path)
        path = build(force=True)
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise KernelUnavailable(f"loading {path} failed: {e}") from e
    try:
        lib.blip3o_few_row_matmul_isa.restype = ctypes.c_int
    except AttributeError as e:
        raise KernelUnavailable(f"{path} is not the few-row kernel: {e}") from e
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want:
        if want not in ISAS:
            raise ValueError(f"{ISA_ENV}={want!r}: expected one of {sorted(ISAS)}")
        lib.blip3o_few_row_matmul_force_isa(ctypes.c_int(ISAS[want]))
    isa = lib.blip3o_few_row_matmul_isa()
    if isa == 0:
        raise KernelUnavailable("this CPU has neither AVX-512F nor AVX2 with FMA", expected=True)
    return lib, {v: k for k, v in ISAS.items()}[isa]


def _load():
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        raise KernelUnavailable(f"turned off by {DISABLE_ENV}", expected=True)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"written for x86-64, this is {platform.machine()}", expected=True)
    lib, isa_name = _open()
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Blip3oFewRowMatmul), platform="cpu")
    return lib, isa_name


def available() -> bool:
    """Whether `few_row_matmul` can run here (builds and registers the kernel on the first call)."""
    with _lock:
        if "ok" not in _state:
            try:
                _state["lib"], _state["isa"] = _load()
                _state["ok"] = True
            except (KernelUnavailable, OSError) as e:  # OSError: the cache directory cannot be made or written
                _state["ok"], _state["reason"] = False, str(e)
                expected = getattr(e, "expected", False)
                (log.info if expected else log.warning)("CPU decode kernel unavailable, using XLA's dot: %s", e)
        return _state["ok"]


def isa() -> str | None:
    """The instruction set the kernel runs ("avx512" or "avx2"), or None where it is unavailable."""
    return _state.get("isa") if available() else None


def unavailable_reason() -> str | None:
    return None if available() else _state.get("reason")


def applies(rows: int, dtype) -> bool:
    """Whether a (rows, in) x (out, in) product of `dtype` runs on the kernel in this process (a CPU backend, fp32,
    at most `MAX_ROWS` rows, and the kernel available)."""
    return (rows <= MAX_ROWS and np.dtype(dtype) == np.float32 and jax.default_backend() == "cpu"
            and available())


def _ffi(x, w):
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32),
                            vmap_method="sequential")(x, w)


@jax.custom_vjp
def _few_row_matmul(x, w):
    return _ffi(x, w)


def _fwd(x, w):
    return _ffi(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    return jnp.dot(g, w), jnp.dot(g.T, x)


_few_row_matmul.defvjp(_fwd, _bwd)


def few_row_matmul(x, w):
    """`x @ w.T` for fp32 `x` (rows, in) and `w` (out, in), on the CPU kernel (differentiable: the backward is
    XLA's). Raises `KernelUnavailable` where `available()` is False."""
    if not available():
        raise KernelUnavailable(_state.get("reason", "unavailable"))
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"few_row_matmul: expected x (rows, in) and w (out, in), got {x.shape} and {w.shape}")
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"few_row_matmul: fp32 only, got {x.dtype} and {w.dtype}")
    return _few_row_matmul(x, w)
