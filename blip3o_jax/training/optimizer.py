"""Optimizer, learning-rate schedule and the trainable/frozen split of the parameters.

The release trains with HF Trainer's AdamW (β 0.9/0.999, eps 1e-8, weight decay 0), linear warm-up over
`warmup_ratio` 0.003 of the steps, then cosine to `min_lr` (1e-5 pretrain, 0 for SFT), gradient clipping at 1.0
(the ZeRO-2 config without clipping diverged, issue #75).
"""
from __future__ import annotations

import jax
import optax

from blip3o_jax.training import defaults

# Top-level parameter groups of the BLIP3-o model (see models/blip3o.py) and when each one trains.
ALWAYS_TRAINABLE = ("latent_queries", "dit", "mse_head")  # the release trains these
JOINT_TRAINABLE = ("backbone", "mm_projector")  # also trained when freeze_backbone=False (Qwen3-SigLIP2 joint)
# Never trained here: the understanding vision tower ("visual") and the generation encoder ("gen_encoder").


def trainable_groups(param_groups, freeze_backbone: bool) -> tuple[str, ...]:
    """Names of the top-level param groups that receive gradients."""
    names = ALWAYS_TRAINABLE + (() if freeze_backbone else JOINT_TRAINABLE)
    return tuple(k for k in param_groups if k in names)


def split_params(params: dict, freeze_backbone: bool) -> tuple[dict, dict]:
    """(trainable, frozen): two dicts of top-level groups; `merge_params` is the inverse."""
    names = trainable_groups(params.keys(), freeze_backbone)
    trainable = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    overlap = set(trainable) & set(frozen)
    if overlap:
        raise ValueError(f"param groups {sorted(overlap)} are both trainable and frozen")
    return {**frozen, **trainable}


def learning_rate_schedule(cfg) -> optax.Schedule:
    """`cfg` = config.train: lr, min_lr, schedule (cosine|constant|linear), warmup_steps or warmup_ratio, total_steps."""
    total = int(cfg.total_steps)
    option = lambda key: defaults.value(cfg, "train", key)  # noqa: E731
    warmup = int(option("warmup_steps") or round(float(option("warmup_ratio")) * total))
    warmup = min(warmup, total)
    lr, min_lr = float(cfg.lr), float(option("min_lr"))
    kind = option("schedule")
    if kind == "cosine":
        # HF `cosine_with_min_lr`: linear 0 -> lr over `warmup` steps, then half a cosine from lr to min_lr.
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), min_lr)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, min_lr, max(total - warmup, 1))],
            [warmup],
        )
    if kind == "constant":  # the authors' 8B run used a constant 1e-4
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"config.train.schedule={kind!r}; expected cosine, linear or constant")


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; `cfg` = config.train."""
    schedule = learning_rate_schedule(cfg)
    option = lambda key: defaults.value(cfg, "train", key)  # noqa: E731
    parts = []
    if option("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(option("grad_clip_norm"))))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(option("b1")),
            b2=float(option("b2")),
            eps=float(option("eps")),
            weight_decay=float(option("weight_decay")),
            # no decay on 1-D params (norm scales, biases) and the latent queries, as is usual with AdamW
            mask=lambda p: jax.tree.map(lambda x: getattr(x, "ndim", 0) > 1, p),
        )
    )
    return optax.chain(*parts), schedule
