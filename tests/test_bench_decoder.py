"""tools/bench_decoder.py (a smoke run of the side-by-side benchmark) and tools/aot_decoder.py (the decoders'
ahead-of-time plans) on tiny configs.

The benchmark's quick run checks the contract the README's table reads (the last line is one JSON object with a
`<piece>_speedup` per piece) and that ours and diffusers really ran the same weights (their outputs agree). The AOT
path compiles the tiny SANA decoder's three programs for 8 simulated CPU devices (no libtpu): the per-device memory
must agree with the shardings (the pipeline's arguments are exactly the parameter shards plus the input shards),
and the per-image FLOPs with the step and decode programs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench_decoder.py")
AOT = os.path.join(ROOT, "tools", "aot_decoder.py")
PIECES = ("unet_step", "vae_decode", "sana_step", "dcae_decode")


def _run(args: list[str], timeout: int = 300) -> tuple[str, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # the tools set their own device count
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_bench_quick_prints_speedups_of_the_same_weights():
    table, r = _run([BENCH, "--quick"])
    assert r["benchmark"] == "decoder" and r["quick"] is True
    assert r["jax_matmul_peak_gflops"] > 0 and r["torch_matmul_peak_gflops"] > 0
    for name in PIECES:
        piece = r[name]
        assert r[f"{name}_speedup"] == piece["speedup"] > 0, name
        assert piece["ours_s"] > 0 and piece["ref_s"] > 0 and piece["gflops_per_call"] > 0, name
        # same weights through convert.from_torch, fp32 on both sides
        assert piece["max_rel_diff_vs_ref"] < 1e-4, (name, piece["max_rel_diff_vs_ref"])
        assert name in table, name
    # the CFG batch of the denoisers, one image for the decoders
    assert r["unet_step"]["config"]["latent"][0] == r["sana_step"]["config"]["latent"][0] == 2
    assert r["vae_decode"]["config"]["latent"][0] == r["dcae_decode"]["config"]["latent"][0] == 1


def test_aot_plan_of_the_tiny_sana_decoder_on_cpu_devices(tmp_path):
    table, r = _run([AOT, "--decoder", "sana", "--preset", "tiny", "--platform", "cpu", "--num_devices", "8",
                     "--mesh", "data=2,fsdp=4", "--batch", "2", "--steps", "3", "--dtype", "float32"])
    assert r["platform"] == "cpu" and r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["steps"] == 3 and r["batch"] == 2 and r["denoiser_batch"] == 4 and r["latent"] == [2, 2, 8]
    assert set(r["programs"]) == {"pipeline", "step", "decode"}
    for word in ("pipeline", "step", "decode", "peak", "params"):
        assert word in table, word
    # XLA's buffer assignment agrees with the shardings: the pipeline's arguments are the shards of the SANA params
    # and of the DC-AE decoder's (jit drops the unused encoder), the noise and both feature tensors (batch 2 over
    # data=2: one row each) and the guidance scale
    parts = r["params_bytes_per_device"]
    f32 = 4
    inputs = f32 * (1 * 2 * 2 * 8 + 2 * 1 * 64 * 24 + 1)
    assert r["programs"]["pipeline"]["memory_per_device"]["arguments"] == parts["denoiser"] + parts["vae_decoder"] + inputs
    # fsdp=4 shards the large matrices: a device holds well under all the parameters
    assert parts["denoiser"] < 0.6 * f32 * r["params"]["denoiser"]
    # the per-image FLOPs are steps x one CFG step + one decode, over the batch
    step, decode = r["programs"]["step"], r["programs"]["decode"]
    assert step["hlo_flops_per_device"] > 0 and decode["hlo_flops_per_device"] > 0
    want = r["devices"] * (3 * step["hlo_flops_per_device"] + decode["hlo_flops_per_device"]) / 2
    assert abs(r["hlo_flops_per_image"] - want) <= 1e-5 * want
    assert r["fits"] is None and r["estimated_s_per_image"] is None  # no HBM, no cost model on CPU
    # the saved output renders as a row of the docs' Markdown table
    saved = tmp_path / "sana_tiny.log"
    saved.write_text(table + "\n" + json.dumps(r) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, AOT, "--markdown", str(saved)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.strip().splitlines()
    assert rows[0].startswith("| decoder | px | steps |") and len(rows) == 3
    assert rows[2].startswith("| sana | 64 | 3 | cpu x8 (8) | 2 |")
