"""tools/bench_vision.py on tiny towers: a smoke run of the EVA-CLIP and SigLIP comparisons. Checks the contract the
docs read (the last line is one JSON object with each tower's `speedup_median_of_rounds`) and that both sides ran
the same weights on the same images, so the ratio compares the same work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench_vision.py")


def test_bench_vision_tiny_prints_speedups_of_the_same_outputs():
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as the benchmark measures
    args = ["--width", "64", "--depth", "2", "--head_width", "32", "--image_size", "56", "--patch", "14", "--batch",
            "2", "--iters", "2", "--siglip_depth", "2", "--siglip_mlp", "128", "--siglip_image_size", "64"]
    proc = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bench"] == "vision" and r["batch"] == 2
    assert r["eva"]["config"]["depth"] == 2 and r["siglip"]["config"] == {
        "width": 64, "depth": 2, "mlp": 128, "image": 64, "patch": 16, "tokens": 16}
    for tower in ("eva", "siglip"):
        t = r[tower]
        assert t["max_rel_diff_vs_ref"] < 1e-4, (tower, t["max_rel_diff_vs_ref"])
        assert t["speedup_median_of_rounds"] > 0 and t["ours_images_per_s"] > 0 and t["ref_images_per_s"] > 0
        assert 0 < t["ours_frac_of_jax_peak"] and 0 < t["ref_frac_of_torch_peak"]
