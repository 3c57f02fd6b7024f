"""Defaults of the trainer's config keys, written once.

A config may leave any of these keys out (the tests and tools build small configs by hand); every reader goes
through `option` (or `value` for a section passed on its own), so a default is never written in two places.
The data section's defaults are the data pipeline's own (`data.pipeline.default_config`).
"""
from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "": {  # top level
        "init_from": "",  # comma-separated [group=]DIR of converted weights (train.load_init_from)
    },
    "train": {
        "freeze_backbone": True,  # the release trains the DiT and the latent queries only
        "text_loss_weight": 0.0,  # > 0: next-token loss on text rows too (joint training)
        "grad_accum_steps": 1,
        "frozen_param_dtype": "float32",
        "ema_decay": 0.0,  # > 0: keep an exponential moving average of the trainable params
        "max_consecutive_nonfinite": 10,  # stop after this many skipped (NaN/Inf) updates in a row
        "max_seconds": 0,  # wall-clock budget of one invocation; 0: none
        # optimizer and schedule (training/optimizer.py): HF Trainer's AdamW defaults
        "schedule": "cosine",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "min_lr": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "grad_clip_norm": 1.0,
    },
    "log": {
        "every": 50,
        "sigma_buckets": 5,  # loss per σ bucket [k/n, (k+1)/n)
        "tensorboard": True,
        "progress_bar": True,
        # samples while training (train._Samples): every this many steps (0: off) the current weights (the EMA
        # when kept) sample `sample_prompts` with fixed noise; one extra jit, then flow.num_inference_steps model
        # forwards per prompt each time, off the step's hot path (the loop waits for them)
        "sample_every": 0,
        "sample_prompts": ("a red circle", "a blue square", "a green triangle", "a yellow star"),
    },
    "profile": {  # a jax.profiler trace of steps [start_step, start_step + num_steps) in workdir/profile
        "start_step": 0,  # 0: off
        "num_steps": 3,
    },
    "checkpoint": {
        "keep": 2,  # None: keep every checkpoint
        "restore_step": None,  # resume from this step instead of the latest (newer steps are set aside)
        "async_save": True,
        "save_frozen": True,  # write the frozen params once per run (workdir/frozen), for sampling
    },
}


def value(section_cfg, section: str, key: str):
    """`section_cfg[key]` (section_cfg: one section of a config, e.g. `config.train`, or None), else the default."""
    default = DEFAULTS[section][key]
    if section_cfg is None:
        return default
    return section_cfg.get(key, default) if hasattr(section_cfg, "get") else default


def option(config, path: str):
    """The config's value at `path` ("train.ema_decay", or "init_from" at the top level), else its default."""
    section, _, key = path.rpartition(".")
    if not section:
        return value(config, "", key)
    return value(config.get(section) if hasattr(config, "get") else None, section, key)
