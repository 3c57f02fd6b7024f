"""The train CLI's answers to user mistakes and faults: one `error:` line (exit 2) for data and workdir errors,
`--help` exit 0, config values refused before the workdir is written, a damaged or mismatched checkpoint named
with a way out, a workdir lock, and Ctrl-C saving like SIGTERM. One 6-step run interrupted by SIGINT after step 3
(module fixture) provides the checkpoints."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from blip3o_jax.cli import UserError
from conftest import loop_config  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_config(data_dir, **overrides):
    """The train-loop tests' tiny config (conftest.loop_config: the same programs whatever total_steps is)."""
    base = {"train.total_steps": 6, "log.every": 1, "log.progress_bar": False, "log.tensorboard": False,
            "checkpoint.every": 2, "checkpoint.keep": None, "checkpoint.async_save": False, "log.sample_every": 0}
    base.update(overrides)
    return loop_config(data_dir, base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data import synthetic
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("shapes")
    synthetic.generate(str(d / "shards"), 64, samples_per_shard=64, image_size=32, max_objects=1, formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


@pytest.fixture(scope="module")
def interrupted(data_dir, tmp_path_factory):
    """6 steps, checkpoints every 2; Ctrl-C (SIGINT) arrives while step 3's batch is read: the run saves step 3 and
    returns normally."""
    from blip3o_jax import train as train_lib

    workdir = str(tmp_path_factory.mktemp("run") / "wd")
    calls = {"n": 0}
    original = train_lib._Run.next_batch

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    train_lib._Run.next_batch = next_batch
    handler_before = signal.getsignal(signal.SIGINT)
    try:
        last = train_lib.train(tiny_run_config(data_dir), workdir)
    finally:
        train_lib._Run.next_batch = original
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored after the run
    return dict(workdir=workdir, last=last, data_dir=data_dir)


def steps_of(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


# ---------------------------------------------------------------------------------------------------------------
# 1. cli.run: user errors as one line, --help exit 0


def _run_cli(main, monkeypatch, capsys):
    from blip3o_jax import cli

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("make_error", [
    lambda: __import__("blip3o_jax.data.sources", fromlist=["x"]).DatasetError("data set 'x': a.tar is not a tar"),
    lambda: __import__("blip3o_jax.data.sources", fromlist=["x"]).NoValidSampleError("no valid sample in 'x'"),
    lambda: __import__("blip3o_jax.data.tar_index", fromlist=["x"]).TarIndexError("a.tar.idx is truncated"),
    lambda: PermissionError(13, "Permission denied", "/root/wd"),
    lambda: NotADirectoryError(20, "Not a directory", "/tmp/file/wd"),
], ids=["dataset", "no_valid_sample", "tar_index", "permission", "not_a_dir"])
def test_cli_maps_data_and_path_errors_to_one_line(make_error, monkeypatch, capsys):
    error = make_error()

    def main(argv):
        raise error

    code, err = _run_cli(main, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert (getattr(error, "filename", None) or str(error)) in lines[0]


def test_cli_keeps_the_traceback_of_a_real_bug(monkeypatch, capsys):
    def main(argv):
        raise OSError("a bug, not a path")

    monkeypatch.setattr(sys, "argv", ["prog"])
    from blip3o_jax import cli

    with pytest.raises(OSError, match="a bug"):
        cli.run(main)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_and_lists_config(flag):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "blip3o_jax.train", flag], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--config" in p.stdout and "--workdir" in p.stdout


# ---------------------------------------------------------------------------------------------------------------
# 2. check_config before the workdir is written


@pytest.mark.parametrize("override, message", [
    ({"checkpoint.keep": 0}, "config.checkpoint.keep=0"),
    ({"checkpoint.keep": -1}, "config.checkpoint.keep=-1"),
    ({"checkpoint.every": 0}, "config.checkpoint.every=0"),
    ({"train.lr": -1e-3}, "config.train.lr=-0.001"),
    ({"train.lr": 0.0}, "config.train.lr=0.0"),
    ({"train.total_steps": -5}, "config.train.total_steps=-5"),
    ({"train.total_steps": 0}, "config.train.total_steps=0"),
    ({"train.warmup_ratio": 1.5}, "config.train.warmup_ratio=1.5"),
    ({"train.warmup_steps": -1}, "config.train.warmup_steps=-1"),
    ({"data.global_batch_size": 0}, "config.data.global_batch_size=0"),
    ({"log.sample_every": -1}, "config.log.sample_every=-1"),
])
def test_bad_values_refused_before_the_workdir_is_written(override, message, data_dir, tmp_path):
    from blip3o_jax import train as train_lib

    config = tiny_run_config(data_dir, **override)
    workdir = tmp_path / "wd"
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("-", r"\-")):
        train_lib.train(config, str(workdir))
    assert not workdir.exists()


def test_workdir_under_a_file_or_a_file(data_dir, tmp_path):
    from blip3o_jax import train as train_lib

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=f"{tmp_path}/afile is a file"):
        train_lib.train(tiny_run_config(data_dir), str(tmp_path / "afile" / "wd"))
    with pytest.raises(UserError, match="is a file, not a directory"):
        train_lib.train(tiny_run_config(data_dir), str(tmp_path / "afile"))


def test_unwritable_workdir_named(data_dir, tmp_path, monkeypatch):
    from blip3o_jax import train as train_lib

    # tests may run as root (os.access is always true): simulate the permission the filesystem would refuse
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(UserError, match=f"cannot be created: {tmp_path}/ro is not writable"):
        train_lib.train(tiny_run_config(data_dir), str(tmp_path / "ro" / "wd"))


# ---------------------------------------------------------------------------------------------------------------
# 5. Ctrl-C saves and exits like SIGTERM


def test_sigint_saved_the_step_it_stopped_at(interrupted):
    assert steps_of(interrupted["workdir"]) == [2, 3]
    with open(os.path.join(interrupted["workdir"], "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert not os.path.exists(os.path.join(interrupted["workdir"], ".lock"))  # 4. released at exit


def test_second_sigint_is_not_caught():
    from blip3o_jax.training import checkpoint as ckpt_lib

    before = signal.getsignal(signal.SIGINT)
    watcher = ckpt_lib.PreemptionWatcher()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.requested(1) == (True,) and watcher.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        watcher.restore_handlers()
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------------------------
# 3. damaged checkpoint / changed model config on resume


@pytest.fixture
def copy_of_run(interrupted, tmp_path):
    workdir = str(tmp_path / "wd")
    shutil.copytree(interrupted["workdir"], workdir)
    return workdir


def _damage(workdir, step, how):
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs
                   if "ocdbt" in r or f.startswith("d") or f.endswith(".data"))
    victim = max(files, key=os.path.getsize)
    if how == "deleted":
        os.remove(victim)
    else:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_damaged_latest_checkpoint_is_named_with_a_way_out(how, interrupted, copy_of_run):
    from blip3o_jax import train as train_lib

    _damage(copy_of_run, 3, how)
    with pytest.raises(UserError) as e:
        train_lib.train(tiny_run_config(interrupted["data_dir"]), copy_of_run)
    msg = str(e.value)
    assert "\n" not in msg
    assert "checkpoint step 3" in msg and "cannot be read" in msg and "[2]" in msg
    assert "--config.checkpoint.restore_step" in msg
    assert steps_of(copy_of_run) == [2, 3]  # nothing deleted, no restart from scratch
    assert not os.path.exists(os.path.join(copy_of_run, ".lock"))


def test_restore_step_falls_back_and_sets_newer_steps_aside(interrupted, copy_of_run):
    from blip3o_jax import sharding as shd
    from blip3o_jax import train as train_lib
    from blip3o_jax.training import checkpoint as ckpt_lib
    from blip3o_jax.training import step as step_lib

    _damage(copy_of_run, 3, "truncated")
    config = tiny_run_config(interrupted["data_dir"], **{"checkpoint.restore_step": 2})
    setup = step_lib.make_train_step(config, shd.make_mesh(dict(config.mesh)))
    ckpt = ckpt_lib.Checkpointer(copy_of_run, save_every=2, keep=None, async_save=False)
    try:
        state, _, start = train_lib.initial_state(config, setup, copy_of_run, ckpt)
    finally:
        ckpt.close()
    assert start == 2 and int(state.step) == 2
    assert steps_of(copy_of_run) == [2]
    assert os.listdir(os.path.join(copy_of_run, "checkpoints_set_aside")) == ["3"]

    config = tiny_run_config(interrupted["data_dir"], **{"checkpoint.restore_step": 7})
    with pytest.raises(UserError, match=r"restore_step=7: no such checkpoint .* \(saved steps: \[2\]\)"):
        train_lib.train(config, copy_of_run)


def test_changed_model_config_on_resume_is_named(interrupted, copy_of_run):
    from blip3o_jax import train as train_lib

    config = tiny_run_config(interrupted["data_dir"])
    config.model.dit.n_layers = 2
    with pytest.raises(UserError, match=r"checkpoint step 3 .* different model config \(config\.model\.dit\.n_layers"):
        train_lib.train(config, copy_of_run)


# ---------------------------------------------------------------------------------------------------------------
# 4. the workdir lock


def test_second_run_on_a_locked_workdir_is_refused(interrupted, copy_of_run):
    from blip3o_jax import train as train_lib

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        with open(os.path.join(copy_of_run, ".lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "since": "earlier"}, f)
        with pytest.raises(UserError, match=f"in use by another run \\(process {holder.pid} on host"):
            train_lib.train(tiny_run_config(interrupted["data_dir"]), copy_of_run)
        assert os.path.exists(os.path.join(copy_of_run, ".lock"))  # the other run's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    import socket

    from blip3o_jax.training import workdir as wd

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = tmp_path / ".lock"
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with caplog.at_level(logging.WARNING, logger="blip3o_jax.training.workdir"):
        with wd.WorkdirLock(str(tmp_path)):
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
            with pytest.raises(UserError, match="in use by another run"):  # and it now excludes others
                wd.WorkdirLock(str(tmp_path)).acquire()
    assert f"stale lock {lock_path} of process {dead.pid}" in caplog.text
    assert not lock_path.exists()


# ---------------------------------------------------------------------------------------------------------------
# gs:// workdirs: every file through one path layer


def test_remote_workdir_writes_nothing_locally_and_resumes(data_dir, bucket, capsys):
    """A `gs://bucket/run` workdir with a local folder standing in for the bucket (conftest's `bucket`: the path
    layer's epath backend and the paths handed to Orbax are redirected): every file of the run lands in the bucket
    folder, no local file API ever sees a `gs:` path, and a second run resumes from the bucket's checkpoint."""
    from blip3o_jax import train as train_lib

    config = tiny_run_config(data_dir, **{"train.total_steps": 2, "log.tensorboard": True, "log.sample_every": 2,
                                          "flow.num_inference_steps": 2})
    train_lib.train(config, "gs://bucket/run")
    config = tiny_run_config(data_dir, **{"train.total_steps": 4, "log.tensorboard": True})
    train_lib.train(config, "gs://bucket/run")
    out = capsys.readouterr().out

    assert bucket["local_calls"] == [] and os.listdir(bucket["cwd"]) == []
    run = bucket["root"] / "run"
    names = {str(p.relative_to(run)).split(os.sep)[0] for p in run.rglob("*")}
    assert {"config.json", "metrics.jsonl", "parameter_overview.txt", "tensorboard", "samples", "frozen",
            "checkpoints"} <= names
    assert (run / "samples" / "step_2.png").stat().st_size > 0
    events = [p for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert events and all(p.stat().st_size > 0 for p in events)
    assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit()) == [2, 4]
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # the second run appended after a resume
    assert "training 4 steps from step 2" in out
