"""The compiled CPU kernels (blip3o_jax/kernels): the few-row matmul against float64 NumPy on both instruction-set
paths, its gradient and vmap, where `layers.matmul_out_in` uses it, and the build's failure modes."""
import json
import os
import platform
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax import kernels
from blip3o_jax.models import layers
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")
# the kernel is written for x86-64; on other machines matmul_out_in uses XLA's dot (the other tests cover it)
pytestmark = pytest.mark.skipif(not X86, reason="the CPU kernel is x86-64 only")

# (rows, in, out): every row count the kernel keeps in registers and beyond (groups of 8), reductions that are not a
# multiple of 32 or 16 (the masked / scalar tails), one output, and weights large enough to split over threads
SHAPES = [(1, 768, 256), (2, 64, 3), (3, 100, 37), (4, 768, 2048), (5, 33, 1000), (6, 16, 9), (7, 1, 5),
          (8, 2048, 768), (11, 48, 130), (4, 768, 32000)]


def _check_shapes(shapes):
    rng = np.random.default_rng(0)
    fn = jax.jit(kernels.few_row_matmul)
    errs = []
    for rows, k, n in shapes:
        x = rng.standard_normal((rows, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        errs.append(rel_err(fn(x, w), x.astype(np.float64) @ w.T.astype(np.float64)))
    return errs


def test_kernel_builds_here():
    # the machines this suite runs on have a C++ compiler and AVX2 at least: a build failure must fail, not hide
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.isa() in ("avx512", "avx2")


def test_few_row_matmul_matches_float64():
    errs = _check_shapes(SHAPES)
    assert max(errs) < 2e-6, dict(zip(SHAPES, errs))


def test_avx2_path_and_switch_off_in_fresh_processes():
    # the instruction set is chosen once per process: run the AVX2 path, and the switched-off kernel, in their own
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import numpy as np, jax
        from blip3o_jax import kernels
        from blip3o_jax.models import layers
        out = {{"available": kernels.available(), "isa": kernels.isa(), "reason": kernels.unavailable_reason()}}
        if out["available"]:
            import test_kernels
            out["errs"] = test_kernels._check_shapes(test_kernels.SHAPES)
        x = np.random.default_rng(1).standard_normal((4, 40)).astype(np.float32)
        w = np.random.default_rng(2).standard_normal((9, 40)).astype(np.float32)
        out["matmul_out_in_err"] = float(np.abs(np.asarray(jax.jit(layers.matmul_out_in)(x, w)) - x @ w.T).max())
        out["custom_call"] = "ffi_call" in str(jax.make_jaxpr(layers.matmul_out_in)(x, w))
        print(json.dumps(out))
    """)
    results = {}
    for name, env in (("avx2", {kernels.ISA_ENV: "avx2"}), ("off", {kernels.DISABLE_ENV: "0"})):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    avx2, off = results["avx2"], results["off"]
    assert avx2["available"] and avx2["isa"] == "avx2", avx2
    assert max(avx2["errs"]) < 2e-6, avx2["errs"]
    assert avx2["custom_call"] and avx2["matmul_out_in_err"] < 1e-4
    assert not off["available"] and kernels.DISABLE_ENV in off["reason"], off
    assert not off["custom_call"] and off["matmul_out_in_err"] < 1e-4


def test_gradient_and_vmap_match_xla():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    w = rng.standard_normal((50, 96)).astype(np.float32)
    g = rng.standard_normal((4, 50)).astype(np.float32)

    def loss(mm, x, w):
        return jnp.sum(mm(x, w) * g)

    ours = jax.grad(lambda x, w: loss(kernels.few_row_matmul, x, w), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(lambda a, b: a @ b.T, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(ours, want):
        assert rel_err(a, b) < 1e-6
    xs = rng.standard_normal((3, 2, 96)).astype(np.float32)
    got = jax.jit(jax.vmap(kernels.few_row_matmul, in_axes=(0, None)))(xs, w)
    assert rel_err(got, np.einsum("brk,nk->brn", xs.astype(np.float64), w.astype(np.float64))) < 2e-6


def test_matmul_out_in_uses_the_kernel_for_few_fp32_rows_only():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 64)).astype(np.float32)

    def uses_kernel(x, weight=w):
        return "blip3o_few_row_matmul" in str(jax.make_jaxpr(layers.matmul_out_in)(x, weight))

    for rows in (1, kernels.MAX_ROWS):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        assert uses_kernel(x)
        assert rel_err(jax.jit(layers.matmul_out_in)(x, w), x.astype(np.float64) @ w.T) < 2e-6
    assert not uses_kernel(rng.standard_normal((kernels.MAX_ROWS + 1, 64)).astype(np.float32))
    assert not uses_kernel(jnp.ones((2, 64), jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    with pytest.raises(ValueError, match="fp32 only"):
        kernels.few_row_matmul(jnp.ones((2, 64), jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"expected x \(rows, in\) and w \(out, in\)"):
        kernels.few_row_matmul(np.ones((2, 63), np.float32), w)


def test_build_is_cached_and_failures_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    path = kernels.build()
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    mtime = os.stat(path).st_mtime_ns
    assert kernels.build() == path and os.stat(path).st_mtime_ns == mtime  # reused, not rebuilt
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith(".")] == []  # no temporary left behind

    # a damaged library in the cache (say, a disk that filled up under another tool) is built again on load
    with open(path, "wb") as f:
        f.write(b"not a shared library")
    lib, isa = kernels._open()
    assert isa in ("avx512", "avx2") and os.path.getsize(path) > 1000

    # a compiler that fails: a clear error, nothing half-written in the cache
    fake = tmp_path / "bad-cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo bad 1.0; exit 0; }\necho 'x.cc:1: error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache2"))
    with pytest.raises(kernels.KernelUnavailable, match="compiling few_row_matmul.cc failed: x.cc:1: error: broken"):
        kernels.build()
    assert os.listdir(tmp_path / "cache2") == []

    # a cache directory others can write is refused (a library loaded from it would run as us)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.delenv("CXX")
    monkeypatch.setenv(kernels.CACHE_ENV, str(shared))
    with pytest.raises(kernels.KernelUnavailable, match="writable by another user"):
        kernels.build()


def test_a_cache_that_cannot_be_written_leaves_xla_and_one_line(tmp_path):
    # in a fresh process: available() is decided once per process
    blocker = tmp_path / "file"
    blocker.write_text("")
    script = textwrap.dedent("""
        import json, logging, numpy as np, jax
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from blip3o_jax import kernels
        from blip3o_jax.models import layers
        x, w = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32)
        y = np.asarray(jax.jit(layers.matmul_out_in)(x, w))
        print(json.dumps({"available": kernels.available(), "reason": kernels.unavailable_reason(),
                          "y": y.tolist()}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", kernels.CACHE_ENV: str(blocker / "sub")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["available"] and out["y"] == [[8.0] * 3] * 2
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING CPU decode kernel unavailable")]
    assert len(warnings) == 1, proc.stderr[-2000:]
