"""tools/gpu_check.sh and the GPU flags of the benches, on the CPU (no GPU here).

The script: `--help`, `--dry-run` (every command listed, nothing run), its one-line failure without a GPU, and its
whole flow (sanity, tests, benches with the cuDNN -> xla fallback, summary) against a fake `nvidia-smi` and a fake
interpreter that answers like the real tools would. The benches: `--preset gpu`, `--dtype`, `--attention` parse into
the model configs (explicit flags win over the preset, the CPU defaults are unchanged), and a tiny bf16 run of
bench_llm ends with its JSON line, which the summary then reads."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "tools"))

FAMILY_FILES = ["test_qwen.py", "test_qwen2_5_vl.py", "test_qwen2_5_vl_vision.py", "test_eva_clip.py", "test_siglip.py",
                "test_dit.py", "test_unet.py", "test_autoencoder_kl.py", "test_sana.py", "test_autoencoder_dc.py",
                "test_flow_matching.py"]
BENCHES = ["bench_train", "bench_dit", "bench_llm"]


def run_script(*args, env=None, timeout=60):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or dict(os.environ))


def test_help():
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--python", "--out", "--dry-run", "--peak-tflops", "--budget", "--summary-only"):
        assert option in proc.stdout


def test_dry_run_lists_every_command_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run_script("--dry-run", "--python", "/opt/py/bin/python", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    cmds = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert cmds[0].startswith("+ nvidia-smi")
    assert any("/opt/py/bin/python -c 'import jax" in c and "jax.devices()" in c for c in cmds)
    (tests,) = [c for c in cmds if "-m pytest" in c]
    assert "BLIP3O_TEST_PLATFORM=gpu" in tests and "JAX_PLATFORMS=cuda" in tests
    assert "-k 'not sharded and (" in tests and f"--junitxml {out}/tests.xml" in tests
    for name in FAMILY_FILES:
        assert f"tests/{name}" in tests
    for bench in BENCHES:
        assert any(f"/opt/py/bin/python tools/{bench}.py --preset gpu --dtype bfloat16 --attention cudnn" in c
                   for c in cmds), bench
        assert f"tools/{bench}.py --preset gpu --dtype bfloat16 --attention xla" in proc.stdout  # the fallback
    assert not any("pip install" in c for c in cmds)  # --python: no environment is made
    assert not out.exists()  # a dry run writes nothing

    proc = run_script("--dry-run", "--skip-tests", "--attention", "xla")
    assert proc.returncode == 0, proc.stderr
    assert "-m pytest" not in proc.stdout and "--attention cudnn" not in proc.stdout
    if not os.path.exists(os.path.join(ROOT, ".venv-gpu", ".installed")):
        assert "pip install --quiet -e '.[gpu,test]'" in proc.stdout and "python3.11 -m venv .venv-gpu" in proc.stdout


def test_bad_option_and_no_gpu_fail_with_one_line(tmp_path):
    proc = run_script("--budget", "ten")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "--budget" in proc.stderr
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _executable(fake_bin / "nvidia-smi", "#!/bin/bash\necho 'NVIDIA-SMI has failed: no devices were found'\nexit 9\n")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = run_script("--python", sys.executable, "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "gpu_check: no GPU: nvidia-smi failed (NVIDIA-SMI has failed: no devices were found)"


# ---------------------------------------------------------------------------------------------------------------
# the benches' GPU flags


def test_bench_dit_and_train_flags_parse_into_the_configs():
    import bench_dit
    import bench_train

    cpu = bench_dit.parse_args([])
    assert (cpu.dim, cpu.layers, cpu.batch, cpu.scan, cpu.dtype, cpu.attention) == (512, 8, 16, False, "float32", "xla")
    gpu = bench_dit.parse_args(["--preset", "gpu"])
    assert (gpu.dim, gpu.heads, gpu.in_channels, gpu.batch, gpu.scan) == (1792, 28, 1792, 64, True)
    a = bench_dit.parse_args(["--preset", "gpu", "--layers", "2", "--no-scan", "--dtype", "bfloat16",
                              "--attention", "cudnn"])
    assert (a.dim, a.layers, a.scan) == (1792, 2, False)  # explicit flags win over the preset
    cfg = bench_dit.make_config(a)
    assert (cfg.dim, cfg.n_layers, cfg.dtype, cfg.param_dtype, cfg.attention_impl) == (
        1792, 2, "bfloat16", "float32", "cudnn")

    cpu = bench_train.parse_args([])
    assert (cpu.hidden, cpu.layers, cpu.batch, cpu.scan, cpu.dtype) == (512, 4, 8, False, "float32")
    c = bench_train.make_config(cpu)
    assert c.model.backbone["dtype"] == "float32" and c.train.frozen_param_dtype == "float32"
    a = bench_train.parse_args(["--preset", "gpu", "--batch", "4", "--dtype", "bfloat16", "--attention", "cudnn"])
    assert (a.hidden, a.dit_dim, a.channels, a.batch, a.scan) == (2048, 1792, 1792, 4, True)
    c = bench_train.make_config(a)
    assert c.model.backbone["dtype"] == c.model.dit["dtype"] == "bfloat16"
    assert c.model.backbone["attention_impl"] == c.model.dit["attention_impl"] == "cudnn"
    assert c.train.frozen_param_dtype == "bfloat16" and c.model.backbone["scan_layers"] is True
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--attention", "flash"])


def test_bench_llm_preset_flags():
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, "tools")
        import bench_llm
        from absl import flags
        flags.FLAGS(["bench_llm", "--preset", "gpu", "--layers", "3", "--dtype", "bfloat16", "--attention", "cudnn"])
        bench_llm.apply_preset()
        F = flags.FLAGS
        print(json.dumps([F.hidden, F.layers, F.batch, F.prefill_len, F.dtype, F.attention, F.decode_layout]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2048, 3, 16, 1024, "bfloat16", "cudnn", "unrolled"]


@pytest.fixture(scope="module")
def llm_json(tmp_path_factory):
    """A tiny bf16 run of the real bench_llm (both sides on the CPU): its last line."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as the benchmark measures
    args = ["--layers", "1", "--hidden", "64", "--heads", "4", "--kv_heads", "2", "--head_dim", "16",
            "--intermediate", "128", "--vocab", "256", "--batch", "2", "--prefill_len", "16", "--decode_prompt", "4",
            "--decode_tokens", "2", "--iters", "1", "--dtype", "bfloat16"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_llm.py"), *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    path = tmp_path_factory.mktemp("llm") / "bench_llm.json"
    path.write_text(proc.stdout.strip().splitlines()[-1])
    return path


def test_bench_llm_tiny_bf16_run_ends_with_its_json(llm_json):
    r = json.loads(llm_json.read_text())
    assert r["benchmark"] == "qwen_lm_prefill_decode" and r["dtype"] == "bfloat16" and r["attention"] == "xla"
    assert r["preset"] == "cpu" and r["torch_device"] == "cpu" and r["decode_tokens"] == 2
    assert r["cpu_decode_kernel"] is None  # the CPU kernel is fp32 only: bf16 products stay XLA's
    assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0
    for side in ("ours_prefill", "hf_prefill", "ours_decode", "hf_decode"):
        assert r[side]["gflops_per_s"] > 0 and 0 < r[side]["fraction_of_matmul_peak"]
    # both sides computed in bf16 from the same weights: last-token logits agree to bf16 precision
    assert r["prefill_last_logits_max_rel_diff"] < 5e-2
    # the decode bound: one read of every weight per new token (the prefill gives the first, then N - 1 steps)
    assert r["decode_weight_passes"] == r["decode_tokens"] == 2
    assert r["weight_bytes"] == pytest.approx(2 * r["params_m"] * 1e6, rel=1e-5)  # bf16
    # bandwidth sampled next to each timed decode (--iters 1) and once after: the median of the samples bounds
    samples = r["memory_bandwidth_samples_gb_s"]
    assert len(samples) == 2 and min(samples) > 0
    assert r["memory_bandwidth_gb_s"] == pytest.approx(sum(samples) / 2, rel=1e-2)
    bound = r["decode_weight_passes"] * r["weight_bytes"] / (r["memory_bandwidth_gb_s"] * 1e9)
    assert r["decode_bandwidth_bound_s"] == pytest.approx(bound, rel=1e-4)
    assert r["ours_decode_over_bandwidth_bound"] == pytest.approx(r["ours_decode"]["median_s"] / bound, rel=1e-3)
    # one decode step: (the whole decode - the prompt pass alone) / (N - 1), over one read of the weights
    for side in ("ours", "hf"):
        step = (r[f"{side}_decode"]["median_s"] - r[f"{side}_prompt_s"]) / (r["decode_tokens"] - 1)
        assert r[f"{side}_decode_step_s"] == pytest.approx(step, rel=1e-3, abs=1e-7)
        assert r[f"{side}_decode_step_over_bandwidth_bound"] == pytest.approx(
            step / r["decode_step_bandwidth_bound_s"], rel=1e-3, abs=1e-4)
    assert r["decode_step_bandwidth_bound_s"] == pytest.approx(bound / r["decode_weight_passes"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the whole flow against fakes: the cuDNN -> xla fallback, statuses, the summary's counts and MFU

DIT_JSON = {"benchmark": "dit",
            "config": {"dim": 1792, "layers": 8, "batch": 64, "sample_steps": 30, "sample_batch": 16},
            "jax_matmul_peak_gflops": 700000.0, "torch_matmul_peak_gflops": 750000.0,
            "ours": {"train_step_s": 0.020, "train_gflops": 494500.0, "train_frac_of_peak": 0.70641, "sample_s": 0.5,
                     "sample_gflops": 98900.0},
            "torch": {"train_step_s": 0.030, "train_gflops": 329666.0, "train_frac_of_peak": 0.43955, "sample_s": 1.0,
                      "sample_gflops": 49450.0},
            "train_speedup": 1.5, "sample_speedup": 2.0}
TRAIN_JSON = {"bench": "train_step", "config": {"backbone": "qwen3 2048x8", "dit": "1792x8", "batch": 32},
              "ours": {"median_s": 0.05, "gflops_per_s": 395600.0, "fraction_of_peak": 0.5},
              "torch": {"median_s": 0.06, "gflops_per_s": 329700.0, "fraction_of_peak": 0.4},
              "speedup_vs_torch": 1.2, "jax_matmul_peak_gflops": 790000.0, "torch_matmul_peak_gflops": 800000.0}
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_dit" name="test_whole_model_parity[tiny]" time="1.0"/>
<testcase classname="tests.test_dit" name="test_bf16_policy_runs_close_to_fp32" time="1.0">
<failure message="x"/></testcase>
<testcase classname="tests.test_qwen" name="test_logits_match_transformers_with_padding[qwen3]" time="1.0"/>
</testsuite></testsuites>"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_whole_flow_with_a_fake_gpu(tmp_path, llm_json):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bench_dit.json").write_text(json.dumps(DIT_JSON))
    (data / "bench_train.json").write_text(json.dumps(TRAIN_JSON))
    (data / "bench_llm.json").write_text(llm_json.read_text())
    (data / "junit.xml").write_text(JUNIT)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _executable(fake_bin / "nvidia-smi", "#!/bin/bash\necho 'NVIDIA H200, 143771 MiB, 580.159.03'\n")
    # the fake interpreter: the summary's heredoc goes to the real one; the sanity check, pytest and the benches
    # answer as on a GPU, except bench_dit, whose cuDNN run fails (the xla rerun then succeeds)
    fake_py = tmp_path / "python"
    _executable(fake_py, textwrap.dedent(f"""\
        #!/bin/bash
        case "$1" in
          -) exec {sys.executable} - ;;
          -c) echo '[CudaDevice(id=0)]'; echo 'jax 9.9, flax 9.9, torch 9.9 on NVIDIA H200'; exit 0 ;;
          -m) while [[ $# -gt 0 && $1 != --junitxml ]]; do shift; done
              cp {data}/junit.xml "$2"; echo '2 passed, 1 failed, 104 deselected in 3.21s'; exit 1 ;;
        esac
        name=$(basename "$1" .py)
        echo "args: $*"
        if [[ $name == bench_dit && "$*" == *"--attention cudnn"* ]]; then echo 'cuDNN: unsupported' >&2; exit 1; fi
        echo 'a line before the JSON'
        cat {data}/$name.json; echo
    """))
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = run_script("--python", str(fake_py), "--out", str(out), "--peak-tflops", "989", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed too
    assert "NVIDIA H200, 143771 MiB" in summary and "jax 9.9" in summary
    assert "| dit | 1 | 1 | 0 | 0 |" in summary and "| qwen | 1 | 0 | 0 | 0 |" in summary
    assert "| **all** | 2 | 1 | 0 | 0 |" in summary and "dit::test_bf16_policy_runs_close_to_fp32" in summary
    assert "2 passed, 1 failed, 104 deselected in 3.21s (exit status 1)" in summary
    rows = {line.split("|")[1].strip() + line.split("|")[2]: line for line in summary.splitlines()
            if line.startswith("| bench_")}
    dit_train = next(v for k, v in rows.items() if k.startswith("bench_dit DiT"))
    # 494.5 TFLOP/s of 989 = 50 % MFU; 70.6 % of the measured peak; the cuDNN failure recorded, xla used
    assert "ok, xla (cudnn failed)" in dit_train and "| 1.50× |" in dit_train
    assert "| 50 % / 33 % |" in dit_train and "| 71 % / 44 % |" in dit_train
    assert (out / "bench_dit_cudnn_failed.log").exists() and "--attention xla" in (out / "bench_dit.log").read_text()
    train = next(v for k, v in rows.items() if k.startswith("bench_train"))
    assert "ok, cudnn" in train and "| 50.0 ms | 60.0 ms | 1.20× | 40 % / 33 % | 50 % / 40 % |" in train
    llm = json.loads(llm_json.read_text())
    prefill = next(v for k, v in rows.items() if k.startswith("bench_llm") and "prefill" in k)
    assert f"| {llm['prefill_speedup']:.2f}× |" in prefill
    assert sum(k.startswith("bench_llm") and "decode" in k for k in rows) == 1
    decode = next(k for k in rows if k.startswith("bench_llm") and "decode" in k)
    assert f"one step: ours {llm['ours_decode_step_over_bandwidth_bound']:.2f}" in decode
    assert f"whole call: ours {llm['ours_decode_over_bandwidth_bound']:.2f}" in decode
    status = (out / "status.txt").read_text()
    assert "tests_rc=1" in status and "bench_dit=ok, xla (cudnn failed)" in status

    # --summary-only rebuilds the same summary from the folder
    (out / "summary.md").unlink()
    proc = run_script("--summary-only", "--out", str(out), "--python", sys.executable)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.md").read_text() == summary
