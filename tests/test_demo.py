"""A short `make demo`: synthetic shards -> train the tiny config -> checkpoint -> `blip3o-sample t2i` on the run's
workdir (held-out prompts) -> PNG grid + prompt-following score. (The full demo trains longer; its score is in the
README.)"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from blip3o_jax import demo
from conftest import LOOP_OVERRIDES  # noqa: E402  (tests/ is on sys.path under pytest)


def test_scorer_reads_colour_and_shape_of_real_images_and_rejects_wrong_prompts():
    captions, images = demo.held_out_prompts(48)
    right = demo.score(images, captions)
    assert right["colour"] == 1.0 and right["shape"] >= 0.6  # shapes at 32 px: circle/hexagon blur together
    wrong = demo.score(images, captions[1:] + captions[:1])
    assert wrong["colour"] < 0.4 and wrong["shape"] < 0.5


def test_short_demo_runs_end_to_end(tmp_path):
    workdir = str(tmp_path / "demo")
    # the train-loop tests' smaller model and batch (conftest.LOOP_OVERRIDES): their compiled programs
    summary = demo.run(workdir, steps=30, num_samples=256, num_prompts=6,
                       overrides={**LOOP_OVERRIDES, "checkpoint.every": 15, "log.every": 10,
                                  "log.progress_bar": False})
    assert os.path.exists(summary["samples_png"]) and os.path.getsize(summary["samples_png"]) > 1000
    with open(os.path.join(workdir, "score.json")) as f:
        saved = json.load(f)
    assert saved["train_steps"] == 30 and 0.0 <= saved["colour_match"] <= 1.0
    assert saved["colour_match_real_images"] == 1.0
    assert np.isfinite(saved["final_loss"])
    assert sorted(os.listdir(os.path.join(workdir, "run", "checkpoints"))) == ["15", "30"]
    # the samples came from the CLI on the run's workdir: its PNGs (pixels straight from the DiT, no decoder), its
    # run.json, and the scored images are those PNGs
    samples = saved["samples_dir"]
    cli_run = json.load(open(os.path.join(samples, "run.json")))
    assert cli_run["command"] == "t2i" and cli_run["complete"] and cli_run["images_written"] == 6
    assert cli_run["model"]["layout"] == "workdir" and "decoder" not in cli_run["model"]
    assert cli_run["model"]["step_dir"].endswith(os.path.join("checkpoints", "30"))
    assert cli_run["settings"]["dit_steps"] == 20 and cli_run["settings"]["resolution"] == 32  # configs/tiny.py
    pngs = sorted(n for n in os.listdir(samples) if n.endswith("_00.png"))
    assert pngs == [f"{i:05d}_00.png" for i in range(6)]
    captions, _ = demo.held_out_prompts(6)
    assert [json.loads(line)["prompt"] for line in open(os.path.join(samples, "prompts.jsonl"))] == captions
    images = np.stack([np.asarray(Image.open(os.path.join(samples, n))) for n in pngs])
    assert images.shape == (6, 32, 32, 3) and images.std() > 1
    assert saved["colour_match"] == demo.score(images, captions)["colour"]
