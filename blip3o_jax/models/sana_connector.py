"""BLIP3-o's SigLIP2 -> SANA connector: pooled SigLIP features -> SANA caption tokens.

As the original `siglip2_sana` code: the SigLIP penultimate hidden states (B, n*n, W) are average-pooled on their
square token grid to `num_pooled_tokens` = m*m tokens (`Encoder.forward`: `F.adaptive_avg_pool2d(grid, m)`,
row-major; with SigLIP2-so400m-512 that is 32x32 -> 8x8, an exact 4x4 mean), then
`Sana.connector = nn.Sequential(Linear(W, C), GELU(tanh), Linear(C, C), RMSNorm(C, eps=1e-5))`, C the SANA
transformer's `caption_channels`. A `num_pooled_tokens` <= 0 skips the pooling, as the original does.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry

RMS_EPS = 1e-5  # diffusers RMSNorm(eps=1e-5) in the original
RMS_INIT = math.sqrt(5.5)  # the original fills the norm weight with sqrt(5.5) before training


@dataclasses.dataclass(frozen=True)
class SanaConnectorConfig:
    input_dim: int = 1152  # SigLIP2-so400m width
    output_dim: int = 2304  # SANA caption_channels
    num_pooled_tokens: int = 64  # m*m output tokens; <= 0: no pooling
    # ours
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_pooled_tokens > 0 and math.isqrt(self.num_pooled_tokens) ** 2 != self.num_pooled_tokens:
            # the original takes int(sqrt(n)) and would silently return fewer tokens
            raise ValueError(f"SanaConnectorConfig: num_pooled_tokens={self.num_pooled_tokens} is not a square")


def config_from_hf(hf: dict) -> SanaConnectorConfig:
    """SanaConnectorConfig from a dict with `input_dim`, `output_dim`, `num_pooled_tokens` (unknown keys ignored)."""
    fields = {f.name for f in dataclasses.fields(SanaConnectorConfig)}
    return SanaConnectorConfig(**{k: v for k, v in dict(hf).items() if k in fields})


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging weights of torch's adaptive_avg_pool along one axis: window i covers
    [floor(i*n/m), ceil((i+1)*n/m)). For n divisible by m these are plain n/m-wide means."""
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def pool_tokens(features, num_pooled_tokens: int):
    """(B, n*n, W) -> (B, m*m, W) in float32, m*m = num_pooled_tokens; row-major tokens in and out."""
    b, length, width = features.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"SANA connector input has {length} tokens; expected a square grid (e.g. 1024 = 32x32)")
    out_side = math.isqrt(num_pooled_tokens)
    weights = jnp.asarray(adaptive_pool_matrix(side, out_side))
    grid = features.astype(jnp.float32).reshape(b, side, side, width)
    pooled = jnp.einsum("ih,jw,bhwc->bijc", weights, weights, grid, precision=jax.lax.Precision.HIGHEST)
    return pooled.reshape(b, out_side * out_side, width)


class ScaledRMSNorm(nn.Module):
    """diffusers `RMSNorm(C, eps=1e-5)` (variance in fp32) with the weight initialised to sqrt(5.5), as the
    original fills it before training (trained checkpoints override it)."""

    cfg: SanaConnectorConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = layers.to_dtype(cfg.dtype)
        scale = self.param("scale", layers.partitioned(nn.initializers.constant(RMS_INIT), ("norm",)),
                           (cfg.output_dim,), layers.to_dtype(cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
        return x32.astype(dt) * scale.astype(dt)


class SanaConnector(nn.Module):
    """(B, n*n, input_dim) SigLIP penultimate features -> (B, num_pooled_tokens, output_dim) caption tokens."""

    cfg: SanaConnectorConfig

    @nn.compact
    def __call__(self, features):
        cfg = self.cfg
        dt, pd = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        if features.ndim != 3 or features.shape[-1] != cfg.input_dim:
            raise ValueError(f"SANA connector input has shape {features.shape}; expected (B, tokens, {cfg.input_dim})")
        if cfg.num_pooled_tokens > 0:
            features = pool_tokens(features, cfg.num_pooled_tokens)
        x = layers.Dense(cfg.output_dim, kernel_axes=("cond", "mlp"), dtype=dt, param_dtype=pd,
                         name="linear_1")(features.astype(dt))
        x = jax.nn.gelu(x, approximate=True)
        x = layers.Dense(cfg.output_dim, kernel_axes=("mlp", "embed"), dtype=dt, param_dtype=pd, name="linear_2")(x)
        return ScaledRMSNorm(cfg, name="norm")(x)


registry.register(registry.Kind(
    name="sana_connector", config_from_hf=config_from_hf, build=lambda cfg: SanaConnector(cfg),
    init_args=lambda cfg: ((jnp.zeros((1, max(cfg.num_pooled_tokens, 1), cfg.input_dim), jnp.float32),), {}, None),
    converter="sana_connector"))

__all__ = ["SanaConnectorConfig", "SanaConnector", "config_from_hf", "adaptive_pool_matrix", "pool_tokens"]
