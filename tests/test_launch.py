"""The launchers' dry runs: tpu_launch.sh (runtime per TPU generation, the Python 3.11 venv, queued resources, spot,
gcsfuse mounts) and tools/slurm_launch.sh (sbatch, srun, and jax.distributed from the SLURM variables)."""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "tpu_launch.sh")
SLURM = os.path.join(ROOT, "tools", "slurm_launch.sh")
TRAIN = ["--", "--config", "configs/blip3o_8b.py", "--workdir", "gs://bucket/run"]


def commands(script, *args, env=None):
    """Every printed command of a dry run, as argv lists (the script prints them `printf %q`-quoted)."""
    result = subprocess.run([script, *args], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")], result.stdout


def remote(cmds, needle):
    """The --command= scripts of the `ssh --worker=all` commands containing `needle`."""
    found = [a.split("=", 1)[1] for c in cmds if "ssh" in c for a in c if a.startswith("--command=") and needle in a]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("accel, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-8", "tpu-ubuntu2204-base"),
])
def test_tpu_runtime_follows_the_accelerator_and_every_worker_gets_python_3_11(accel, runtime):
    """The slice used to be created with tpu-ubuntu2204-base whatever the type, and the package installed into
    the image's Python 3.10, where setup.py (python_requires 3.11) refuses it."""
    cmds, out = commands(TPU, "--name", "pod", "--zone", "z", "--accelerator-type", accel, "--dry-run", *TRAIN)
    create = [c for c in cmds if c[4:5] == ["create"]]
    assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=z",
                       f"--accelerator-type={accel}", f"--version={runtime}"]]
    setup = remote(cmds, "uv venv")
    # idempotent: the venv is created only when it does not already run Python 3.11
    assert "if ! $HOME/blip3o-venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'" in setup
    assert "uv venv --python 3.11 --seed $HOME/blip3o-venv; fi" in setup
    assert "uv pip install --python $HOME/blip3o-venv/bin/python -q -e '.[tpu]'" in setup
    train = remote(cmds, "blip3o_jax.train")
    assert "$HOME/blip3o-venv/bin/python -m blip3o_jax.train --config configs/blip3o_8b.py" in train
    assert cmds.index(next(c for c in cmds if "--command=" + setup in c)) < cmds.index(
        next(c for c in cmds if "--command=" + train in c))


def test_tpu_override_queued_spot_mounts_and_bad_options():
    cmds, _ = commands(TPU, "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-128", "--runtime-version",
                       "v2-alpha-tpuv5-custom", "--queued", "--spot", "--python-version", "3.11",
                       "--mount-bucket", "gs://my-data", "--mount-bucket", "other:/mnt/other", "--no-setup",
                       "--dry-run", *TRAIN)
    assert ["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--zone=z", "--node-id=pod",
            "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5-custom", "--spot"] in cmds
    assert ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod", "--zone=z",
            "--format=value(state.state)"] in cmds
    assert not [c for c in cmds if c[4:5] == ["create"] and c[3] == "tpu-vm"]
    mount = remote(cmds, "gcsfuse")
    assert "command -v gcsfuse" in mount and "apt-get install -y -qq gcsfuse" in mount
    for bucket, path in (("my-data", "/tmp/gcsfuse/my-data"), ("other", "/mnt/other")):
        assert (f"mountpoint -q {path} || gcsfuse -o ro --implicit-dirs --type-cache-max-size-mb=-1 "
                f"--stat-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 --metadata-cache-ttl-secs=-1 "
                f"{bucket} {path}") in mount
    assert not [c for c in cmds if any("uv venv" in a for a in c)]  # --no-setup
    for bad, message in [(["--accelerator-type", "tpu7x-8"], "no default TPU software version for accelerator "
                           "type tpu7x-8; pass --runtime-version"),
                         (["--accelerator-type", "v5p-8", "--mount-bucket", "b:relative"], "must be an absolute path"),
                         (["--accelerator-type", "v5p-8", "--python-version", "3"], "expects X.Y"),
                         (["--accelerator-type"], "--accelerator-type expects a value")]:
        result = subprocess.run([TPU, "--name", "p", "--zone", "z", "--dry-run", *bad, *TRAIN],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)


def slurm_env(**values):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(values)
    return env


def test_slurm_task_sets_jax_distributed_from_the_slurm_variables():
    env = slurm_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[03-05,09],cpu1", SLURM_PROCID="2",
                    SLURM_NTASKS="4", SLURM_LOCALID="0")
    cmds, out = commands(SLURM, "--task", "--dry-run", "--env", "NCCL_DEBUG=WARN", *TRAIN, env=env)
    exports = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("export ")]
    assert exports == ["JAX_COORDINATOR_ADDRESS=gpu03:24242", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=2",
                       "NCCL_DEBUG=WARN"]
    assert cmds == [["python3", "-m", "blip3o_jax.train", "--config", "configs/blip3o_8b.py", "--workdir",
                     "gs://bucket/run"]]
    # one process per GPU: the node-local rank picks the GPU; an explicit port and interpreter
    env.update(SLURM_JOB_NODELIST="node7,node8", SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3")
    cmds, out = commands(SLURM, "--task", "--dry-run", "--process-per-gpu", "--port", "5555", "--python",
                         "/venv/bin/python", *TRAIN, env=env)
    assert "export JAX_COORDINATOR_ADDRESS=node7:5555" in out and "export JAX_PROCESS_ID=11" in out
    assert "export JAX_NUM_PROCESSES=16" in out and "export CUDA_VISIBLE_DEVICES=3" in out
    assert cmds[0][:3] == ["/venv/bin/python", "-m", "blip3o_jax.train"]
    missing = subprocess.run([SLURM, "--task", *TRAIN], capture_output=True, text=True, env=slurm_env(),
                             timeout=60)
    assert missing.returncode == 2 and "SLURM_JOB_NODELIST is not set" in missing.stderr


def test_slurm_submit_and_job_steps():
    cmds, _ = commands(SLURM, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "48:00:00",
                       "--sbatch-arg=--qos=high", "--repo", "/shared/blip3o-jax", "--dry-run", *TRAIN, env=slurm_env())
    assert cmds == [["sbatch", "--chdir=/shared/blip3o-jax", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                     "--time=48:00:00", "--qos=high", "/shared/blip3o-jax/tools/slurm_launch.sh", "--python",
                     "python3", "--repo", "/shared/blip3o-jax", "--log-dir", "logs", "--", "--config",
                     "configs/blip3o_8b.py", "--workdir", "gs://bucket/run"]]
    # inside the allocation (the batch script): one srun step, per-task logs under logs/<job id>/
    cmds, _ = commands(SLURM, "--repo", "/shared/blip3o-jax", "--dry-run", *TRAIN,
                       env=slurm_env(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n[1-4]"))
    assert cmds[0] == ["mkdir", "-p", "/shared/blip3o-jax/logs/77"]
    assert cmds[1][:3] == ["srun", "--kill-on-bad-exit=1", "--output=/shared/blip3o-jax/logs/77/task_%t.log"]
    assert cmds[1][3:6] == ["bash", "/shared/blip3o-jax/tools/slurm_launch.sh", "--task"]
    assert cmds[1][cmds[1].index("--"):] == TRAIN
    with open(SLURM) as f:  # sbatch-able as is
        head = f.read().splitlines()[:8]
    assert head[0] == "#!/usr/bin/env bash" and "#SBATCH --ntasks-per-node=1" in head
