"""blip3o-plan (blip3o_jax/plan.py, run here through its tools/aot_compile.py shim): ahead-of-time compilation of
the real train step and its per-device plan.

The CPU path (8 simulated devices, no libtpu) runs in CI: the table and the JSON line are checked against what
the shardings imply (arguments = state + frozen params + batch shard, the donated state aliased by the outputs)
and the HLO FLOPs against the analytic model FLOPs. The TPU path compiles for a v5e 2x2 topology with libtpu
on this CPU; it carries the `tpu` marker, deselected by default (pytest.ini): run it with `pytest -m tpu` where
libtpu is importable, or with BLIP3O_TPU_PYTHON pointing at an interpreter that has it (`pip install -e .[tpu]`
in a separate venv).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
# the tiny config at one layer per tower: one compile, no cost extrapolation needed
SMALL = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.model.dit.n_layers=1",
         "--config.model.backbone.num_hidden_layers=1"]


def _run(python: str, args: list[str], timeout: int = 300) -> tuple[str, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([python, TOOL, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_cpu_plan_of_the_tiny_config(tmp_path):
    table, r = _run(sys.executable, [*SMALL, "--platform", "cpu", "--num_devices", "8", "--mesh", "data=2,fsdp=4"])
    # the saved output renders as a row of the README's Markdown table
    saved = tmp_path / "tiny_cpu.log"
    saved.write_text(table + "\n" + json.dumps(r) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, TOOL, "--markdown", str(saved), str(saved)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.strip().splitlines()
    assert rows[0].startswith("| config | topology") and len(rows) == 4  # header, rule, one row per file
    assert rows[2].startswith("| tiny | cpu x8 (8) | data=2,fsdp=4,tensor=1 |") and rows[2] == rows[3]
    assert "tiny on cpu x8" in table and "mesh data=2 fsdp=4 tensor=1" in table
    for word in ("arguments", "outputs", "temporaries", "peak", "FLOPs"):
        assert word in table, word
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["query_path"] == "prefix_cache" and r["trainable"] == ["dit", "latent_queries"]
    mem, parts = r["memory_per_device"], r["params_bytes_per_device"]
    # XLA's buffer assignment agrees with the shardings: every argument is a shard of the state, frozen params or
    # batch; the new state reuses the donated state's buffers
    assert mem["arguments"] == parts["trainable+optimizer"] + parts["frozen"] + parts["batch"]
    assert mem["aliased"] == parts["trainable+optimizer"]
    assert mem["peak"] >= mem["arguments"] + mem["temporaries"]
    # fsdp=4 shards the params: a device holds well under the whole trainable state (fp32 params + 2 moments)
    assert parts["trainable+optimizer"] < 0.5 * _whole_state_bytes()
    per_device_model = r["model_flops_per_step"] / r["devices"]
    assert 0.8 * per_device_model < r["hlo_flops_per_device"] < 3 * per_device_model
    assert r["estimated_step_s"] is None and r["fits"] is None  # no HBM, no TPU cost model on CPU


def test_cost_per_tower_of_an_extrapolated_plan():
    """`--cost extrapolate` (the default) with a scanned tower: the step's HLO FLOPs and bytes split into each
    scanned tower's layers (one layer's cost from the 1- and 2-layer unrolled programs, times the depth) and the
    rest, which sum to the whole; the table prints them with each tower's roofline."""
    from blip3o_jax import plan as plan_lib

    table, r = _run(sys.executable, [*SMALL, "--config.model.backbone.num_hidden_layers=2",
                                     "--config.model.backbone.scan_layers=True", "--platform", "cpu",
                                     "--num_devices", "8", "--device_spec", "hbm_gib=1,peak_tflops=1,hbm_gbps=10"])
    assert r["cost_source"] == "unrolled, extrapolated from 1 and 2 layers of backbone (x2)"
    parts = r["cost_by_tower"]
    assert set(parts) == {"backbone", "rest"} and parts["backbone"]["layers"] == 2
    for key, total in (("flops", r["hlo_flops_per_device"]), ("bytes accessed", r["hlo_bytes_accessed_per_device"])):
        assert all(p[key] > 0 for p in parts.values()), key
        assert abs(sum(p[key] for p in parts.values()) - total) <= 1e-4 * total, key
    # two layers of 2 x (weights) x tokens per device in the forward alone: the backbone's share is at least that
    assert parts["backbone"]["flops"] > 0.5 * r["model_flops_per_sample"]["backbone"] * r["global_batch"] / 8
    rows = {row["tower"]: row for row in plan_lib.tower_breakdown(r)}
    assert rows["backbone"]["bound_by"] in ("compute", "HBM") and rows["backbone"]["estimated_s"] is None
    assert "per tower" in table and "backbone x2" in table and "rest" in table


def test_tower_breakdown_arithmetic():
    """A TPU plan's per-tower rows: XLA's seconds and share of the step, each tower's own roofline and bound, and
    its model FLOPs' MFU at XLA's estimate (v5p: 459 TFLOP/s, 2765 GB/s per chip, one device per chip)."""
    from blip3o_jax import plan as plan_lib

    chip = {"name": "TPU v5p", "peak_flops": 459e12, "hbm_gbps": 2765, "hbm_gib": 95}
    r = {"devices": 64, "chips": 64, "chip_spec": chip, "global_batch": 512, "estimated_step_s": 0.5,
         "model_flops_per_sample": {"gen_encoder": 9e12, "dit": 0.5e12, "total": 9.5e12},
         "cost_by_tower": {
             "gen_encoder": {"flops": 80e12, "bytes accessed": 100e9, "optimal_seconds": 0.3, "layers": 64},
             "dit": {"flops": 8e12, "bytes accessed": 200e9, "optimal_seconds": 0.15, "layers": 24},
             "rest": {"flops": 1e12, "bytes accessed": 50e9, "optimal_seconds": 0.05}}}
    rows = {row["tower"]: row for row in plan_lib.tower_breakdown(r)}
    enc, dit, rest = rows["gen_encoder"], rows["dit"], rows["rest"]
    assert enc["share"] == 0.3 / 0.5 and dit["share"] == 0.15 / 0.5 and enc["layers"] == 64
    # encoder: compute 80e12 / 459e12 = 0.174 s > HBM 100e9 / 2765e9 = 0.036 s
    assert enc["bound_by"] == "compute" and abs(enc["roofline_s"] - 80e12 / 459e12) < 1e-9
    # DiT: HBM 200e9 / 2765e9 = 0.072 s > compute 8e12 / 459e12 = 0.017 s
    assert dit["bound_by"] == "HBM" and abs(dit["roofline_s"] - 200e9 / 2765e9) < 1e-9
    # MFU: model FLOPs per device (9e12 x 512 / 64) over (peak x the tower's estimated seconds)
    assert abs(enc["mfu"] - 9e12 * 512 / 64 / (459e12 * 0.3)) < 1e-12 and rest["mfu"] is None
    assert plan_lib.tower_breakdown({**r, "cost_by_tower": None}) == []


def _whole_state_bytes() -> int:
    import jax
    import numpy as np

    from blip3o_jax import cli
    from blip3o_jax import sharding as shd
    from blip3o_jax.training import step as step_lib

    config = cli.load_config(SMALL[1], {"model.dit.n_layers": 1, "model.backbone.num_hidden_layers": 1})
    setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(setup.abstract_state))


def _tpu_python() -> str | None:
    override = os.environ.get("BLIP3O_TPU_PYTHON")
    if override:
        return override
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.mark.tpu
def test_tpu_plan_of_the_tiny_config():
    python = _tpu_python()
    assert python is not None, ("libtpu is not installed here (pip install -e .[tpu]) and BLIP3O_TPU_PYTHON is not "
                                "set; this test runs only with -m tpu")
    table, r = _run(python, [*SMALL, "--topology", "v5e:2x2", "--mesh", "data=-1"], timeout=600)
    assert r["platform"] == "tpu" and r["chips"] == 4 and r["chip"] == "TPU v5e"
    assert r["fits"] is True and abs(r["hbm_per_device"] - 16 * 1024**3) < 1e5  # (JSON: 6 significant digits)
    assert r["estimated_step_s"] > 0 and 0 < r["implied_mfu"] < 1
    mem, parts = r["memory_per_device"], r["params_bytes_per_device"]
    assert mem["arguments"] >= parts["trainable+optimizer"] + parts["frozen"]
    assert "XLA estimate" in table and "fits" in table


def test_roofline_and_markdown_of_a_tpu_plan(tmp_path):
    """The roofline columns of a saved TPU plan: max(HLO FLOPs / peak, HLO bytes / HBM bandwidth) per chip, and the
    MFU bound (through the CLI: importing the tool must not be needed, and must not leak TPU variables)."""
    GiB = 1024**3
    r = {"config": "x", "platform": "tpu", "topology": "v6e:8x8", "devices": 64, "chips": 64, "chip": "TPU v6e",
         "mesh": {"data": 1, "fsdp": 64, "tensor": 1}, "remat": "full", "hbm_per_device": 32 * GiB, "fits": True,
         "memory_per_device": {"peak": 4 * GiB}, "hlo_flops_per_device": 91.8e12,
         "hlo_bytes_accessed_per_device": 328e9, "model_flops_per_step": 64 * 45.9e12,
         "estimated_step_s": None, "implied_mfu": None, "estimated_samples_per_s": None}
    saved = tmp_path / "plan.log"
    saved.write_text("(the table)\n" + json.dumps(r) + "\n")
    proc = subprocess.run([sys.executable, TOOL, "--markdown", str(saved)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # compute 91.8e12 / 918e12 = 0.1 s < HBM 328e9 / 1640e9 = 0.2 s: HBM-bound, MFU <= 45.9 / (918 x 0.2) = 25 %
    assert proc.stdout.strip().splitlines()[2] == (
        "| x | v6e:8x8 (64) | data=1,fsdp=64,tensor=1 | full | 4.00 / 32 GiB | yes | - | 0.200 s, HBM (25%) | - |")
    bad = subprocess.run([sys.executable, TOOL, "--markdown", str(tmp_path / "missing.log")], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert bad.returncode == 2 and "not an output of this tool" in bad.stderr


# the search test's space: 2 meshes x 3 remat policies x 2 global batches = 12 candidates, of which 2 compile. For
# the tiny config remat "none" is its own setting (4 duplicates of "config", dropped); batch 12 does not divide data x fsdp = 8
# (invalid); the replicated mesh (data=8) holds the whole AdamW state on every device, which the nominal HBM below
# is set not to take (pruned before compiling)
SEARCH_SPACE = "mesh=fsdp=-1|data=8; remat=config|full|none; batch=8|12"


def test_plan_search_ranks_prunes_and_resumes(tmp_path):
    """`blip3o-plan --search` on 8 simulated CPU devices with a nominal device (HBM, peak, bandwidth) so that CPU
    plans have a fit verdict and a roofline MFU: the ranking is sorted, infeasible candidates are reported with
    their reason, the best plan is returned, and a second search resumes from the results file (through the CLI)."""
    from blip3o_jax import cli
    from blip3o_jax import plan as plan_lib

    config = cli.load_config(SMALL[1], {"model.dit.n_layers": 1, "model.backbone.num_hidden_layers": 1})
    config = plan_lib.apply_overrides(config, mesh=plan_lib.parse_mesh(None, config.mesh))  # as the CLI does
    candidates = plan_lib.search_space(SEARCH_SPACE, config, 8)
    assert len(candidates) == 12
    # the nominal HBM: 1 byte under what the replicated mesh's state, frozen params and batch alone take
    replicated = plan_lib.apply_candidate(config, plan_lib.Candidate((8, 1, 1), batch=8))
    setup = plan_lib._setup(replicated, plan_lib.cpu_target())
    resident = sum(plan_lib._shard_bytes(t) for t in (setup.abstract_state, setup.abstract_frozen,
                                                      setup.abstract_batch))
    spec = {"hbm_gib": (resident - 1) / 1024**3, "peak_flops": 1e12, "hbm_gbps": 10.0}
    results = tmp_path / "search.jsonl"
    out = plan_lib.search(config, plan_lib.cpu_target(spec), candidates, name="tiny", results_path=str(results),
                          log=lambda *_: None)

    assert out["compiled"] == 2 and out["resumed"] == 0 and out["metric"] == "roofline"
    ranked = [r for r in out["ranking"] if r["rank"] is not None]
    others = [r for r in out["ranking"] if r["rank"] is None]
    assert [r["rank"] for r in ranked] == [1, 2]
    assert {r["remat"] for r in ranked} == {"backbone=none,dit=none", "backbone=full,dit=full"}
    mfus = [r["roofline_mfu_bound"] for r in ranked]
    assert mfus == sorted(mfus, reverse=True) and all(0 < m < 1 for m in mfus)
    assert all(r["status"] == "fits" and r["peak_bytes"] <= spec["hbm_gib"] * 1024**3 for r in ranked)
    best = out["best"]
    assert best["roofline_mfu_bound"] == max(mfus) and best["fits"] is True and best["mesh"]["fsdp"] == 8
    # infeasible candidates: reported with their reason, never ranked, never compiled
    pruned = [r for r in others if r["status"] == "does not fit"]
    invalid = [r for r in others if r["status"] == "invalid"]
    assert len(pruned) == 2 and all(r["mesh"]["data"] == 8 and "not compiled" in r["reason"] and
                                    r["resident_bytes"] == resident and r["peak_bytes"] is None for r in pruned)
    assert len(invalid) == 4 and all(r["global_batch"] == 12 and "not divisible" in r["reason"] for r in invalid)
    assert len(out["ranking"]) == 8  # 12 candidates less the 4 spelled "none" that equal "config"

    # the standings without compiling: a candidate the file lacks is pending, the rest as ranked above
    more = plan_lib.search_space(SEARCH_SPACE.replace("remat=config|full|none", "remat=config|full|dots"), config, 8)
    standings = plan_lib.search(config, plan_lib.cpu_target(spec), more, name="tiny", results_path=str(results),
                                compile_missing=False, log=lambda *_: None)
    pending = [r for r in standings["ranking"] if r["status"] == "pending"]
    assert standings["compiled"] == 0 and standings["best"] == best
    assert len(pending) == 4 and all(r["remat"] == "backbone=dots,dit=dots" and r["rank"] is None for r in pending)
    assert [r for r in standings["ranking"] if r["status"] != "pending"] == out["ranking"]

    # resume through the CLI: every candidate is in the results file, nothing compiles, same ranking and best plan
    hbm_spec = f"hbm_gib={spec['hbm_gib']!r},peak_tflops=1,hbm_gbps=10"
    table, again = _run(sys.executable, [*SMALL, "--platform", "cpu", "--num_devices", "8", "--name", "tiny",
                                         "--search", "--search_space", SEARCH_SPACE, "--results", str(results),
                                         "--device_spec", hbm_spec])
    assert again["compiled"] == 0 and again["resumed"] == 8
    assert [(r["rank"], r["status"], r["mesh"], r["remat"], r["global_batch"]) for r in again["ranking"]] == \
        [(r["rank"], r["status"], r["mesh"], r["remat"], r["global_batch"]) for r in out["ranking"]]
    assert again["best"]["memory_per_device"] == best["memory_per_device"]
    assert "| 1 | 1,8,1 |" in table and "does not fit: parameters, optimizer state and batch alone" in table
    assert len(results.read_text().splitlines()) == 8


@pytest.mark.tpu
def test_tpu_plan_with_pallas_attention():
    """attention_impl="pallas" for every tower that has one (the Qwen backbone and the DiT): the train step with
    jax's Pallas TPU flash-attention kernels (Mosaic custom calls, per shard under the mesh) lowers and compiles
    for a v5e 2x2 topology."""
    python = _tpu_python()
    assert python is not None, ("libtpu is not installed here (pip install -e .[tpu]) and BLIP3O_TPU_PYTHON is not "
                                "set; this test runs only with -m tpu")
    table, r = _run(python, [*SMALL, "--topology", "v5e:2x2", "--search", "--search_space",
                             "mesh=data=-1; remat=config; attention=pallas"], timeout=600)
    assert r["compiled"] == 1 and r["ranking"][0]["status"] == "fits"
    assert r["best"]["attention"] == "backbone=pallas,dit=pallas" and r["best"]["implied_mfu"] > 0
    assert "| 1 | 4,1,1 |" in table and "pallas" in table
