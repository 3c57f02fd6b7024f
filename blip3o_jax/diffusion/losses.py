"""The `clip_mse` objective of BLIP3-o: deterministic regression of the CLIP grid from the query
states. A small projection head (models/dit.py `MSEHead`: Linear -> GELU(tanh) -> Linear, per token) maps the
N = (H/p)·(W/p) query states (B, N, D_llm) to the (B, H, W, C) grid in row-major token order, trained with a plain
fp32 MSE. No noise, no CFG; generation is one head call. The paper's definition; the original release has no code
for it.

The released models' objective, `clip_fm` (flow matching over the 8x8x1792 EVA-CLIP grid with the DiT, sampled
with Euler + CFG), is diffusion/flow_matching.py `training_loss` and `sample`. The train step (training/step.py)
picks one by `model.loss`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from blip3o_jax.models import dit as dit_lib

MSEHead = dit_lib.MSEHead  # the clip_mse head is a model: models/dit.py


def build_head(cfg: dit_lib.DiTConfig) -> MSEHead:
    """The clip_mse head for a DiT config: hidden width = cfg.dim, target grid = (input_size, input_size, in_channels)."""
    return MSEHead(cfg)


def per_sample_mse(prediction, targets) -> jax.Array:
    """(B,) mean squared error of each sample, in fp32 (`targets` fp32, as the train step's target grids)."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - targets), axis=tuple(range(1, targets.ndim)))


def clip_mse_loss(apply_fn, params, x0, cond, cond_mask=None) -> tuple[jax.Array, dict[str, Any]]:
    """MSE between the head's grid and the target x0 (B, H, W, C): (loss fp32, aux {"per_sample_loss"}).

    apply_fn(params, cond, cond_mask) -> (B, H, W, C).
    """
    per_sample = per_sample_mse(apply_fn(params, cond, cond_mask), x0.astype(jnp.float32))
    return jnp.mean(per_sample), {"per_sample_loss": per_sample}
