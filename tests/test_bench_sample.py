"""tools/bench_sample.py --quick: a smoke run of the end-to-end text-to-image benchmark (ours vs the PyTorch
composition of the same tiny release). Checks the contract the docs read (the last line is one JSON object with
`t2i_speedup`) and that both sides really produced the same images (same weights, same noise), so the ratio
compares the same work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench_sample.py")


def test_bench_sample_quick_prints_the_t2i_speedup_of_the_same_images():
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as the benchmark measures
    proc = subprocess.run([sys.executable, BENCH, "--quick"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    table = "\n".join(lines[:-1])
    assert r["benchmark"] == "sample_t2i" and r["quick"] is True and r["batch"] == 2
    assert r["dit_steps"] == r["decoder_steps"] == 2
    assert r["t2i_speedup"] > 0 and r["ours_images_per_s"] > 0 and r["ref_images_per_s"] > 0
    assert abs(r["t2i_speedup"] - r["ours_images_per_s"] / r["ref_images_per_s"]) <= 1e-3 * r["t2i_speedup"]
    assert abs(r["ours_images_per_s"] * r["ours_s_per_call"] - r["batch"]) <= 1e-3 * r["batch"]
    # the same pixels on both sides (the test_sample parity bound): the timings compare the same pipeline
    assert r["mean_abs_diff_grey_levels"] <= 1.0
    assert "speed-up" in table and "ours" in table and "ref" in table
