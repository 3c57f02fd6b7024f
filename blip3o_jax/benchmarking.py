"""Timing helpers shared by `tools/bench_*.py`: warm-up, median of runs, the machine's matmul peak and memory
bandwidth."""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_it(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 5, sync: Callable[[Any], Any] = block) -> dict:
    """Runs `fn` `warmup` times (the first is reported as compile/first-call time), then `iters` timed runs."""
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "runs": iters}


def paired_times(ours_fn: Callable[[], Any], ref_fn: Callable[[], Any], iters: int, *,
                 sync: Callable[[Any], Any] = block) -> dict:
    """Ours against a reference: one first call of each (compile / warm-up, reported), then `iters` rounds that
    alternate them, so that load changes on a shared machine hit both alike. Medians of each, and the median of the
    per-round ratios reference / ours (> 1: ours is faster)."""
    t0 = time.perf_counter()
    sync(ours_fn())
    first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    sync(ref_fn())
    first_ref = time.perf_counter() - t0
    ours, ref = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(ours_fn())
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sync(ref_fn())
        ref.append(time.perf_counter() - t0)
    return {"ours_s": statistics.median(ours), "ref_s": statistics.median(ref),
            "ratio": statistics.median([r / o for o, r in zip(ours, ref)]),
            "ours_first_call_s": first_ours, "ref_first_call_s": first_ref}


def jax_matmul_peak(n: int = 2048, dtype=jnp.float32, iters: int = 5) -> float:
    """Achieved FLOP/s of an n^3 matmul in JAX on the default device: the hardware's practical peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = time_it(lambda: f(a, b), warmup=2, iters=iters)
    return 2 * n**3 / t["median_s"]


class BandwidthMeter:
    """Achieved read bandwidth (bytes/s) of the default device, sampled through a run: a jitted sum over an fp32
    array of `nbytes`, far larger than the caches (the bound of a step that must read that many bytes once). Each
    `sample()` is the median of `iters` sums. On a shared machine the rate moves from minute to minute (23-48 GB/s
    within one hour on our 2-core test machine), so a bench samples it next to its timed rounds and bounds them
    with the median of all samples (`median()`), not with one reading taken at another moment."""

    def __init__(self, nbytes: int = 512 << 20, iters: int = 3):
        self.x = jnp.ones((nbytes // 4,), jnp.float32)
        self.f = jax.jit(jnp.sum)
        self.iters = iters
        self.samples: list[float] = []
        block(self.f(self.x))  # compile and first touch: not a sample

    def sample(self) -> float:
        times = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            block(self.f(self.x))
            times.append(time.perf_counter() - t0)
        self.samples.append(self.x.nbytes / statistics.median(times))
        return self.samples[-1]

    def median(self) -> float:
        return statistics.median(self.samples)

    def release(self) -> None:
        """Frees the array (the samples stay)."""
        self.x = None


def torch_matmul_peak(n: int = 2048, iters: int = 5, dtype=None, device=None) -> float:
    """Achieved FLOP/s of an n^3 matmul in PyTorch (`dtype`, `device`: torch's defaults, fp32 on the CPU, unless
    given; on CUDA each run is synchronised before the clock is read)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    on_cuda = a.device.type == "cuda"
    t = time_it(lambda: a @ b, warmup=2, iters=iters, sync=lambda x: torch.cuda.synchronize() if on_cuda else x)
    return 2 * n**3 / t["median_s"]


def emit(result: dict) -> None:
    """Prints the benchmark's result as its last line: one JSON object."""
    def clean(v):
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        if isinstance(v, float):
            return float(f"{v:.6g}")
        return v

    from blip3o_jax import hostmem

    result = {**result, "host_malloc": hostmem.state()}  # glibc's thresholds in this process (both sides')
    print(json.dumps(jax.tree.map(clean, result), sort_keys=False), flush=True)


def add_accelerator_flags(parser, gpu_preset: dict, dtype_help: str) -> None:
    """The --dtype / --attention / --preset flags of the argparse benches (tools/gpu_check.sh sets them)."""
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=dtype_help)
    parser.add_argument("--attention", choices=["xla", "cudnn"], default="xla",
                        help="ours' attention kernel (attention_impl): xla, or cudnn (GPU flash attention, bf16 only)")
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                        help="size preset: cpu (the defaults above) or gpu (" +
                             ", ".join(f"{k} {v}" for k, v in gpu_preset.items()) + "); flags given explicitly win")


def add_profile_flags(parser) -> None:
    """`--profile DIR` / `--profile_calls N` of the argparse benches (see `blip3o_jax.profiling`)."""
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write per-op profiles of ours and the reference to DIR (traces, optimised HLO, per-op "
                             "tables by kind), taken after the timed runs: the timings are unaffected")
    parser.add_argument("--profile_calls", "--profile-calls", type=int, default=3,
                        help="profiled calls per run with --profile")


def parse_with_preset(parser, argv, gpu_preset: dict):
    """`parser.parse_args(argv)`, parsed again over `gpu_preset`'s defaults with `--preset gpu` (explicit flags win)."""
    a = parser.parse_args(argv)
    if a.preset == "gpu":
        parser.set_defaults(**gpu_preset)
        a = parser.parse_args(argv)
    return a
