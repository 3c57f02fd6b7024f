"""Multi-host training over loopback: 2 processes x 4 simulated CPU devices, through the real train CLI.

JAX's multi-controller runtime (`jax.distributed.initialize` on 127.0.0.1, gloo CPU collectives) connects the two
processes exactly as it connects the hosts of a TPU slice; each process reads its own slice of every global batch
and both write one Orbax checkpoint. Checked here:
- the loss trajectory equals a single-process run on 8 devices (same mesh shape) within 1e-5;
- a second 2-process launch resumes from the checkpoint (step and data position restored on both processes);
- when one process is killed, the other exits on its own with the distributed runtime's error within a bounded
  time (heartbeat timeout) instead of hanging in a collective.
Every subprocess runs under a timeout and is killed in a `finally`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CPU_TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 5  # failure detection of a dead process (sharding.initialize_distributed)
RUN_TIMEOUT_S = 240
STEPS_FIRST, STEPS_TOTAL = 4, 6

# The tiny config made smaller (compile time dominates), with a schedule that does not depend on total_steps
# (so the kill run below, launched with a huge total_steps, takes the same first steps).
OVERRIDES = [
    "--config.model.backbone.num_hidden_layers=1",
    "--config.model.dit.n_layers=1",
    "--config.model.dit.dim=64",
    "--config.train.schedule=constant",
    "--config.train.warmup_steps=0",
    "--config.checkpoint.every=2",
    "--config.checkpoint.async_save=False",
    "--config.log.every=1",
    "--config.log.tensorboard=False",
    "--config.log.progress_bar=False",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data import synthetic
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("mh_data")
    synthetic.generate(str(d / "shards"), 512, samples_per_shard=256, image_size=32, max_objects=1,
                       formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


def _env(num_devices: int, cache_dir: str, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices} {CPU_TEST_XLA_FLAGS}",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        # the 2-process launches compile the same program: the second reuses the first's executable
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    })
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_cmd(data_dir: str, workdir: str, total_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blip3o_jax.train", f"--config={ROOT}/configs/tiny.py:{data_dir}",
            f"--workdir={workdir}", f"--config.train.total_steps={total_steps}", *OVERRIDES, *extra]


class Procs:
    """Launches the processes of one run; always killed (whole process group) on exit."""

    def __init__(self, cmds_envs, log_dir: str, tag: str):
        self.procs, self.logs = [], []
        for i, (cmd, env) in enumerate(cmds_envs):
            log = open(os.path.join(log_dir, f"{tag}_{i}.log"), "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes

    def output(self, i: int) -> str:
        self.logs[i].flush()
        self.logs[i].seek(0)
        return self.logs[i].read()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        for log in self.logs:
            log.close()


def _two_process(data_dir, workdir, total_steps, port, cache_dir, *extra):
    return [(_train_cmd(data_dir, workdir, total_steps, *extra),
             _env(4, cache_dir, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid,
                  BLIP3O_HEARTBEAT_TIMEOUT_S=HEARTBEAT_S, BLIP3O_INIT_TIMEOUT_S=90))
            for pid in range(2)]


def _losses(workdir: str) -> dict[int, float]:
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "loss" in rec:
                    out[int(rec["step"])] = float(rec["loss"])
    return out


def _check(procs: Procs, codes: list[int]):
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited with {code}:\n{procs.output(i)[-4000:]}"


def test_two_processes_match_one_resume_and_fail_fast(data_dir, tmp_path):
    import portpicker

    cache_dir = str(tmp_path / "compile_cache")
    t0 = time.monotonic()

    # 1. reference: one process, 8 devices (the same (data=8) mesh), STEPS_TOTAL steps; at the same time
    # 2. two processes, STEPS_FIRST steps; both write the checkpoint (state shards + one data state per process)
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    port = portpicker.pick_unused_port()
    launches = [(_train_cmd(data_dir, single, STEPS_TOTAL), _env(8, cache_dir)),
                *_two_process(data_dir, multi, STEPS_FIRST, port, cache_dir)]
    with Procs(launches, str(tmp_path), "first") as p:
        _check(p, p.wait(RUN_TIMEOUT_S))
    reference = _losses(single)
    assert sorted(reference) == list(range(1, STEPS_TOTAL + 1))
    ckpt = os.path.join(multi, "checkpoints", str(STEPS_FIRST))
    assert os.path.isdir(os.path.join(ckpt, "state"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(ckpt, "data")))
    for pid in range(2):
        with open(os.path.join(ckpt, "data", f"process_{pid}-of-2.json")) as f:
            assert json.load(f)["step"] == STEPS_FIRST

    # 3. relaunch: resumes from step STEPS_FIRST; run on (huge total_steps), then kill process 1 once past
    #    STEPS_TOTAL: process 0 must notice and exit by itself within the heartbeat timeout (+ slack)
    port = portpicker.pick_unused_port()
    cmds = _two_process(data_dir, multi, 10**6, port, cache_dir, "--config.checkpoint.every=100000")
    with Procs(cmds, str(tmp_path), "resume") as p:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while max(_losses(multi), default=0) < STEPS_TOTAL + 1:
            codes = [q.poll() for q in p.procs]
            assert all(c is None for c in codes), f"a process ended early ({codes}):\n{p.output(0)[-4000:]}"
            assert time.monotonic() < deadline, f"no progress past step {STEPS_TOTAL}:\n{p.output(0)[-4000:]}"
            time.sleep(0.5)
        out0 = p.output(0)
        assert f"from step {STEPS_FIRST}" in out0, out0[-3000:]  # the trainer's banner: resumed, not restarted
        os.killpg(p.procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = p.procs[0].wait(timeout=HEARTBEAT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {HEARTBEAT_S + 60} s after process 1 was killed (hang)")
        took = time.monotonic() - killed_at
        out0 = p.output(0)
    assert code != 0, "process 0 exited cleanly although its peer died"
    # how the runtime reports the dead peer depends on where process 0 is when the peer dies: the coordination
    # service ("another task died", missed heartbeats) or, mid-collective, gloo's transport (a connection closed or
    # a truncated message: "Received data size doesn't match expected size")
    peer_died = ("another task died", "stopped sending heartbeats", "Received data size doesn't match",
                 "Connection closed by peer", "Connection reset by peer")
    assert any(m in out0 for m in peer_died), out0[-3000:]
    assert took <= HEARTBEAT_S + 60

    losses = _losses(multi)
    steps = list(range(1, STEPS_TOTAL + 1))
    got = np.array([losses[s] for s in steps])
    want = np.array([reference[s] for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got)) and len(set(np.round(got, 6))) > 1  # a real trajectory, not a constant
    print(f"multihost test: {time.monotonic() - t0:.1f} s; peer death detected in {took:.1f} s")
