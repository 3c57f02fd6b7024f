"""The classifier-free-guidance denoising loop of both image decoders, as one `jax.lax.fori_loop`.

Each step makes ONE batched denoiser call on the conditional and unconditional halves stacked along the batch,
splits the output and combines `u + g·(c − u)` before the scheduler step (diffusers' pipelines do the same).

Batch order: the two upstream pipelines stack the halves in opposite orders. A row-wise denoiser gives the same
result either way, but the loop follows each pipeline exactly so that the batch a model sees (and any batch-wide
parity check against the PyTorch pipeline) matches row for row:

- SDXL-style UNet decoder (BLIP3-o `pipeline_llava_gen`, diffusers `StableDiffusionXLPipeline`): `prompt_embeds =
  cat([cond, uncond])`, i.e. **[cond, uncond]** -> `cond_first=True`;
- SANA decoder (BLIP3-o SigLIP2 + SANA pipeline): `[null-image features, image features]`, i.e. **[uncond, cond]**
  -> `cond_first=False`. (The DiT sampler in `flow_matching.sample` is also [uncond, cond].)

`guidance_scale <= 1` (a Python number) turns guidance off as diffusers' `do_classifier_free_guidance`: one
branch, the conditional one, at batch B.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp


class Schedule(Protocol):
    """What the loop needs from a schedule (see `blip3o_jax.diffusion.schedulers`)."""

    @property
    def num_steps(self) -> int: ...

    def init_state(self, x) -> Any: ...

    def model_input(self, x, k) -> jax.Array: ...

    def timestep(self, k) -> jax.Array: ...

    def step(self, state, model_output, k, x) -> tuple[jax.Array, Any]: ...


ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def uses_guidance(guidance_scale) -> bool:
    """False only for a Python number <= 1; a traced scale always runs both branches."""
    return not (isinstance(guidance_scale, (int, float)) and guidance_scale <= 1)


def sample_loop(
    model_fn: ModelFn,
    schedule: Schedule,
    latents,
    *,
    cond: Any,
    uncond: Any = None,
    guidance_scale,
    cond_first: bool,
) -> jax.Array:
    """Denoise `latents` over all steps of `schedule`; returns the final sample, float32, same shape.

    model_fn(x, t, cond_batch) -> output like x: x (2B, ...) (B without guidance), t (2B,) the schedule's timestep
    broadcast over the batch (float32 for the Euler schedules, int32 for DPM-Solver), cond_batch = cond and uncond
    (pytrees of arrays with batch leading, e.g. a dict of encoder states, pooled embeddings and time ids) stacked
    leaf by leaf in the order `cond_first` says.
    latents: the sample at the first step, i.e. unit Gaussian noise already multiplied by
    `schedule.init_noise_sigma` (as diffusers' `prepare_latents`; 13.16 for the 50-step leading Euler schedule,
    1 for the flow schedules).
    uncond: required when guidance is on. `guidance_scale` may be traced.

    jit it by closing over the model function and the schedule (the schedule's tables become constants):

        def generate(params, latents, cond, uncond):
            model_fn = lambda x, t, cond_batch: unet_apply(params, x, t, cond_batch)
            return sample_loop(model_fn, schedule, latents, cond=cond, uncond=uncond,
                               guidance_scale=3.0, cond_first=True)

        latents = jax.jit(generate)(params, noise * schedule.init_noise_sigma, cond, uncond)
    """
    x = jnp.asarray(latents, jnp.float32)
    batch = x.shape[0]
    guided = uses_guidance(guidance_scale)
    if guided:
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input (uncond=None given)")
        first, second = (cond, uncond) if cond_first else (uncond, cond)
        cond_batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)
    else:
        cond_batch = cond

    def body(k, carry):
        x, state = carry
        x_in = schedule.model_input(x, k)
        if guided:
            x_in = jnp.concatenate([x_in, x_in], axis=0)
        t = jnp.broadcast_to(schedule.timestep(k), (x_in.shape[0],))
        out = model_fn(x_in, t, cond_batch).astype(jnp.float32)
        if guided:
            head, tail = out[:batch], out[batch:]
            out_cond, out_uncond = (head, tail) if cond_first else (tail, head)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return schedule.step(state, out, k, x)

    x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, schedule.init_state(x)))
    return x
