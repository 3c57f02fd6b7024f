"""clu in the training loop: clu.metrics window averages, the parameter overview, a profiler capture, and sample
grids in TensorBoard while training. One 4-step run of configs/tiny.py (module fixture) serves every test."""
from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pytest

from conftest import loop_config, tensorboard_image_events  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_config(data_dir, **overrides):
    """The train-loop tests' tiny config (conftest.loop_config: the same programs as test_train_hardening's runs)."""
    base = {"train.total_steps": 4, "log.every": 2, "log.progress_bar": False, "checkpoint.every": 2,
            "checkpoint.async_save": False, "flow.num_inference_steps": 2}
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
def run(data_dir, tmp_path_factory):
    """4 steps with samples every 2 steps, a profile of steps 2-3, metrics logged every 2 steps."""
    from blip3o_jax import train as train_lib

    workdir = str(tmp_path_factory.mktemp("run") / "wd")
    config = tiny_run_config(data_dir, **{"log.sample_every": 2, "profile.start_step": 2, "profile.num_steps": 2})
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("blip3o_jax.train")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        last = train_lib.train(config, workdir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return dict(workdir=workdir, last=last, log=records)


def test_step_collection_averages_and_keeps_last_values():
    from blip3o_jax.training import metrics as metrics_lib

    steps = [dict(loss=1.0, grad_norm=2.0, lr=0.1, param_norm=5.0, nonfinite_total=0,
                  sigma_sum=np.array([2.0, 0.0]), sigma_count=np.array([1.0, 0.0])),
             dict(loss=3.0, grad_norm=4.0, lr=0.2, param_norm=6.0, nonfinite_total=1,
                  sigma_sum=np.array([4.0, 0.0]), sigma_count=np.array([3.0, 0.0]))]
    window = metrics_lib.step_collection(steps[0]).merge(metrics_lib.step_collection(steps[1]))
    out = metrics_lib.window_summary(window)
    assert out["loss"] == 2.0 and out["grad_norm"] == 3.0  # averages
    assert out["lr"] == 0.2 and out["param_norm"] == 6.0 and out["nonfinite_total"] == 1  # last values
    assert out["loss_sigma_0.0_0.5"] == 1.5 and np.isnan(out["loss_sigma_0.5_1.0"])  # sum/count per bucket


def test_hand_written_window_is_gone():
    with open(os.path.join(ROOT, "blip3o_jax", "train.py")) as f:
        src = f.read()
    assert "_Window" not in src and "_summarise" not in src
    with open(os.path.join(ROOT, "blip3o_jax", "training", "metrics.py")) as f:
        assert "clu_metrics.Average" in f.read()


def test_logged_metrics_are_window_averages(run):
    with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["lr"] > 0 and "loss_sigma_0.0_0.2" in r and r["samples_per_s"] > 0


def test_parameter_overview_in_log_and_file(run):
    with open(os.path.join(run["workdir"], "parameter_overview.txt")) as f:
        text = f.read()
    assert "trainable parameters:" in text and "frozen parameters:" in text
    assert "dit/" in text and "backbone/" in text and "Sharding" in text
    assert any("parameter overview" in m and "latent_queries" in m for m in run["log"])


def test_profile_capture_writes_a_trace(run):
    traces = glob.glob(os.path.join(run["workdir"], "profile", "**", "*.xplane.pb"), recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0


def test_samples_written_as_png_and_tensorboard_images(run):
    from PIL import Image

    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run["workdir"], "samples", "*.png")))
    assert pngs == ["step_2.png", "step_4.png"]
    a = np.asarray(Image.open(os.path.join(run["workdir"], "samples", "step_2.png")))
    b = np.asarray(Image.open(os.path.join(run["workdir"], "samples", "step_4.png")))
    assert a.shape == b.shape and a.shape[0] > 32 and not np.array_equal(a, b)  # the weights moved between them
    events = tensorboard_image_events(os.path.join(run["workdir"], "tensorboard"))
    assert [(s, t) for s, t, _, _ in events] == [(2, "samples"), (4, "samples")]
    assert events[0][2:] == (a.shape[1], a.shape[0])


def test_writer_has_the_clu_metric_writer_methods(tmp_path):
    from blip3o_jax.training import metrics as metrics_lib

    w = metrics_lib.MetricWriter(str(tmp_path), stdout=False)
    w.write_scalars(3, {"loss": 0.5})
    w.write_images(3, {"x": np.zeros((2, 4, 4, 3), np.uint8)})
    w.write_texts(3, {"note": "hello"})
    w.flush()
    w.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.read()) == {"step": 3, "loss": 0.5}
    events = tensorboard_image_events(str(tmp_path / "tensorboard"))
    assert [(s, t) for s, t, _, _ in events] == [(3, "x/0"), (3, "x/1")]
