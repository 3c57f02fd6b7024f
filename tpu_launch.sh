#!/usr/bin/env bash
# Launch blip3o-jax training on a Cloud TPU VM slice: create the slice (or reuse it), copy this checkout to every
# worker, install, run the same train CLI on all workers at once, and collect each worker's log.
#
#   ./tpu_launch.sh --name my-v5p --zone us-east5-a --accelerator-type v5p-64 \
#       --env XLA_FLAGS=--xla_tpu_enable_async_collective_fusion=true \
#       -- --config configs/blip3o_8b.py --workdir gs://my-bucket/blip3o_8b
#
# Everything after `--` goes to `python -m blip3o_jax.train`. JAX's multi-controller runtime finds the other
# workers of the slice by itself (sharding.initialize_distributed), so every worker runs the same command.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

NAME=""; ZONE=""; PROJECT=""; ACCEL=""; VERSION="tpu-ubuntu2204-base"; SPOT=0; DRY_RUN=0; SETUP=1
REMOTE_DIR="blip3o-jax"; LOG_DIR="logs"; NUM_WORKERS=""; ENVS=(); TRAIN_ARGS=()

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'
options:
  --name NAME                TPU VM name (required)
  --zone ZONE                e.g. us-east5-a (required)
  --accelerator-type TYPE    e.g. v5p-64, v6e-256, v5litepod-16 (required to create; ignored when reusing)
  --project PROJECT          gcloud project (default: gcloud's configured one)
  --version VERSION          TPU software version (default tpu-ubuntu2204-base)
  --spot                     create a spot (preemptible) slice; training resumes from its workdir on rerun
  --env KEY=VALUE            environment variable for the training processes (repeatable)
  --remote-dir DIR           checkout directory on the workers (default blip3o-jax)
  --log-dir DIR              where worker logs are collected locally (default logs)
  --num-workers N            number of hosts in the slice (default: read from `describe`)
  --no-setup                 skip copying the checkout and pip install (reruns)
  --dry-run                  print the commands instead of running them
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --accelerator-type) ACCEL="$2"; shift 2;;
    --version) VERSION="$2"; shift 2;;
    --spot) SPOT=1; shift;;
    --env) ENVS+=("$2"); shift 2;;
    --remote-dir) REMOTE_DIR="$2"; shift 2;;
    --log-dir) LOG_DIR="$2"; shift 2;;
    --num-workers) NUM_WORKERS="$2"; shift 2;;
    --no-setup) SETUP=0; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; TRAIN_ARGS=("$@"); break;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

[[ -n "$NAME" ]] || { echo "error: --name is required" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "error: --zone is required" >&2; exit 2; }
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || { echo "error: pass the train arguments after --, e.g. -- --config configs/tiny.py --workdir DIR" >&2; exit 2; }
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  [[ "$kv" == *=* ]] || { echo "error: --env expects KEY=VALUE, got $kv" >&2; exit 2; }
done

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# Prints a command (dry run) or runs it.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# 1. Create the slice unless it exists.
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# reuse the slice if it exists:"
  run "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format=json
  echo "# otherwise create it:"
  exists=0
else
  if "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format=json >/tmp/tpu_describe_$$.json 2>/dev/null; then
    exists=1; echo "reusing TPU VM $NAME"
  else
    exists=0
  fi
fi
if [[ $exists -eq 0 ]]; then
  [[ -n "$ACCEL" ]] || { echo "error: TPU VM $NAME does not exist; pass --accelerator-type to create it" >&2; exit 2; }
  create=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
  [[ $DRY_RUN -eq 1 ]] || "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format=json >/tmp/tpu_describe_$$.json
fi
if [[ -z "$NUM_WORKERS" ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then
    NUM_WORKERS=1
  else
    NUM_WORKERS=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1])).get("networkEndpoints", [])) or 1)' /tmp/tpu_describe_$$.json)
    rm -f /tmp/tpu_describe_$$.json
  fi
fi

SSH=("${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all)

# 2. Copy this checkout (committed files only) to every worker and install it with the TPU extra.
if [[ $SETUP -eq 1 ]]; then
  TARBALL="/tmp/blip3o-jax-$$.tar.gz"
  run git -C "$(dirname "$0")" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:blip3o-jax.tar.gz" "${COMMON[@]}" --worker=all
  run "${SSH[@]}" --command="mkdir -p $REMOTE_DIR && tar -xzf blip3o-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
fi

# 3. Run the same CLI on all workers; each keeps its own log.
env_prefix=""
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do env_prefix+="export $(printf '%q' "$kv"); "; done
train_cmd="set -o pipefail; cd $REMOTE_DIR && ${env_prefix}python3 -m blip3o_jax.train"
for a in "${TRAIN_ARGS[@]}"; do train_cmd+=" $(printf '%q' "$a")"; done
train_cmd+=" 2>&1 | tee \$HOME/blip3o_train.log"
status=0
run "${SSH[@]}" --command="$train_cmd" || status=$?

# 4. Collect every worker's log, also after a failure.
run mkdir -p "$LOG_DIR"
for ((w = 0; w < NUM_WORKERS; w++)); do
  run "${GCLOUD[@]}" scp "$NAME:blip3o_train.log" "$LOG_DIR/worker_$w.log" "${COMMON[@]}" --worker="$w" || true
done
[[ $DRY_RUN -eq 1 ]] || echo "logs in $LOG_DIR/ (exit status $status)"
exit $status
