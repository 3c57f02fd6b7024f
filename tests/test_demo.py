"""A short `make demo`: synthetic shards -> train the tiny config -> checkpoint -> sample held-out prompts -> PNG
grid + prompt-following score. (The full demo trains longer; its score is in the README.)"""
from __future__ import annotations

import json
import os

import numpy as np

from blip3o_jax import demo


def test_scorer_reads_colour_and_shape_of_real_images_and_rejects_wrong_prompts():
    captions, images = demo.held_out_prompts(48)
    right = demo.score(images, captions)
    assert right["colour"] == 1.0 and right["shape"] >= 0.6  # shapes at 32 px: circle/hexagon blur together
    wrong = demo.score(images, captions[1:] + captions[:1])
    assert wrong["colour"] < 0.4 and wrong["shape"] < 0.5


def test_short_demo_runs_end_to_end(tmp_path):
    workdir = str(tmp_path / "demo")
    summary = demo.run(workdir, steps=30, num_samples=256, num_prompts=6,
                       overrides={"checkpoint.every": 15, "log.every": 10, "log.progress_bar": False,
                                  "data.global_batch_size": 16})
    assert os.path.exists(summary["samples_png"]) and os.path.getsize(summary["samples_png"]) > 1000
    with open(os.path.join(workdir, "score.json")) as f:
        saved = json.load(f)
    assert saved["train_steps"] == 30 and 0.0 <= saved["colour_match"] <= 1.0
    assert saved["colour_match_real_images"] == 1.0
    assert np.isfinite(saved["final_loss"])
    assert sorted(os.listdir(os.path.join(workdir, "run", "checkpoints"))) == ["15", "30"]
