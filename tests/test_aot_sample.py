"""tools/aot_sample.py: the ahead-of-time plan of the t2i program (LLM + DiT steps + the SDXL decoder's plan).

The CPU path (8 simulated devices, no libtpu) compiles the tiny release's programs with the weights sharded over
fsdp; the decoder's figures come from a saved tools/aot_decoder.py output (docs/aot_plans/, re-labelled for this
plan: nothing of the UNet is compiled here). Checked: XLA's buffer assignment against the shardings, the LLM's HLO
FLOPs against the analytic count, and how the per-program figures combine into seconds per batch, images/s per
chip and GenEval minutes on a pod slice.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_sample.py")
SAVED_DECODER = os.path.join(ROOT, "docs", "aot_plans", "decoder_sdxl_1024px_v5e-1x1.log")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import aot_sample  # noqa: E402
import make_tiny_release as tiny  # noqa: E402


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _decoder_log(path, **changes) -> str:
    """A real aot_decoder.py output (v5e, batch 1) re-labelled as the decoder plan of the tiny CPU plan."""
    d = json.loads(open(SAVED_DECODER).read().strip().splitlines()[-1])
    d.update({"topology": "cpu x8", "batch": 8, "latent": [8, 8, 4], "resolution": 64, **changes})
    path.write_text("sdxl (re-labelled)\n" + json.dumps(d) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot_sample")
    log = _decoder_log(tmp / "decoder.log")
    proc = _run(["--preset", "tiny", "--platform", "cpu", "--num_devices", "8", "--mesh", "fsdp=4",
                 "--decoder_log", log])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    saved = tmp / "t2i.log"
    saved.write_text(proc.stdout)
    return "\n".join(lines[:-1]), json.loads(lines[-1]), str(saved), log


def test_cpu_plan_of_the_tiny_t2i_program(cpu_plan):
    table, r, _, _ = cpu_plan
    for word in ("pipeline", "llm", "dit_step", "unet_step", "vae_decode", "peak per device", "mesh data=2 fsdp=4",
                 "no time estimate"):
        assert word in table, word
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["devices"] == 8
    assert (r["batch"], r["dit_batch"], r["dit_steps"], r["decoder_steps"]) == (8, 16, 30, 50)
    assert r["n_query"] == tiny.N_QUERY and r["latent"] == [8, 8, 4]
    # fsdp=4 shards the weights: a device holds about a quarter of the LLM + DiT (bf16: 2 bytes a parameter)
    whole = 2 * sum(r["params"][k] for k in ("llm", "latent_queries", "dit"))
    resident = r["resident_bytes_per_device"]["llm_dit"]
    assert resident < 0.4 * whole, (resident, whole)
    # the program's arguments are those shards (every weight of the tiny model is used: tied embeddings) plus one
    # prompt row per device (8 prompts over data x fsdp = 8)
    args = r["programs"]["pipeline"]["memory_per_device"]["arguments"]
    assert resident <= args <= resident + 1024, (args, resident)
    # the LLM's HLO FLOPs (extrapolated from 1 and 2 unrolled layers) against 2 x matmul weights x tokens per device
    t = tiny.TEXT
    head = t["hidden_size"] // t["num_attention_heads"]
    per_layer = (2 * t["hidden_size"] * t["hidden_size"] + 2 * t["hidden_size"] * t["num_key_value_heads"] * head
                 + 3 * t["hidden_size"] * t["intermediate_size"])
    analytic = 2 * per_layer * t["num_hidden_layers"] * r["batch"] * r["prompt_length"] / r["devices"]
    ratio = r["programs"]["llm"]["hlo_flops_per_device"] / analytic
    assert 1.0 <= ratio < 1.6, ratio  # + attention scores, norms, RoPE
    # one image's FLOPs: the LLM pass, 30 DiT calls, 50 UNet calls and the VAE decode, over the batch
    p, d = r["programs"], r["decoder_programs"]
    flops = r["devices"] * (p["llm"]["hlo_flops_per_device"] + 30 * p["dit_step"]["hlo_flops_per_device"]
                            + 50 * d["step"]["hlo_flops_per_device"] + d["decode"]["hlo_flops_per_device"]) / 8
    assert r["hlo_flops_per_image"] == pytest.approx(flops, rel=1e-4)
    # both programs' weights stay resident: the peak is the larger program's peak + the other part's weights
    m, decoder_weights = r["memory_per_device"], r["resident_bytes_per_device"]["decoder"]
    assert m["llm_dit_program"] == p["pipeline"]["memory_per_device"]["peak"] + decoder_weights
    assert m["decoder_program"] == d["pipeline"]["memory_per_device"]["peak"] + resident
    assert m["peak"] == max(m["llm_dit_program"], m["decoder_program"])
    # no TPU cost model on CPU: no time figures
    assert r["estimated_s_per_batch"] is None and r["estimated_geneval_minutes"] is None and r["fits"] is None


def test_combine_seconds_images_per_s_and_geneval_minutes(cpu_plan):
    """The stage arithmetic on the CPU plan dressed as a one-chip v5p plan with known per-program seconds."""
    r = copy.deepcopy(cpu_plan[1])
    r.update(platform="tpu", chip="TPU v5p", chips=1, devices=1, hbm_per_device=95 * 2**30)
    seconds = {"llm": 0.25, "dit_step": 0.02}
    for k, s in seconds.items():
        r["programs"][k]["optimal_seconds"] = s
    r["decoder_programs"]["step"]["optimal_seconds"] = 0.2
    r["decoder_programs"]["decode"]["optimal_seconds"] = 0.15
    aot_sample.combine(r, pod="v5p-64")
    assert r["estimated_stages_s"] == pytest.approx({"llm": 0.25, "dit": 0.6, "unet": 10.0, "vae_decode": 0.15})
    assert r["estimated_s_per_batch"] == pytest.approx(11.0)
    assert r["estimated_images_per_s_per_chip"] == pytest.approx(8 / 11.0)
    # 553 x 4 = 2212 images on v5p-64 = 32 chips x 8 a call: ceil(2212 / 256) = 9 calls of 11 s
    assert r["geneval"] == {"prompts": 553, "images_per_prompt": 4, "images": 2212, "pod": "v5p-64", "pod_chips": 32}
    assert r["estimated_geneval_minutes"] == pytest.approx(9 * 11.0 / 60)
    assert r["fits"] is True and r["roofline_s_per_batch"] <= r["estimated_s_per_batch"]
    aot_sample.combine(r, pod="v6e-64")  # v6e types count chips: 64 chips, 5 calls
    assert r["estimated_geneval_minutes"] == pytest.approx(5 * 11.0 / 60)


def test_pod_chips():
    assert aot_sample.pod_chips("v5p-64") == 32  # TensorCores, two a chip
    assert aot_sample.pod_chips("v5p-8") == 4
    assert aot_sample.pod_chips("v6e-64") == 64 and aot_sample.pod_chips("v5litepod-16") == 16
    for bad in ("v5p", "v5p-63", "x9-8", "v6e-0"):
        with pytest.raises(ValueError, match="--pod"):
            aot_sample.pod_chips(bad)


def test_decoder_log_is_checked_and_recombined(cpu_plan, tmp_path):
    _, r, saved, log = cpu_plan
    with pytest.raises(ValueError, match="batch is 4, this plan needs 8"):
        aot_sample.load_decoder_log(_decoder_log(tmp_path / "b4.log", batch=4), r, 50)
    with pytest.raises(ValueError, match="topology is 'v5e:1x1'"):
        aot_sample.load_decoder_log(_decoder_log(tmp_path / "v5e.log", topology="v5e:1x1"), r, 50)
    with pytest.raises(ValueError, match="not a finished output"):
        aot_sample.load_decoder_log(str(tmp_path / "missing.log"), r, 50)
    # --recombine: the saved plan with another decoder plan, nothing compiled
    slower = json.loads(open(log).read().strip().splitlines()[-1])
    slower["programs"]["pipeline"]["memory_per_device"]["peak"] *= 3
    again = aot_sample.recombine(saved, _decoder_log(tmp_path / "slower.log", programs=slower["programs"]),
                                 "v5p-64", 50)
    assert again["programs"] == r["programs"]
    assert again["memory_per_device"]["decoder_program"] == pytest.approx(
        3 * r["decoder_programs"]["pipeline"]["memory_per_device"]["peak"] + r["resident_bytes_per_device"]["llm_dit"])
    assert math.isclose(again["hlo_flops_per_image"], r["hlo_flops_per_image"], rel_tol=1e-5)
