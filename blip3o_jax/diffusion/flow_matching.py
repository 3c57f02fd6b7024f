"""Rectified-flow training loss and the Euler + classifier-free-guidance sampler of BLIP3-o.

Conventions (as the original, which uses diffusers' `FlowMatchEulerDiscreteScheduler`, 1000 train steps, shift 1):

- noise level σ ∈ (0, 1], x_t = (1 − σ)·x0 + σ·ε, velocity target v = ε − x0 (σ = 1 is pure noise);
- the DiT receives the *raw scheduler timestep* t = 1000·σ (high = more noise);
- training: t uniform over the 1000 table entries {1000, ..., 1} (σ = t/1000); optional shift and logit-normal
  sampling follow diffusers' SD3 recipe (u ~ logit-normal, index = floor(1000·u) into the same table);
- sampling: σ = linspace(1, 1/N, N) then 0, Euler steps x ← x + (σ_next − σ)·v̂, CFG with the null condition =
  zeros, the timestep cast to an integer before the DiT exactly like the original's `.to(torch.long)`.

`apply_fn(params, x_t, t, cond, cond_mask) -> velocity` is any DiT apply function (channels-last x).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[..., jax.Array]
TIMESTEP_SAMPLING = ("uniform_discrete", "logit_normal")


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    num_train_timesteps: int = 1000
    timestep_sampling: str = "uniform_discrete"  # or "logit_normal"
    shift: float = 1.0  # σ -> shift·σ / (1 + (shift − 1)·σ), as the scheduler's static shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_drop_prob: float = 0.1  # per-sample probability of replacing the condition by zeros (CFG training)
    num_inference_steps: int = 30
    guidance_scale: float = 3.0

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"FlowMatchingConfig.timestep_sampling={self.timestep_sampling!r}; expected one of {TIMESTEP_SAMPLING}"
            )
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"FlowMatchingConfig.cond_drop_prob={self.cond_drop_prob} is not a probability")
        if self.shift <= 0:
            raise ValueError(f"FlowMatchingConfig.shift={self.shift} must be positive")


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # same float32 expression as the scheduler (identity for shift = 1)
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)


def train_schedule(cfg: FlowMatchingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps), each (num_train_timesteps,), the scheduler's training table: index 0 = most noise."""
    n = cfg.num_train_timesteps
    table = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    sigmas = _shift(table / np.float32(n), cfg.shift)
    return sigmas, (sigmas * np.float32(n)).astype(np.float32)


def inference_schedule(cfg: FlowMatchingConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (N+1,) ending in 0, integer timesteps (N,)) as `set_timesteps(N, sigmas=linspace(1, 1/N, N))`."""
    sigmas = _shift(np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32), cfg.shift)
    timesteps = (sigmas * np.float32(cfg.num_train_timesteps)).astype(np.float32)
    # the original feeds `t.to(torch.long)`: truncation toward zero (966.67 -> 966)
    int_timesteps = np.trunc(timesteps).astype(np.int32)
    return np.concatenate([sigmas, np.zeros((1,), np.float32)]), int_timesteps


def sample_timesteps(rng, batch: int, cfg: FlowMatchingConfig) -> tuple[jax.Array, jax.Array]:
    """(sigma (B,), timestep (B,)) float32 for training."""
    n = cfg.num_train_timesteps
    if cfg.timestep_sampling == "uniform_discrete":
        u = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    index = jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)
    sigmas, timesteps = train_schedule(cfg)
    return jnp.take(jnp.asarray(sigmas), index), jnp.take(jnp.asarray(timesteps), index)


def sample_sigmas(rng, batch: int, cfg: FlowMatchingConfig) -> jax.Array:
    """σ (B,) float32 for training (the DiT timestep is 1000·σ, see `sample_timesteps`)."""
    return sample_timesteps(rng, batch, cfg)[0]


def draw(rng, x0_shape, cond_batch: int, cfg: FlowMatchingConfig) -> dict[str, jax.Array]:
    """All random quantities of one training step, from one key: sigma, timestep, noise, cond_keep (B,)."""
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    sigma, timestep = sample_timesteps(t_rng, x0_shape[0], cfg)
    noise = jax.random.normal(noise_rng, x0_shape, jnp.float32)
    keep = jax.random.bernoulli(drop_rng, 1.0 - cfg.cond_drop_prob, (cond_batch,)).astype(jnp.float32)
    return {"sigma": sigma, "timestep": timestep, "noise": noise, "cond_keep": keep}


def _bcast(v, ndim):
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def training_loss(
    apply_fn: ApplyFn, params, x0, cond, rng, cfg: FlowMatchingConfig, cond_mask=None
) -> tuple[jax.Array, dict[str, Any]]:
    """Flow-matching MSE of one batch: (loss fp32 scalar, aux {"sigma", "timestep", "per_sample_loss"}).

    x0: (B, H, W, C) clean targets (CLIP grid or VAE latents); cond: (B, N, D) query states. A per-sample
    Bernoulli(cond_drop_prob) replaces the whole condition of a sample by zeros (`mask_drop` in the original).
    """
    r = draw(rng, x0.shape, cond.shape[0], cfg)
    x0 = x0.astype(jnp.float32)
    sigma = _bcast(r["sigma"], x0.ndim)
    x_t = (1.0 - sigma) * x0 + sigma * r["noise"]
    cond_in = cond * _bcast(r["cond_keep"], cond.ndim).astype(cond.dtype)
    velocity = apply_fn(params, x_t, r["timestep"], cond_in, cond_mask)
    target = r["noise"] - x0
    err = jnp.square(velocity.astype(jnp.float32) - target)
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    return jnp.mean(per_sample), {"sigma": r["sigma"], "timestep": r["timestep"], "per_sample_loss": per_sample}


def sample(
    apply_fn: ApplyFn,
    params,
    cond,
    rng,
    shape,
    cfg: FlowMatchingConfig,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    cond_mask=None,
    initial_noise=None,
):
    """x0 (B, H, W, C) from Euler + CFG over σ = linspace(1, 1/N, N) → 0; jit-able (the loop is a `fori_loop`).

    shape: (B, H, W, C) of the samples (static). Conditional and null (zeros) branches run in one batched DiT
    call per step, null first as the original. `guidance_scale` may be traced; a Python 1.0 skips the null branch.
    Deterministic given `rng` (or `initial_noise`). Typical use:

        sampler = jax.jit(functools.partial(sample, dit_apply, shape=(B, 8, 8, 1792), cfg=fm_cfg))
        x0 = sampler(params, cond, rng)
    """
    num_steps = cfg.num_inference_steps if num_steps is None else int(num_steps)
    guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    shape = tuple(shape)
    if initial_noise is None:
        x = jax.random.normal(rng, shape, jnp.float32)
    else:
        x = jnp.asarray(initial_noise, jnp.float32).reshape(shape)
    sigmas, timesteps = inference_schedule(cfg, num_steps)
    dts = jnp.asarray(sigmas[1:] - sigmas[:-1])  # float32, as the scheduler's sigma_next - sigma
    timesteps = jnp.asarray(timesteps)
    batch = shape[0]
    use_cfg = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0)
    if use_cfg:
        cond_in = jnp.concatenate([jnp.zeros_like(cond), cond], axis=0)
        mask_in = None if cond_mask is None else jnp.concatenate([cond_mask, cond_mask], axis=0)
    else:
        cond_in, mask_in = cond, cond_mask

    def step(i, x):
        t = jnp.full((cond_in.shape[0],), timesteps[i], jnp.int32)
        x_in = jnp.concatenate([x, x], axis=0) if use_cfg else x
        v = apply_fn(params, x_in, t, cond_in, mask_in).astype(jnp.float32)
        if use_cfg:
            v_uncond, v_cond = v[:batch], v[batch:]
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        return x + dts[i] * v

    return jax.lax.fori_loop(0, num_steps, step, x)


def dit_apply_fn(module) -> ApplyFn:
    """apply_fn for a Flax DiT module: (params, x_t, t, cond, cond_mask) -> velocity."""

    def apply_fn(params, x_t, t, cond, cond_mask=None):
        return module.apply({"params": params}, x_t, t, cond, cond_mask)

    return apply_fn
