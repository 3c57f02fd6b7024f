#!/usr/bin/env bash
#SBATCH --job-name=blip3o-jax
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
# Run blip3o-jax training on a SLURM GPU cluster: N nodes x G GPUs, one JAX process per node (owning its G GPUs)
# or, with --process-per-gpu, one per GPU. Three ways in, one script:
#
#   tools/slurm_launch.sh --nodes 4 --gpus-per-node 8 -- --config configs/blip3o_8b.py --workdir /shared/run
#       (outside an allocation: submits itself with sbatch, command-line sizes override the #SBATCH lines above)
#   sbatch --nodes=4 tools/slurm_launch.sh -- --config configs/blip3o_8b.py --workdir /shared/run
#       (inside the batch script, or an salloc shell: starts one task per process with srun)
#   srun ... tools/slurm_launch.sh --task -- ARGS
#       (one task: sets jax.distributed from SLURM and runs `python -m blip3o_jax.train ARGS`)
#
# Every task exports JAX_COORDINATOR_ADDRESS=<first node of SLURM_JOB_NODELIST>:PORT, JAX_NUM_PROCESSES=SLURM_NTASKS
# and JAX_PROCESS_ID=SLURM_PROCID, which blip3o_jax.sharding.initialize_distributed reads; every task runs the
# same command. Run from the repository root on a file system all nodes share, with the environment that has
# blip3o-jax[gpu] installed activated (sbatch passes it on), or pass --python. Walk-through: docs/launch.md.
# --dry-run prints what would run (the sbatch/srun command, or a task's environment and command) instead.
set -euo pipefail

MODE=""; NODES=""; GPUS=""; PER_GPU=0; PARTITION=""; ACCOUNT=""; TIME=""; DRY_RUN=0
PYTHON="${PYTHON:-python3}"; PORT="${BLIP3O_COORDINATOR_PORT:-}"; LOG_DIR="logs"; ENVS=(); TRAIN_ARGS=(); SBATCH_EXTRA=()
REPO="${BLIP3O_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"

usage() {
  sed -n '8,25p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'
options:
  --nodes N                 nodes to allocate (sbatch --nodes; default: the #SBATCH line, 4)
  --gpus-per-node G         GPUs per node (default: the #SBATCH line, 8)
  --process-per-gpu         one JAX process per GPU (CUDA_VISIBLE_DEVICES=SLURM_LOCALID) instead of one per node
  --partition P, --account A, --time T      passed to sbatch
  --sbatch-arg ARG          any other sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)
  --python PATH             interpreter with blip3o-jax installed (default: $PYTHON or python3 on the PATH)
  --repo DIR                the checkout on the shared file system (default: the submit directory)
  --port PORT               coordinator port (default 20000 + SLURM_JOB_ID % 20000)
  --env KEY=VALUE           environment variable for the training processes (repeatable)
  --log-dir DIR             per-task logs go to DIR/<job id>/task_<rank>.log (default logs, under --repo)
  --task                    run one task (what srun starts; not for direct use)
  --dry-run                 print the commands / the task's environment instead of running them
USAGE
}

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || { echo "error: $1 expects a value (see --help)" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need_value "$@"; NODES="$2"; shift 2;;
    --gpus-per-node) need_value "$@"; GPUS="$2"; shift 2;;
    --process-per-gpu) PER_GPU=1; shift;;
    --partition) need_value "$@"; PARTITION="$2"; shift 2;;
    --account) need_value "$@"; ACCOUNT="$2"; shift 2;;
    --time) need_value "$@"; TIME="$2"; shift 2;;
    --sbatch-arg=*) SBATCH_EXTRA+=("${1#--sbatch-arg=}"); shift;;
    --sbatch-arg) [[ $# -ge 2 && -n "$2" ]] || { echo "error: --sbatch-arg expects a value" >&2; exit 2; }
                  SBATCH_EXTRA+=("$2"); shift 2;;
    --python) need_value "$@"; PYTHON="$2"; shift 2;;
    --repo) need_value "$@"; REPO="$2"; shift 2;;
    --port) need_value "$@"; PORT="$2"; shift 2;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2;;
    --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2;;
    --task) MODE="task"; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || { echo "error: pass the train arguments after --, e.g. -- --config configs/tiny.py --workdir DIR" >&2; exit 2; }
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  [[ "$kv" == *=* ]] || { echo "error: --env expects KEY=VALUE, got $kv" >&2; exit 2; }
done
for pair in "nodes:$NODES" "gpus-per-node:$GPUS" "port:$PORT"; do
  [[ -z "${pair#*:}" || "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --${pair%%:*} expects a positive integer, got ${pair#*:}" >&2; exit 2; }
done
if [[ -z "$MODE" ]]; then
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then MODE="job"; else MODE="submit"; fi
fi

# Prints a command (dry run) or runs it.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Options this script passes on to itself (sbatch -> batch script -> srun -> task).
forward=(--python "$PYTHON" --repo "$REPO" --log-dir "$LOG_DIR")
[[ $PER_GPU -eq 1 ]] && forward+=(--process-per-gpu)
[[ -n "$PORT" ]] && forward+=(--port "$PORT")
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do forward+=(--env "$kv"); done

# The first host of a SLURM hostlist ("gpu[03-05,09],cpu1" -> gpu03), without scontrol when it is not there.
first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local list="$1"
  if [[ "$list" =~ ^([^,\[]+)\[([^],-]+) ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "${list%%,*}"
  fi
}

case "$MODE" in
  submit)
    command -v sbatch >/dev/null 2>&1 || [[ $DRY_RUN -eq 1 ]] || { echo "error: sbatch not found: run this on a SLURM login node" >&2; exit 2; }
    sb=(sbatch --chdir="$REPO")
    [[ -n "$NODES" ]] && sb+=(--nodes="$NODES")
    [[ -n "$GPUS" ]] && sb+=(--gpus-per-node="$GPUS")
    [[ $PER_GPU -eq 1 ]] && sb+=(--ntasks-per-node="${GPUS:-8}")
    [[ -n "$PARTITION" ]] && sb+=(--partition="$PARTITION")
    [[ -n "$ACCOUNT" ]] && sb+=(--account="$ACCOUNT")
    [[ -n "$TIME" ]] && sb+=(--time="$TIME")
    sb+=("${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"}")
    run "${sb[@]}" "$REPO/tools/slurm_launch.sh" "${forward[@]}" -- "${TRAIN_ARGS[@]}"
    ;;
  job)
    # Inside the allocation: one task per process, each on its node (srun inherits --nodes/--ntasks-per-node).
    # The batch script runs from a spool copy, so the tasks start the checkout's own copy of this script.
    job_logs="$REPO/$LOG_DIR/${SLURM_JOB_ID}"
    [[ "$LOG_DIR" == /* ]] && job_logs="$LOG_DIR/${SLURM_JOB_ID}"
    run mkdir -p "$job_logs"
    sr=(srun --kill-on-bad-exit=1 --output="$job_logs/task_%t.log")
    status=0
    run "${sr[@]}" bash "$REPO/tools/slurm_launch.sh" --task "${forward[@]}" -- "${TRAIN_ARGS[@]}" || status=$?
    echo "per-task logs in $job_logs/ (exit status $status)"
    exit $status
    ;;
  task)
    for v in SLURM_JOB_NODELIST SLURM_PROCID SLURM_NTASKS; do
      [[ -n "${!v:-}" ]] || { echo "error: --task runs under srun; $v is not set" >&2; exit 2; }
    done
    coordinator="$(first_host "$SLURM_JOB_NODELIST"):${PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
    exports=("JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$SLURM_NTASKS" "JAX_PROCESS_ID=$SLURM_PROCID")
    # one process per GPU: each sees only its own GPU (the node-local rank), as jax expects with local devices
    [[ $PER_GPU -eq 1 ]] && exports+=("CUDA_VISIBLE_DEVICES=${SLURM_LOCALID:-0}")
    exports+=("${ENVS[@]+"${ENVS[@]}"}")
    cmd=("$PYTHON" -m blip3o_jax.train "${TRAIN_ARGS[@]}")
    if [[ $DRY_RUN -eq 1 ]]; then
      for kv in "${exports[@]}"; do echo "export $(printf '%q' "$kv")"; done
      echo "cd $(printf '%q' "$REPO")"
      printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
      exit 0
    fi
    for kv in "${exports[@]}"; do export "${kv?}"; done
    cd "$REPO"
    exec "${cmd[@]}"
    ;;
esac
