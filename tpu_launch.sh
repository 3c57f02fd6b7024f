#!/usr/bin/env bash
# Launch blip3o-jax training on a Cloud TPU VM slice: create the slice (or reuse it), give every worker the same
# Python 3.11 environment with this checkout installed, mount data buckets, run the same train CLI on all workers
# at once, and collect each worker's log.
#
#   ./tpu_launch.sh --name my-v5p --zone us-east5-a --accelerator-type v5p-64 --mount-bucket my-data \
#       --env XLA_FLAGS=--xla_tpu_enable_async_collective_fusion=true \
#       -- --config configs/blip3o_8b.py:'/tmp/gcsfuse/my-data/shards/*.tar' --workdir gs://my-bucket/blip3o_8b
#
# Everything after `--` goes to `python -m blip3o_jax.train`. JAX's multi-controller runtime finds the other
# workers of the slice by itself (sharding.initialize_distributed), so every worker runs the same command.
# The TPU software version follows the accelerator type (v5litepod/v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
# v6e: v2-alpha-tpuv6e, v2/v3/v4: tpu-ubuntu2204-base); those images ship Python 3.10, so the setup step creates a
# Python 3.11 venv with uv (a standalone CPython build, idempotent: kept when present) and installs `.[tpu]` in it.
# --dry-run prints the gcloud commands instead of running them. Full walk-through: docs/launch.md.
set -euo pipefail

NAME=""; ZONE=""; PROJECT=""; ACCEL=""; RUNTIME=""; SPOT=0; QUEUED=0; DRY_RUN=0; SETUP=1
PY_VERSION="3.11"; VENV='$HOME/blip3o-venv'
REMOTE_DIR="blip3o-jax"; LOG_DIR="logs"; NUM_WORKERS=""; ENVS=(); TRAIN_ARGS=(); BUCKETS=()

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'
options:
  --name NAME                TPU VM name (required; also the queued resource's name with --queued)
  --zone ZONE                e.g. us-east5-a (required)
  --accelerator-type TYPE    e.g. v5p-64, v6e-256, v5litepod-16 (required to create; ignored when reusing)
  --project PROJECT          gcloud project (default: gcloud's configured one)
  --runtime-version V        TPU software version (default: from the accelerator type, see above);
                             --version V is the same
  --spot                     create a spot (preemptible) slice; training resumes from its workdir on rerun
  --queued                   create through a queued resource (waits until the capacity is granted: the way
                             to get large v5p/v6e slices and spot capacity); combine with --spot
  --python-version X.Y       Python of the workers' venv (default 3.11, what setup.py requires)
  --venv DIR                 venv directory on the workers (default $HOME/blip3o-venv)
  --mount-bucket B[:PATH]    gcsfuse-mount gs://B read-only on every worker at PATH (default /tmp/gcsfuse/B);
                             repeatable. Point the data globs at PATH (training data is read through the mount)
  --env KEY=VALUE            environment variable for the training processes (repeatable)
  --remote-dir DIR           checkout directory on the workers (default blip3o-jax)
  --log-dir DIR              where worker logs are collected locally (default logs)
  --num-workers N            number of hosts in the slice (default: read from `describe`)
  --no-setup                 skip copying the checkout and installing it (reruns)
  --dry-run                  print the commands instead of running them
USAGE
}

# The Cloud TPU "TPU software versions" page: v5e, v5p and v6e need their own v2-alpha runtime images.
runtime_for() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite";;
    v5p-*) echo "v2-alpha-tpuv5";;
    v6e-*) echo "v2-alpha-tpuv6e";;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base";;
    *) return 1;;
  esac
}

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || { echo "error: $1 expects a value (see --help)" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2;;
    --zone) need_value "$@"; ZONE="$2"; shift 2;;
    --project) need_value "$@"; PROJECT="$2"; shift 2;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2;;
    --runtime-version|--version) need_value "$@"; RUNTIME="$2"; shift 2;;
    --spot) SPOT=1; shift;;
    --queued) QUEUED=1; shift;;
    --python-version) need_value "$@"; PY_VERSION="$2"; shift 2;;
    --venv) need_value "$@"; VENV="$2"; shift 2;;
    --mount-bucket) need_value "$@"; BUCKETS+=("$2"); shift 2;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2;;
    --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2;;
    --num-workers) need_value "$@"; NUM_WORKERS="$2"; shift 2;;
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
[[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version expects X.Y, e.g. 3.11, got $PY_VERSION" >&2; exit 2; }
[[ -z "$NUM_WORKERS" || "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --num-workers expects a positive integer, got $NUM_WORKERS" >&2; exit 2; }
MOUNTS=()  # "bucket mountpoint"
for spec in "${BUCKETS[@]+"${BUCKETS[@]}"}"; do
  bucket="${spec#gs://}"; bucket="${bucket%%:*}"; bucket="${bucket%/}"
  mount_path="/tmp/gcsfuse/$bucket"
  [[ "${spec#gs://}" == *:* ]] && mount_path="${spec##*:}"
  [[ "$bucket" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || { echo "error: --mount-bucket expects BUCKET[:PATH], got $spec" >&2; exit 2; }
  [[ "$mount_path" == /* ]] || { echo "error: --mount-bucket $spec: the mount point must be an absolute path" >&2; exit 2; }
  MOUNTS+=("$bucket $mount_path")
done

GCLOUD=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
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
  if [[ -z "$RUNTIME" ]]; then
    RUNTIME=$(runtime_for "$ACCEL") || {
      echo "error: no default TPU software version for accelerator type $ACCEL; pass --runtime-version" \
           "(see the Cloud TPU 'TPU software versions' page)" >&2; exit 2; }
  fi
  echo "# accelerator $ACCEL -> TPU software version $RUNTIME"
  if [[ $QUEUED -eq 1 ]]; then
    # A queued resource waits for capacity instead of failing when the zone has none at this moment.
    create=("${QR[@]}" create "$NAME" "${COMMON[@]}" --node-id="$NAME" --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    [[ $SPOT -eq 1 ]] && create+=(--spot)
    run "${create[@]}"
    echo "# wait until the queued resource is ACTIVE:"
    run "${QR[@]}" describe "$NAME" "${COMMON[@]}" --format='value(state.state)'
    if [[ $DRY_RUN -eq 0 ]]; then
      while true; do
        state=$("${QR[@]}" describe "$NAME" "${COMMON[@]}" --format='value(state.state)')
        case "$state" in
          ACTIVE) break;;
          FAILED|SUSPENDED) echo "error: queued resource $NAME is $state" >&2; exit 1;;
          *) echo "queued resource $NAME: $state; waiting"; sleep 60;;
        esac
      done
    fi
  else
    create=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
    [[ $SPOT -eq 1 ]] && create+=(--spot)
    run "${create[@]}"
  fi
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
PY="$VENV/bin/python"

# 2. Every worker: a Python $PY_VERSION venv (uv fetches a standalone CPython; skipped when the venv already has
#    the right Python), then this checkout (committed files only) installed into it with the TPU extra.
if [[ $SETUP -eq 1 ]]; then
  TARBALL="/tmp/blip3o-jax-$$.tar.gz"
  run git -C "$(dirname "$0")" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:blip3o-jax.tar.gz" "${COMMON[@]}" --worker=all
  want="(${PY_VERSION/./, })"
  setup="set -e; export PATH=\$HOME/.local/bin:\$PATH"
  setup+="; if ! $PY -c 'import sys; sys.exit(sys.version_info[:2] != $want)' 2>/dev/null; then"
  setup+=" command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh"
  setup+="; uv venv --python $PY_VERSION --seed $VENV; fi"
  setup+="; mkdir -p $REMOTE_DIR && tar -xzf blip3o-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
  setup+=" && uv pip install --python $PY -q -e '.[tpu]'"
  run "${SSH[@]}" --command="$setup"
fi

# 3. Data buckets: gcsfuse mounts (read-only, metadata cached for the run, as recommended for Grain), idempotent.
if [[ ${#MOUNTS[@]} -gt 0 ]]; then
  mount="set -e; if ! command -v gcsfuse >/dev/null; then"
  mount+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  mount+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
  mount+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
  for m in "${MOUNTS[@]}"; do
    read -r bucket mount_path <<<"$m"
    mount+="; mkdir -p $mount_path 2>/dev/null || { sudo mkdir -p $mount_path && sudo chown \$(id -u):\$(id -g) $mount_path; }"
    mount+="; mountpoint -q $mount_path || gcsfuse -o ro --implicit-dirs"
    mount+=" --type-cache-max-size-mb=-1 --stat-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1"
    mount+=" --metadata-cache-ttl-secs=-1 $bucket $mount_path"
  done
  run "${SSH[@]}" --command="$mount"
fi

# 4. Run the same CLI on all workers; each keeps its own log.
env_prefix=""
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do env_prefix+="export $(printf '%q' "$kv"); "; done
train_cmd="set -o pipefail; cd $REMOTE_DIR && ${env_prefix}$PY -m blip3o_jax.train"
for a in "${TRAIN_ARGS[@]}"; do train_cmd+=" $(printf '%q' "$a")"; done
train_cmd+=" 2>&1 | tee \$HOME/blip3o_train.log"
status=0
run "${SSH[@]}" --command="$train_cmd" || status=$?

# 5. Collect every worker's log, also after a failure.
run mkdir -p "$LOG_DIR"
for ((w = 0; w < NUM_WORKERS; w++)); do
  run "${GCLOUD[@]}" scp "$NAME:blip3o_train.log" "$LOG_DIR/worker_$w.log" "${COMMON[@]}" --worker="$w" || true
done
[[ $DRY_RUN -eq 1 ]] || echo "logs in $LOG_DIR/ (exit status $status)"
exit $status
