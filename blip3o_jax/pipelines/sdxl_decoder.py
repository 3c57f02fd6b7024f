"""BLIP3-o's SDXL-architecture image decoder: EVA-CLIP features (B, 64, 1792) -> uint8 pixels.

The released checkpoints (BLIP3o-Model-4B/8B) ship it in `diffusion-decoder/` as a diffusers pipeline (the Emu2-Gen
visual decoder): `unet/` (UNet2DConditionModel with `text_time` conditioning, cross-attention width 1792),
`vae/` (the SDXL AutoencoderKL) and `scheduler/` (EulerDiscreteScheduler). The steps follow the original's
`pipeline_llava_gen.py` (Emu2's `EmuVisualGenerationPipeline`):

1. `prompt_embeds = [cond, uncond]` (B, 64, 1792) each, *cond first*; pooled `text_embeds` = mean over the 64 tokens;
   `time_ids` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (H, W, 0, 0, H, W) per sample (the
   original flattens them and so runs batch 1 only; here they are (2B, 6));
2. latents (B, H/8, W/8, 4) = N(0, 1) * init_noise_sigma, 50 Euler steps, guidance 3.0, one batched UNet call per
   step (`diffusion.cfg.sample_loop`, inside one jit);
3. latents / scaling_factor (+ shift_factor) -> VAE decode -> (x/2 + 0.5).clip(0, 1) -> round(255 x) -> uint8.

The negative (unconditional) features: `"zeros"` (an all-zero tensor), or any (B, 64, 1792) / (64, 1792) array,
e.g. the DiT's sample for an empty prompt (the original samples it once and caches it), or for reconstruction
the EVA features of an all-zero image (`reconstruct`). Each image's noise is drawn from (seed, its index), so a
result does not depend on the batch it was decoded in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.diffusion import cfg as cfg_loop
from blip3o_jax.diffusion import schedulers


@dataclasses.dataclass(frozen=True, eq=False)
class SDXLDecoder:
    unet: Any  # flax module (kind "unet")
    unet_params: Any
    vae: Any  # flax module (kind "autoencoder_kl")
    vae_params: Any
    scheduler: schedulers.EulerDiscrete
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.cfg.block_out_channels) - 1)

    @property
    def feature_width(self) -> int:
        return int(self.unet.cfg.cross_attention_dim)


def from_parts(unet, unet_params, vae, vae_params, scheduler_config: dict) -> SDXLDecoder:
    return SDXLDecoder(unet, unet_params, vae, vae_params, schedulers.euler_config_from_dict(dict(scheduler_config)))


def load_sdxl_decoder(path: str, *, dtype: str | None = None) -> SDXLDecoder:
    """The decoder from a `diffusion-decoder/` folder (diffusers layout: unet/, vae/, scheduler/), each part either
    as released (config.json + diffusion_pytorch_model[.bf16].safetensors) or converted by convert_torch_weights.py."""
    from blip3o_jax import pretrained
    from blip3o_jax.convert.common import ConversionError

    path = pretrained.local_path(path, what="diffusion decoder")
    parts = {}
    for name in ("unet", "vae", "scheduler"):
        part = os.path.join(path, name)
        if not os.path.isdir(part):
            raise ConversionError(f"{path}: no {name}/ folder; expected a diffusion-decoder with unet/, vae/, scheduler/")
        parts[name] = part
    sched_file = os.path.join(parts["scheduler"], "scheduler_config.json")
    if not os.path.isfile(sched_file):
        raise ConversionError(f"{parts['scheduler']}: no scheduler_config.json")
    with open(sched_file) as f:
        sched = json.load(f)
    unet, unet_params = pretrained.load_pretrained(parts["unet"], dtype=dtype, kind="unet")
    vae, vae_params = pretrained.load_pretrained(parts["vae"], dtype=dtype, kind="autoencoder_kl")
    try:
        scheduler = schedulers.euler_config_from_dict(sched)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{sched_file}: {e}") from None
    return SDXLDecoder(unet, unet_params, vae, vae_params, scheduler)


def _size(resolution) -> tuple[int, int]:
    return (int(resolution), int(resolution)) if np.ndim(resolution) == 0 else tuple(int(r) for r in resolution)


def initial_noise(seed: int, indices, shape) -> jax.Array:
    """(B, *shape) unit Gaussian noise, row i drawn from fold_in(PRNGKey(seed), indices[i])."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32))(
        jnp.asarray(indices, jnp.uint32))


def to_uint8(images) -> jax.Array:
    """[-1, 1] float images -> uint8, as diffusers' `VaeImageProcessor.postprocess` (clip, then round(255 x))."""
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)


def _decode_fn(decoder: SDXLDecoder, steps: int, height: int, width: int, guided: bool):
    """The jitted denoise + decode for one (steps, size, guidance on/off); cached on the decoder."""
    key = (steps, height, width, guided)
    if key in decoder._compiled:
        return decoder._compiled[key]
    schedule = decoder.scheduler.set_timesteps(steps)
    unet, vae = decoder.unet, decoder.vae
    scale, shift = float(vae.cfg.scaling_factor), vae.cfg.shift_factor

    def run(unet_params, vae_params, noise, features, negative, guidance_scale):
        batch = features.shape[0]
        time_ids = jnp.tile(jnp.asarray([height, width, 0, 0, height, width], jnp.float32), (batch, 1))
        cond = {"states": features, "pooled": features.mean(axis=1), "time_ids": time_ids}
        uncond = {"states": negative, "pooled": negative.mean(axis=1), "time_ids": time_ids}

        def model_fn(x, t, c):
            return unet.apply({"params": unet_params}, x, t, c["states"], text_embeds=c["pooled"],
                              time_ids=c["time_ids"])

        latents = cfg_loop.sample_loop(model_fn, schedule, noise * schedule.init_noise_sigma, cond=cond,
                                       uncond=uncond if guided else None,
                                       guidance_scale=guidance_scale if guided else 1.0, cond_first=True)
        latents = latents / scale + (shift if shift is not None else 0.0)
        images = vae.apply({"params": vae_params}, latents, method="decode")
        return images.astype(jnp.float32)

    fn = jax.jit(run)
    decoder._compiled[key] = fn
    return fn


def decode_clip_features(decoder: SDXLDecoder, features, *, negative="zeros", steps: int = 50,
                         guidance_scale: float = 3.0, resolution=1024, seed: int = 0, indices=None, noise=None,
                         output: str = "uint8"):
    """(B, N, D) CLIP features -> images (B, H, W, 3): uint8 (`output="uint8"`) or float in [-1, 1] ("float").

    negative: "zeros", or an array (N, D) / (B, N, D) of unconditional features. indices: each row's global index
    for its noise (default 0..B-1); noise: explicit (B, H/8, W/8, C) unit noise instead (parity tests).
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 3 or features.shape[-1] != decoder.feature_width:
        raise ValueError(f"features have shape {tuple(features.shape)}; expected (B, N, {decoder.feature_width})")
    height, width = _size(resolution)
    f = decoder.vae_scale_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"resolution {height}x{width} is not a positive multiple of the VAE's factor {f}")
    if isinstance(negative, str):
        if negative != "zeros":
            raise ValueError(f"negative={negative!r}; expected 'zeros' or an array of features")
        negative = jnp.zeros_like(features)
    negative = jnp.broadcast_to(jnp.asarray(negative, jnp.float32), features.shape)
    batch = features.shape[0]
    latent_shape = (height // f, width // f, int(decoder.unet.cfg.in_channels))
    if noise is None:
        noise = initial_noise(seed, np.arange(batch) if indices is None else indices, latent_shape)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (batch, *latent_shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {(batch, *latent_shape)}")
    guided = cfg_loop.uses_guidance(guidance_scale)
    fn = _decode_fn(decoder, int(steps), height, width, guided)
    images = fn(decoder.unet_params, decoder.vae_params, noise, features, negative, jnp.float32(guidance_scale))
    return images if output == "float" else to_uint8(images)


def eva_features(eva_module, eva_params, images_uint8, *, grid_tokens: int = 64):
    """BLIP3-o's EVA-CLIP conditioning of uint8 images (B, S, S, 3) already at the tower's size: CLIP-normalised
    pixels -> EVA-CLIP (last block, CLS dropped) -> average-pooled to `grid_tokens` (64 = 8x8), row-major."""
    from blip3o_jax import preprocessing
    from blip3o_jax.models import eva_clip

    pixels = preprocessing.normalize(jnp.asarray(images_uint8), preprocessing.CLIP_MEAN, preprocessing.CLIP_STD)
    tokens = eva_module.apply({"params": eva_params}, pixels)  # (B, n, 1792)
    grid = int(round(tokens.shape[1] ** 0.5))
    out = int(round(grid_tokens ** 0.5))
    if grid % out:
        raise ValueError(f"EVA grid {grid}x{grid} does not pool evenly to {out}x{out} tokens")
    pooled = eva_clip.pool_grid(tokens, stride=grid // out)
    return pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])


def reconstruct(decoder: SDXLDecoder, eva_module, eva_params, images_uint8, **kwargs):
    """Image -> image through EVA-CLIP features and the decoder (the original's eva-clip-reconstruct branch): the
    negative is the features of an all-zero image tensor. `images_uint8` (B, S, S, 3) at the tower's size."""
    from blip3o_jax.models import eva_clip

    images = jnp.asarray(images_uint8)
    features = eva_features(eva_module, eva_params, images)
    # the branch encodes `torch.zeros` *after* normalisation, i.e. a normalised all-zero tensor: feed the tower
    # zeros directly rather than black uint8 pixels
    zero = eva_module.apply({"params": eva_params}, jnp.zeros((1, *images.shape[1:]), jnp.float32))
    grid = int(round(zero.shape[1] ** 0.5))
    out = int(round(features.shape[1] ** 0.5))
    negative = eva_clip.pool_grid(zero, stride=grid // out).reshape(1, -1, zero.shape[-1])
    return decode_clip_features(decoder, features, negative=negative, **kwargs)
