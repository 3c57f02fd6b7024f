"""kill -9 in the middle of a run, rerun the same command: it resumes from the last checkpoint and every following
step's loss is bitwise identical to an uninterrupted run. Also: SIGTERM saves a checkpoint and exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import loop_config  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 32, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data import synthetic
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("shapes")
    synthetic.generate(str(d / "shards"), 256, samples_per_shard=128, image_size=32, max_objects=1, formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


def command(data_dir, workdir):
    # a smaller model (one backbone and one DiT layer) and batch than the demo's, so that each run is quick
    return [sys.executable, "-m", "blip3o_jax.train", "--config", f"{ROOT}/configs/tiny.py:{data_dir}",
            "--workdir", workdir, f"--config.train.total_steps={TOTAL}", f"--config.checkpoint.every={EVERY}",
            "--config.log.every=1", "--config.log.progress_bar=False", "--config.log.tensorboard=False",
            "--config.data.global_batch_size=8", "--config.train.warmup_steps=5",
            "--config.model.backbone.num_hidden_layers=1", "--config.model.dit.n_layers=1"]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop run
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def losses(workdir) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def num_lines(workdir) -> int:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return sum(1 for _ in f)


def committed_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "state",
                                                                                                 "commit_success.txt")))


def wait_for_checkpoint(proc, workdir, step, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s in committed_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before checkpoint {step}:\n"
                                 + proc.stdout.read().decode())
        time.sleep(0.05)
    raise AssertionError("timed out waiting for a checkpoint")


def test_kill9_and_sigterm_then_rerun_resume_bitwise(data_dir, tmp_path):
    uninterrupted = str(tmp_path / "a")
    subprocess.run(command(data_dir, uninterrupted), env=env(), check=True, capture_output=True, timeout=900)
    want = losses(uninterrupted)
    assert sorted(want) == list(range(1, TOTAL + 1))

    # 1. kill -9 after the second checkpoint
    workdir = str(tmp_path / "b")
    proc = subprocess.Popen(command(data_dir, workdir), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_checkpoint(proc, workdir, 2 * EVERY)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(committed_steps(workdir))
    assert killed_at < TOTAL and max(losses(workdir)) < TOTAL, "the run finished before it could be killed"

    # 2. the same command resumes; SIGTERM (preemption) once it has trained a few steps: it saves and exits 0
    lines_before = num_lines(workdir)
    proc = subprocess.Popen(command(data_dir, workdir), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while num_lines(workdir) < lines_before + 2:  # it has resumed and logged steps
        assert proc.poll() is None and time.time() - t0 < 600, proc.stdout.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    out = out.decode()
    assert proc.returncode == 0, out
    assert f"from step {killed_at} " in out
    if "stopped by SIGTERM" in out:  # (it may also have reached the end first)
        stopped_at = max(committed_steps(workdir))
        assert killed_at < stopped_at
    # 3. the same command again finishes the run
    rerun = subprocess.run(command(data_dir, workdir), env=env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    got = losses(workdir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(killed_at + 1, TOTAL + 1):
        assert got[step] == want[step], (step, got[step], want[step])  # bitwise: exact float equality
    assert committed_steps(workdir)[-1] == TOTAL


def test_repeated_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(data_dir, tmp_path):
    """Warm-up from 0 to a learning rate of 1e30: the first update is 0 (finite, checkpointed), every later one
    overflows and is skipped; after `max_consecutive_nonfinite` of them the run stops (exit status 3 from the
    CLI) and the checkpoint of the last finite step is the one kept."""
    from blip3o_jax import train as train_lib

    config = loop_config(data_dir, {  # the train-loop tests' small model (conftest.LOOP_OVERRIDES)
        "train.total_steps": 30, "train.lr": 1e30, "train.min_lr": 1e30, "train.warmup_steps": 3,
        "train.max_consecutive_nonfinite": 3, "checkpoint.every": 1, "log.every": 1, "log.progress_bar": False,
        "log.tensorboard": False, "data.global_batch_size": 8})
    workdir = str(tmp_path / "nan")
    with pytest.raises(train_lib.TrainingStopped, match="3 consecutive steps with a non-finite"):
        train_lib.train(config, workdir)
    logged = losses(workdir)
    assert sorted(logged) == [1, 2, 3, 4]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    assert last["nonfinite_total"] == 3 and not np.isfinite(last["update_norm"])
    assert committed_steps(workdir) == [1]
