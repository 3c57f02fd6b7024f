#!/usr/bin/env bash
# The prepared GPU check (issue 17): on one H100/H200, in ~10 minutes,
#   1. sanity: nvidia-smi, JAX sees a GPU, PyTorch sees CUDA (fails fast with one line if not);
#   2. a GPU subset of the parity tests (every model family + the flow-matching loss), fp32 at the highest matmul
#      precision (no TF32) and the bf16-policy tests, on the GPU (BLIP3O_TEST_PLATFORM=gpu; the 8-device sharding
#      tests deselected);
#   3. tools/bench_train.py, bench_dit.py, bench_llm.py with --preset gpu --dtype bfloat16 --attention cudnn, ours
#      vs the PyTorch reference on the same GPU (bf16, SDPA);
#   4. a markdown summary: pass/fail counts per family, each bench's speed-ups, MFU against the GPU's bf16 dense
#      peak and the fraction of the matmul peak measured in the same run -> $OUT/summary.md, also printed.
# Run `tools/gpu_check.sh --help` for the options; `--dry-run` prints every command without running anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: tools/gpu_check.sh [options]

The GPU check of blip3o-jax on one H100/H200 (~10 minutes, the one-time install not counted): sanity
(nvidia-smi, jax.devices(), torch.cuda), a GPU subset of the parity tests (fp32 at the highest matmul precision,
and the bf16-policy tests), then bench_train / bench_dit / bench_llm in bf16 with cuDNN attention vs the PyTorch
reference on the same GPU, and a markdown summary with pass/fail counts, speed-ups and MFU.

Options:
  --python PY          use this interpreter (an environment that already has blip3o-jax's dependencies with
                       CUDA-enabled jax and torch) instead of creating .venv-gpu with pip install -e '.[gpu,test]'
  --out DIR            logs, the benches' JSON and summary.md (default: workdir_gpu_check/ in the repository)
  --budget S           wall-clock budget of steps 1-3 in seconds (default 600); a step gets at most what is left
  --test-timeout S     at most S seconds for the parity tests (default 270)
  --bench-timeout S    at most S seconds for each benchmark (default 120)
  --peak-tflops T      the GPU's dense bf16 peak for MFU (default 989: H100/H200 SXM; H100 PCIe: 756)
  --attention A        ours' attention in the benches: cudnn (default) or xla. With cudnn, a bench that fails
                       (not by timeout) is run again with xla, and the summary says so
  --skip-tests         benchmarks only
  --skip-bench         tests only
  --summary-only       only rebuild DIR/summary.md (--out DIR) from the logs of an earlier run
  --dry-run            print every command it would run, run nothing
  -h, --help           this text
EOF
}

PY=""
OUT="$ROOT/workdir_gpu_check"
BUDGET=600
TEST_TIMEOUT=270
BENCH_TIMEOUT=120
PEAK_TFLOPS=989
ATTENTION=cudnn
DRY_RUN=0
RUN_TESTS=1
RUN_BENCH=1
SUMMARY_ONLY=0

die() { echo "gpu_check: $*" >&2; exit 1; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --test-timeout) need_value "$@"; TEST_TIMEOUT="$2"; shift 2 ;;
    --bench-timeout) need_value "$@"; BENCH_TIMEOUT="$2"; shift 2 ;;
    --peak-tflops) need_value "$@"; PEAK_TFLOPS="$2"; shift 2 ;;
    --attention) need_value "$@"; ATTENTION="$2"; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-bench) RUN_BENCH=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --summary-only) SUMMARY_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
for v in BUDGET TEST_TIMEOUT BENCH_TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a whole number of seconds, got '${!v}'"
done
[[ "$PEAK_TFLOPS" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--peak-tflops must be a number, got '$PEAK_TFLOPS'"
[[ "$ATTENTION" == cudnn || "$ATTENTION" == xla ]] || die "--attention must be cudnn or xla, got '$ATTENTION'"

# The parity subset: one or more files per model family and the flow-matching loss. -k keeps the numeric tests
# (parity against the PyTorch modules, per block and per model, and the bf16-policy ones) and drops the tests that
# need 8 devices (`sharded`: one GPU has one device) and those that only check configs or key tables on the host.
# Ordered so that a run cut short by --test-timeout has still covered most families (the VL model's generation
# tests compile the most, last).
TEST_FILES=(
  tests/test_flow_matching.py tests/test_dit.py tests/test_siglip.py tests/test_eva_clip.py tests/test_qwen.py
  tests/test_unet.py tests/test_autoencoder_kl.py tests/test_sana.py tests/test_autoencoder_dc.py
  tests/test_qwen2_5_vl_vision.py tests/test_qwen2_5_vl.py
)
TEST_K="not sharded and (match or parity or bf16 or block or resnet or transformer or embedding or attention"
TEST_K+=" or kernel or loss or sampler or decoding or prefix_cache or greedy or generation)"
BENCHES=(bench_train bench_dit bench_llm)

# printed as `+ command` (copy-pastable: odd arguments in single quotes) in --dry-run, logged the same way otherwise
show() {
  local line="+" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $a"; else line+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
}

START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

cd "$ROOT"
if [[ $SUMMARY_ONLY == 1 ]]; then
  [[ -d "$OUT" ]] || die "--summary-only: no folder '$OUT' (give the earlier run's --out)"
  [[ -n "$PY" ]] || PY=$([[ -x "$ROOT/.venv-gpu/bin/python" ]] && echo "$ROOT/.venv-gpu/bin/python" || echo python3)
  RUN_TESTS=0 RUN_BENCH=0
fi

# ---------------------------------------------------------------------------------------------------------------
# 1a. a GPU at all (before any install)

GPU_QUERY=(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)
if [[ $DRY_RUN == 1 ]]; then
  show "${GPU_QUERY[@]}"
elif [[ $SUMMARY_ONLY == 0 ]]; then
  mkdir -p "$OUT"
  command -v nvidia-smi >/dev/null 2>&1 || die "no GPU: nvidia-smi not found"
  "${GPU_QUERY[@]}" >"$OUT/nvidia_smi.txt" 2>&1 || die "no GPU: nvidia-smi failed ($(head -n 1 "$OUT/nvidia_smi.txt"))"
  echo "GPU: $(head -n 1 "$OUT/nvidia_smi.txt")"
fi

# ---------------------------------------------------------------------------------------------------------------
# 0. the interpreter (the install is not part of the budget)

if [[ -z "$PY" ]]; then  # (not reached with --summary-only)
  PY="$ROOT/.venv-gpu/bin/python"
  if [[ ! -f "$ROOT/.venv-gpu/.installed" ]]; then
    SETUP=(
      "python3.11 -m venv .venv-gpu"
      "echo '*' > .venv-gpu/.gitignore"  # keeps the environment out of git without touching .gitignore
      "$PY -m pip install --quiet --upgrade pip"
      "$PY -m pip install --quiet -e '.[gpu,test]'"
      "touch .venv-gpu/.installed"
    )
    for c in "${SETUP[@]}"; do
      echo "+ $c"
      if [[ $DRY_RUN == 0 ]]; then bash -c "$c" || die "setting up .venv-gpu failed at: $c"; fi
    done
  fi
fi
if [[ $DRY_RUN == 0 ]]; then
  command -v "$PY" >/dev/null 2>&1 || [[ -x "$PY" ]] || die "no interpreter '$PY'"
  START=$(date +%s)  # the budget starts after the install
fi

# Both frameworks share the GPU in the benches: JAX must not take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------------------------
# 1b. jax and torch see it, and the packages the tests and benches import are there

SANITY_PY='import jax, torch, diffusers, transformers, flax, optax, ml_collections; d = jax.devices(); print(d); '\
'assert d[0].platform == "gpu", f"JAX sees no GPU: {d}"; '\
'assert torch.cuda.is_available(), "torch sees no CUDA device (a CPU-only torch build?)"; '\
'print(f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__} on '\
'{torch.cuda.get_device_name()}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")'
SANITY_CMD=(env JAX_PLATFORMS=cuda timeout 120 "$PY" -c "$SANITY_PY")
if [[ $DRY_RUN == 1 ]]; then
  show "${SANITY_CMD[@]}"
elif [[ $SUMMARY_ONLY == 0 ]]; then
  "${SANITY_CMD[@]}" >"$OUT/sanity.log" 2>&1 || die "no usable GPU for jax/torch: $(tail -n 1 "$OUT/sanity.log")"
  cat "$OUT/sanity.log"
fi

# ---------------------------------------------------------------------------------------------------------------
# 2. the parity subset on the GPU

TESTS_RC=-1
if [[ $RUN_TESTS == 1 ]]; then
  T=$(( TEST_TIMEOUT < $(left) ? TEST_TIMEOUT : $(left) ))
  # SIGINT at the limit: pytest stops as on Ctrl-C and still writes the report of the tests it ran
  TEST_CMD=(env BLIP3O_TEST_PLATFORM=gpu JAX_PLATFORMS=cuda timeout --signal=INT --kill-after=30 "$T"
            "$PY" -m pytest -q -p no:cacheprovider
            "${TEST_FILES[@]}" -k "$TEST_K" --junitxml "$OUT/tests.xml")
  if [[ $DRY_RUN == 1 ]]; then
    show "${TEST_CMD[@]}"
  elif (( T < 30 )); then
    echo "parity tests: not run, ${T}s of the budget left" | tee "$OUT/tests.log"
  else
    show "${TEST_CMD[@]}" | tee "$OUT/tests.log"
    set +e
    "${TEST_CMD[@]}" 2>&1 | tee -a "$OUT/tests.log"
    TESTS_RC=${PIPESTATUS[0]}
    set -e
  fi
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. the benches, bf16, ours vs PyTorch on the same GPU

run_bench() {  # name attention -> rc; log and last JSON line in $OUT/<name>.log / .json
  local name=$1 attention=$2
  local T=$(( BENCH_TIMEOUT < $(left) ? BENCH_TIMEOUT : $(left) ))
  local cmd=(timeout --kill-after=10 "$T" "$PY" "tools/$name.py" --preset gpu --dtype bfloat16 --attention "$attention")
  if (( T < 30 )); then
    echo "$name: not run, ${T}s of the budget left" | tee "$OUT/$name.log"
    return 125
  fi
  show "${cmd[@]}" | tee "$OUT/$name.log"
  set +e
  "${cmd[@]}" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc == 0 ]]; then grep '^{' "$OUT/$name.log" | tail -n 1 >"$OUT/$name.json" || true; fi
  return "$rc"
}

declare -A BENCH_STATUS
if [[ $RUN_BENCH == 1 ]]; then
  for b in "${BENCHES[@]}"; do
    if [[ $DRY_RUN == 1 ]]; then
      show timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" "tools/$b.py" --preset gpu --dtype bfloat16 \
        --attention "$ATTENTION"
      if [[ $ATTENTION == cudnn ]]; then
        echo "  (if it fails other than by timeout:" "$(show timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" \
          "tools/$b.py" --preset gpu --dtype bfloat16 --attention xla))"
      fi
      continue
    fi
    rm -f "$OUT/$b.json"
    attention=$ATTENTION
    rc=0; run_bench "$b" "$attention" || rc=$?
    if [[ $rc != 0 && $rc != 124 && $rc != 125 && $attention == cudnn ]]; then
      mv "$OUT/$b.log" "$OUT/${b}_cudnn_failed.log"
      echo "$b failed with cuDNN attention (rc $rc, see ${b}_cudnn_failed.log): again with xla attention"
      attention="xla (cudnn failed)"
      rc=0; run_bench "$b" xla || rc=$?
    fi
    case $rc in
      0) BENCH_STATUS[$b]="ok, $attention" ;;
      124) BENCH_STATUS[$b]="TIMEOUT, $attention" ;;
      125) BENCH_STATUS[$b]="not run (budget)" ;;
      *) BENCH_STATUS[$b]="FAILED (rc $rc), $attention" ;;
    esac
  done
fi

# ---------------------------------------------------------------------------------------------------------------
# 4. the summary

if [[ $DRY_RUN == 1 ]]; then
  echo "+ (summary of $OUT/tests.xml and $OUT/bench_*.json -> $OUT/summary.md, printed)"
  exit 0
fi

if [[ $SUMMARY_ONLY == 0 ]]; then  # what the summary reads besides the logs; --summary-only reads it again
  {
    echo "elapsed_s=$(( $(date +%s) - START ))"
    echo "peak_tflops=$PEAK_TFLOPS"
    if [[ $RUN_TESTS == 1 ]]; then echo "tests_rc=$TESTS_RC"; fi
    if [[ $RUN_BENCH == 1 ]]; then
      for b in "${BENCHES[@]}"; do echo "$b=${BENCH_STATUS[$b]:-not run}"; done
    fi
  } >"$OUT/status.txt"
fi
GPU_CHECK_OUT="$OUT" "$PY" - <<'EOF'
import collections
import json
import os
import xml.etree.ElementTree as ET

out = os.environ["GPU_CHECK_OUT"]


def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return ""


status = dict(line.split("=", 1) for line in read("status.txt").splitlines() if "=" in line)
peak = float(status.get("peak_tflops", 989)) * 1e12

lines = ["# GPU check", ""]
gpu = read("nvidia_smi.txt").strip().splitlines()
versions = [l for l in read("sanity.log").splitlines() if l.startswith("jax ")]
lines += [f"- GPU: {gpu[0] if gpu else '?'}", f"- {versions[0] if versions else 'versions: ?'}",
          f"- MFU against {peak / 1e12:g} TFLOP/s dense bf16; steps 1-3 took {status.get('elapsed_s', '?')} s", ""]

# ---- tests: pass/fail per family (test file)
lines += ["## Parity tests on the GPU (fp32 at the highest matmul precision, and the bf16-policy tests)", ""]
if "tests_rc" not in status:
    lines += ["not run (--skip-tests)", ""]
else:
    counts = collections.defaultdict(collections.Counter)
    failed = []
    try:
        root = ET.parse(os.path.join(out, "tests.xml")).getroot()
        for case in root.iter("testcase"):
            family = case.get("classname", "?").split(".")[-1].removeprefix("test_")
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[tag]
            counts[family][outcome] += 1
            if outcome in ("failed", "errors"):
                failed.append(f"{family}::{case.get('name')}")
    except (OSError, ET.ParseError) as e:
        lines += [f"no JUnit report ({e}); pytest exit status {status['tests_rc']}"]
    if counts:
        lines += ["| family | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
        total = collections.Counter()
        for family, c in counts.items():
            total.update(c)
            lines.append(f"| {family} | {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} |")
        lines.append(f"| **all** | {total['passed']} | {total['failed']} | {total['errors']} | {total['skipped']} |")
    tail = [l for l in read("tests.log").splitlines() if " in " in l and ("passed" in l or "failed" in l)]
    rc = status["tests_rc"]
    lines += ["", f"pytest: {tail[-1].strip('= ') if tail else '?'} (exit status {rc}"
              + (": timed out" if rc == "124" else "") + ")"]
    lines += [f"- failed: `{f}`" for f in failed[:30]]
    lines.append("")

# ---- benches: speed-ups and MFU
lines += ["## Benchmarks, bf16, ours vs the PyTorch reference on the same GPU", "",
          "| bench | what | status | ours | reference | speed-up | MFU ours / ref "
          "| of measured matmul peak ours / ref |",
          "|---|---|---|---|---|---|---|---|"]


def pct(x):
    return "?" if x is None else f"{100 * x:.0f} %"


def row(bench, what, ours_s, ref_s, speedup, ours_gflops, ref_gflops, ours_frac, ref_frac, unit="s"):
    mfu = lambda g: None if g is None else g * 1e9 / peak  # noqa: E731
    fmt = lambda s: "?" if s is None else f"{s * 1e3:.1f} ms" if unit == "s" else f"{s:.0f} {unit}"  # noqa: E731
    sp = "?" if speedup is None else f"{speedup:.2f}×"
    lines.append(f"| {bench} | {what} | {status.get(bench, '?')} | {fmt(ours_s)} | {fmt(ref_s)} | {sp} | "
                 f"{pct(mfu(ours_gflops))} / {pct(mfu(ref_gflops))} | {pct(ours_frac)} / {pct(ref_frac)} |")


for bench in ("bench_train", "bench_dit", "bench_llm"):
    text = read(f"{bench}.json").strip()
    try:
        r = json.loads(text)
    except json.JSONDecodeError:
        lines.append(f"| {bench} | | {status.get(bench, 'not run (--skip-bench)')} | | | | | |")
        continue
    g = lambda d, *keys: next((d[k] for k in keys if k in d), None)  # noqa: E731
    if bench == "bench_train":
        o, t = r.get("ours", {}), r.get("torch", {})
        row(bench, f"train step, {r['config'].get('backbone')} + DiT {r['config'].get('dit')}, batch "
            f"{r['config'].get('batch')}", o.get("median_s"), t.get("median_s"), r.get("speedup_vs_torch"),
            o.get("gflops_per_s"), t.get("gflops_per_s"), o.get("fraction_of_peak"), t.get("fraction_of_peak"))
    elif bench == "bench_dit":
        o, t, c = r.get("ours", {}), r.get("torch", {}), r.get("config", {})
        ours_peak, ref_peak = r.get("jax_matmul_peak_gflops"), r.get("torch_matmul_peak_gflops")
        frac = lambda gf, p: None if gf is None or not p else gf / p  # noqa: E731
        row(bench, f"DiT {c.get('dim')}x{c.get('layers')} train step, batch {c.get('batch')}", o.get("train_step_s"),
            t.get("train_step_s"), r.get("train_speedup"), o.get("train_gflops"), t.get("train_gflops"),
            o.get("train_frac_of_peak"), t.get("train_frac_of_peak"))
        row(bench, f"{c.get('sample_steps')}-step CFG sampling, batch {c.get('sample_batch')}", o.get("sample_s"),
            t.get("sample_s"), r.get("sample_speedup"), o.get("sample_gflops"), t.get("sample_gflops"),
            frac(o.get("sample_gflops"), ours_peak), frac(t.get("sample_gflops"), ref_peak))
    else:
        op, hp, od, hd = (r.get(k, {}) for k in ("ours_prefill", "hf_prefill", "ours_decode", "hf_decode"))
        row(bench, f"{r.get('params_m', 0):.0f}M LM prefill {r.get('batch')}×{r.get('prefill_len')}",
            op.get("median_s"), hp.get("median_s"), r.get("prefill_speedup"), op.get("gflops_per_s"),
            hp.get("gflops_per_s"), op.get("fraction_of_matmul_peak"), hp.get("fraction_of_matmul_peak"))
        row(bench, f"greedy decode {r.get('batch')}×{r.get('decode_tokens')} tokens (x the bandwidth bound, one "
            f"step: ours {g(r, 'ours_decode_step_over_bandwidth_bound') or 0:.2f}, ref "
            f"{g(r, 'hf_decode_step_over_bandwidth_bound') or 0:.2f}; whole call: ours "
            f"{g(r, 'ours_decode_over_bandwidth_bound') or 0:.2f}, ref "
            f"{g(r, 'hf_decode_over_bandwidth_bound') or 0:.2f}; tokens match: {r.get('greedy_tokens_match')})",
            od.get("median_s"), hd.get("median_s"), r.get("decode_speedup"), od.get("gflops_per_s"),
            hd.get("gflops_per_s"), od.get("fraction_of_matmul_peak"), hd.get("fraction_of_matmul_peak"))
    peaks = [f"{k.split('_')[0]} {r[k] / 1e3:.0f}" for k in ("jax_matmul_peak_gflops", "torch_matmul_peak_gflops")
             if k in r]
    if peaks:
        lines.append(f"| {bench} | measured bf16 matmul peak, TFLOP/s: {', '.join(peaks)} | | | | | | |")
lines += ["", "Speed-up: reference time / ours (> 1: ours is faster). MFU: analytic matmul FLOPs / time / the "
          "dense bf16 peak above. Logs and each bench's JSON line: this folder.", ""]

text = "\n".join(lines)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
print(text)
EOF
echo "summary: $OUT/summary.md"
