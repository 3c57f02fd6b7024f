"""The three image-generation objectives named by BLIP3-o (reference §3.1), behind one dispatch.

- `clip_fm` (default, the released models): flow matching over the 8x8x1792 EVA-CLIP grid with the DiT
  (`flow_matching.training_loss`), sampled with Euler + CFG.
- `vae_fm`: the same DiT and loss over VAE latents; only the DiT config changes (`in_channels`, `input_size`,
  `patch_size` of the latent grid, e.g. 4 or 16 channels, patch 2). The VAE encoder/decoder live elsewhere.
- `clip_mse`: deterministic regression of the CLIP grid from the query states: a small projection head
  (Linear -> GELU(tanh) -> Linear, applied per token) maps the N = (H/p)·(W/p) query states (B, N, D_llm) to
  the (B, H, W, C) grid in row-major token order, trained with a plain fp32 MSE. No noise, no CFG; generation
  is one head call. The paper's definition; the original release has no code for it.

Every variant's model takes the same `cond` (B, N, D_llm); the trainer calls `build_model(variant, dit_cfg)`,
`loss(variant, apply_fn, params, x0, cond, rng, fm_cfg, cond_mask)` and `generate(...)` without branching.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip3o_jax.diffusion import flow_matching
from blip3o_jax.models import dit as dit_lib
from blip3o_jax.models import layers

LOSS_VARIANTS = ("clip_fm", "clip_mse", "vae_fm")


def check_variant(variant: str) -> str:
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {LOSS_VARIANTS}")
    return variant


class MSEHead(nn.Module):
    """clip_mse projection: per-token Linear(D_llm -> hidden) -> GELU(tanh) -> Linear(hidden -> p·p·C), unpatchified.

    Input (B, N, D_llm) with N == (input_size / patch_size)^2 tokens in row-major order; output (B, H, W, C) fp32.
    Params: `linear_1`, `linear_2` (kernel (in, out), logical names like the DiT's caption projection).
    """

    cfg: dit_lib.DiTConfig

    @nn.compact
    def __call__(self, cond, cond_mask=None):
        del cond_mask  # tokens map to grid cells one to one: nothing to pool or mask
        cfg = self.cfg
        side = cfg.input_size // cfg.patch_size
        if cond.shape[1] != side * side:
            raise ValueError(
                f"clip_mse head: {cond.shape[1]} query tokens cannot tile a {side}x{side} grid of patches"
            )
        dt, pd = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        x = layers.Dense(cfg.dim, kernel_axes=("cond", "mlp"), dtype=dt, param_dtype=pd, name="linear_1")(cond.astype(dt))
        x = jax.nn.gelu(x, approximate=True)
        out = cfg.patch_size * cfg.patch_size * cfg.in_channels
        x = layers.Dense(out, kernel_axes=("mlp", "patch"), dtype=dt, param_dtype=pd, name="linear_2")(x)
        return dit_lib.unpatchify(x.astype(jnp.float32), cfg.patch_size, cfg.input_size, cfg.input_size)


def build_head(cfg: dit_lib.DiTConfig) -> MSEHead:
    """The clip_mse head for a DiT config: hidden width = cfg.dim, target grid = (input_size, input_size, in_channels)."""
    return MSEHead(cfg)


def head_apply_fn(module: MSEHead):
    def apply_fn(params, cond, cond_mask=None):
        return module.apply({"params": params}, cond, cond_mask)

    return apply_fn


def clip_mse_loss(apply_fn, params, x0, cond, rng=None, cfg=None, cond_mask=None) -> tuple[jax.Array, dict[str, Any]]:
    """MSE between the head's grid and the target x0 (B, H, W, C): (loss fp32, aux {"per_sample_loss"}).

    apply_fn(params, cond, cond_mask) -> (B, H, W, C). `rng` and `cfg` are accepted for a uniform signature.
    """
    del rng, cfg
    pred = apply_fn(params, cond, cond_mask).astype(jnp.float32)
    err = jnp.square(pred - x0.astype(jnp.float32))
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    return jnp.mean(per_sample), {"per_sample_loss": per_sample}


def build_model(variant: str, dit_cfg: dit_lib.DiTConfig) -> nn.Module:
    """The trainable generator of a variant: the DiT (clip_fm, vae_fm) or the projection head (clip_mse)."""
    if check_variant(variant) == "clip_mse":
        return build_head(dit_cfg)
    return dit_lib.DiT(dit_cfg)


def apply_fn_for(variant: str, module: nn.Module):
    if check_variant(variant) == "clip_mse":
        return head_apply_fn(module)
    return flow_matching.dit_apply_fn(module)


def loss(variant: str, apply_fn, params, x0, cond, rng, fm_cfg: flow_matching.FlowMatchingConfig, cond_mask=None):
    """(loss, aux) of one batch for any variant; `apply_fn` from `apply_fn_for(variant, module)`."""
    if check_variant(variant) == "clip_mse":
        return clip_mse_loss(apply_fn, params, x0, cond, cond_mask=cond_mask)
    return flow_matching.training_loss(apply_fn, params, x0, cond, rng, fm_cfg, cond_mask=cond_mask)


def generate(variant: str, apply_fn, params, cond, rng, shape, fm_cfg: flow_matching.FlowMatchingConfig,
             cond_mask=None, **sample_kwargs):
    """Generated grid (B, H, W, C): the sampler for flow-matching variants, one head call for clip_mse."""
    if check_variant(variant) == "clip_mse":
        return apply_fn(params, cond, cond_mask)
    return flow_matching.sample(apply_fn, params, cond, rng, shape, fm_cfg, cond_mask=cond_mask, **sample_kwargs)
