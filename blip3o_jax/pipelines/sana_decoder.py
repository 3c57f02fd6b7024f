"""BLIP3-o's SigLIP2 -> SANA image decoder: uint8 images -> SigLIP2 features -> SANA + DC-AE -> uint8 pixels.

The released `BLIP3o/SigLIP2_SANA` model (the original's `siglip2_sana/` `Reconstruct`, and the Reconstruction
branch's `train_image_reconstruction.py` / `inference.py`) chains five parts; `load_sana_decoder` reads them from
one folder, each part in its upstream layout or as converted by convert_torch_weights.py:

    encoder/      transformers SigLIP vision tower (google/siglip2-so400m-patch16-512)
    connector/    config.json {input_dim, output_dim, num_pooled_tokens} + safetensors (Linear, GELU, Linear, RMSNorm)
    transformer/  diffusers SanaTransformer2DModel (Efficient-Large-Model/Sana_1600M_512px_diffusers)
    vae/          diffusers AutoencoderDC (DC-AE f32c32)
    scheduler/    scheduler_config.json

The steps, as the original:

1. images resized to the encoder's size, normalised with mean = std = 0.5, SigLIP `hidden_states[-2]` (the
   penultimate layer, no post-LayerNorm), average-pooled to `num_pooled_tokens` (64) and put through the connector
   -> (B, 64, caption_channels) features (`encode_images`). The null condition is the same for all-black images
   (`null_condition`), as the original's 10 % black-image dropout trained it.
2. latents (B, s, s, C) = N(0, 1), s = the transformer's `sample_size` unless given; each image's noise is drawn
   from (seed, its global index), so a result does not depend on the batch it was decoded in.
3. CFG batch [null, image] (`cond_first=False`), guidance 3.0, 30 steps, the SANA timestep exactly as the
   scheduler yields it (float 1000·σ for the flow-matching Euler, int for DPM-Solver), one batched SANA call
   per step (`diffusion.cfg.sample_loop`);
4. latents / scaling_factor -> DC-AE decode -> (x/2 + 0.5).clip(0, 1) -> round(255 x) -> uint8.

Steps 2-4 run as one jitted function, compiled once per (steps, guidance on/off, output type) and cached on the
decoder object.

Schedulers: `scheduler="flow_match"` is the Reconstruction branch's sampler, diffusers
`FlowMatchEulerDiscreteScheduler.from_pretrained(<sana>/scheduler)` with explicit σ = linspace(1, 1/N, N). The SANA
repository's scheduler folder holds a DPMSolverMultistepScheduler config; loading it into the flow-matching class
keeps only the keys that class knows, so `flow_shift` is dropped and the effective shift is 1.0, which is what
`schedulers.flow_match_config_from_dict` reproduces. `scheduler="dpm"` is the main branch's `siglip2_sana`
sampler: `DPMSolverMultistepScheduler` from the same config (flow sigmas, flow_shift 3.0).

Resizing: images not already at the encoder's size are resized on the host with PIL, bilinear, ignoring the aspect
ratio (`preprocessing.siglip_preprocess(mode="squash")`, i.e. transformers' `SiglipImageProcessor` with the
SigLIP2 checkpoints' `resample=2`). The Reconstruction branch's `Resize(512)` + `CenterCrop(512)` differs only
for non-square inputs; pass `resize="crop"` for it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax import models, preprocessing
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.diffusion import cfg as cfg_loop
from blip3o_jax.diffusion import schedulers

PARTS = ("encoder", "connector", "transformer", "vae", "scheduler")
SCHEDULERS = ("flow_match", "dpm")
OUTPUTS = ("uint8", "float")
RESIZE_MODES = ("squash", "crop")


@dataclasses.dataclass(frozen=True, eq=False)
class SanaDecoder:
    """The five parts of the SigLIP2 -> SANA decoder; build it with `load_sana_decoder` or `from_parts`."""

    encoder: Any  # flax module, kind "siglip_vision" with output_layer="penultimate"
    encoder_params: Any
    connector: Any  # kind "sana_connector"
    connector_params: Any
    transformer: Any  # kind "sana"
    transformer_params: Any
    vae: Any  # kind "autoencoder_dc"
    vae_params: Any
    scaling_factor: float
    scheduler: Any  # schedulers.FlowMatchEuler or schedulers.DPMSolverMultistepFlow
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        """The encoder's input side (512 for siglip2-so400m-patch16-512)."""
        return int(self.encoder.cfg.image_size)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.cfg.in_channels)

    @property
    def default_latent_size(self) -> int:
        return int(self.transformer.cfg.sample_size)


# ----------------------------------------------------------------------------------------------------------------
# assembling


def penultimate_encoder(module, params):
    """(module, params) of a SigLIP tower with `output_layer="penultimate"`: a "last" tower (as a plain checkpoint
    loads) loses its last encoder layer and post_layernorm, which hidden_states[-2] does not depend on."""
    cfg = module.cfg
    if cfg.output_layer == "penultimate":
        return module, params
    new_cfg = dataclasses.replace(cfg, output_layer="penultimate")
    params = dict(params)
    params.pop("post_layernorm", None)
    encoder = dict(params["encoder"])
    if cfg.scan_layers:  # stacked on a leading layers axis
        encoder["layers"] = jax.tree.map(lambda a: a[: new_cfg.num_layers_run], encoder["layers"])
    else:
        encoder.pop(f"layers_{cfg.num_hidden_layers - 1}")
    params["encoder"] = encoder
    return models.build("siglip_vision", new_cfg), params


def from_parts(*, encoder, encoder_params, connector, connector_params, transformer, transformer_params, vae,
               vae_params, scheduler, scaling_factor: float | None = None) -> SanaDecoder:
    """A decoder from in-memory modules and params. `scheduler`: a `schedulers.FlowMatchEuler` /
    `DPMSolverMultistepFlow`; `scaling_factor` defaults to the DC-AE config's (0.41407 for DC-AE f32c32)."""
    if not isinstance(scheduler, (schedulers.FlowMatchEuler, schedulers.DPMSolverMultistepFlow)):
        raise ValueError(f"scheduler must be a schedulers.FlowMatchEuler or DPMSolverMultistepFlow, got "
                         f"{type(scheduler).__name__}")
    encoder, encoder_params = penultimate_encoder(encoder, encoder_params)
    enc, conn, sana, dc = encoder.cfg, connector.cfg, transformer.cfg, vae.config
    if conn.input_dim != enc.hidden_size:
        raise ValueError(f"connector input_dim={conn.input_dim} does not match the SigLIP width {enc.hidden_size}")
    if conn.output_dim != sana.caption_channels:
        raise ValueError(f"connector output_dim={conn.output_dim} does not match the SANA transformer's "
                         f"caption_channels={sana.caption_channels}")
    if not sana.in_channels == sana.output_channels == dc.latent_channels:
        raise ValueError(f"SANA in/out channels {sana.in_channels}/{sana.output_channels} do not match the DC-AE's "
                         f"latent_channels={dc.latent_channels}")
    scale = float(dc.scaling_factor if scaling_factor is None else scaling_factor)
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return SanaDecoder(encoder, as_jax(encoder_params), connector, as_jax(connector_params), transformer,
                       as_jax(transformer_params), vae, as_jax(vae_params), scale, scheduler)


def scheduler_from_config(config: dict, scheduler: str = "flow_match"):
    """"flow_match" or "dpm" from a diffusers scheduler_config.json dict (see the module docstring)."""
    if scheduler == "flow_match":
        return schedulers.flow_match_config_from_dict(config)
    if scheduler == "dpm":
        return schedulers.dpm_flow_config_from_dict(config)
    raise ValueError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS}")


def load_sana_decoder(path: str, *, dtype: str | None = None, scheduler: str = "flow_match") -> SanaDecoder:
    """The decoder from a folder with encoder/, connector/, transformer/, vae/ and scheduler/ (see the module
    docstring); each model part through `pretrained.load_pretrained`, so upstream directories (config.json +
    safetensors) and our converted output both load. `dtype` (e.g. "bfloat16") sets every part's compute and
    parameter dtype; the sampler state stays float32."""
    from blip3o_jax import pretrained

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS}")
    path = pretrained.local_path(path, what="SANA decoder")
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    expected = ", ".join(p + "/" for p in PARTS)
    for name in PARTS:
        if not os.path.isdir(os.path.join(path, name)):
            raise ConversionError(f"{path}: no {name}/ folder; a SANA decoder needs {expected}")
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_file):
        raise ConversionError(f"{os.path.join(path, 'scheduler')}: no scheduler_config.json")
    with open(sched_file) as f:
        try:
            sched_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{sched_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        sampler = scheduler_from_config(sched_config, scheduler)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{sched_file}: {e}") from None

    def load(name, kind):
        return pretrained.load_pretrained(os.path.join(path, name), dtype=dtype, kind=kind)

    encoder, encoder_params = load("encoder", "siglip_vision")
    connector, connector_params = load("connector", "sana_connector")
    transformer, transformer_params = load("transformer", "sana")
    vae, vae_params = load("vae", "autoencoder_dc")
    try:
        return from_parts(encoder=encoder, encoder_params=encoder_params, connector=connector,
                          connector_params=connector_params, transformer=transformer,
                          transformer_params=transformer_params, vae=vae, vae_params=vae_params, scheduler=sampler)
    except ValueError as e:
        raise ConversionError(f"{path}: the parts do not fit together: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# conditioning


def _resize(decoder: SanaDecoder, images_uint8, resize: str) -> np.ndarray:
    """uint8 (B, H, W, 3) at the encoder's size; resized on the host with PIL (bilinear) when it is not."""
    from PIL import Image

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}; expected one of {RESIZE_MODES}")
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    size = decoder.image_size
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([preprocessing.siglip_preprocess(Image.fromarray(img), size, mode=resize, draft=False)
                     for img in images])


def _encode_fn(decoder: SanaDecoder):
    if "encode" not in decoder._cache:
        encoder, connector = decoder.encoder, decoder.connector

        def run(encoder_params, connector_params, images_uint8):
            pixels = preprocessing.normalize(images_uint8, preprocessing.SIGLIP_MEAN, preprocessing.SIGLIP_STD)
            features = encoder.apply({"params": encoder_params}, pixels)  # (B, n*n, W) hidden_states[-2]
            return connector.apply({"params": connector_params}, features).astype(jnp.float32)  # (B, 64, C)

        decoder._cache["encode"] = jax.jit(run)
    return decoder._cache["encode"]


def encode_images(decoder: SanaDecoder, images_uint8, *, resize: str = "squash") -> jax.Array:
    """uint8 (B, H, W, 3) -> (B, num_pooled_tokens, caption_channels) float32 connector features."""
    images = _resize(decoder, images_uint8, resize)
    return _encode_fn(decoder)(decoder.encoder_params, decoder.connector_params, jnp.asarray(images))


def null_condition(decoder: SanaDecoder, batch: int) -> jax.Array:
    """The unconditional features: those of an all-black image, (batch, num_pooled_tokens, caption_channels).
    Encoded once per decoder and broadcast, so every row is the same bit for bit."""
    if "null" not in decoder._cache:
        black = np.zeros((1, decoder.image_size, decoder.image_size, 3), np.uint8)
        decoder._cache["null"] = encode_images(decoder, black)
    null = decoder._cache["null"]
    return jnp.broadcast_to(null, (int(batch), *null.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------
# sampling


def initial_noise(seed: int, indices, shape) -> jax.Array:
    """(B, *shape) unit Gaussian noise, row i drawn from fold_in(PRNGKey(seed), indices[i])."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32))(
        jnp.asarray(indices, jnp.uint32))


def _sample_fn(decoder: SanaDecoder, steps: int, guided: bool, output: str):
    """The jitted denoise + decode for one (steps, guidance on/off, output); cached on the decoder."""
    key = ("sample", steps, guided, output)
    if key in decoder._cache:
        return decoder._cache[key]
    schedule = decoder.scheduler.set_timesteps(steps)
    transformer, vae, scale = decoder.transformer, decoder.vae, decoder.scaling_factor

    def run(transformer_params, vae_params, noise, features, null_features, guidance_scale):
        def model_fn(x, t, context):
            # t as the schedule yields it (float 1000·σ, or DPM-Solver's integer); SANA embeds it in float32
            return transformer.apply({"params": transformer_params}, x, t, context)

        latents = cfg_loop.sample_loop(model_fn, schedule, noise * schedule.init_noise_sigma, cond=features,
                                       uncond=null_features if guided else None,
                                       guidance_scale=guidance_scale if guided else 1.0, cond_first=False)
        images = vae.apply({"params": vae_params}, latents / scale, method="decode").astype(jnp.float32)
        images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)  # diffusers' VaeImageProcessor.postprocess
        if output == "float":
            return images
        return jnp.round(images * 255.0).astype(jnp.uint8)

    fn = jax.jit(run)
    decoder._cache[key] = fn
    return fn


def decode_features(decoder: SanaDecoder, features, null_features=None, *, steps: int = 30,
                    guidance_scale: float = 3.0, seed: int = 0, indices=None, latent_size: int | None = None,
                    noise=None, output: str = "uint8") -> jax.Array:
    """(B, N, caption_channels) connector features -> images (B, H, W, 3), H = W = latent_size * 32 for DC-AE f32:
    uint8 (`output="uint8"`) or float in [0, 1] (`"float"`).

    null_features: (N, C) or (B, N, C); default the all-black image's (`null_condition`). indices: each row's
    global index for its noise (default 0..B-1); noise: explicit (B, s, s, C) unit noise instead (parity tests).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}; expected one of {OUTPUTS}")
    features = jnp.asarray(features, jnp.float32)
    caption = int(decoder.transformer.cfg.caption_channels)
    if features.ndim != 3 or features.shape[-1] != caption:
        raise ValueError(f"features have shape {tuple(features.shape)}; expected (B, N, {caption})")
    batch = features.shape[0]
    if null_features is None:
        null_features = null_condition(decoder, batch)
    null_features = jnp.broadcast_to(jnp.asarray(null_features, jnp.float32), features.shape)
    side = decoder.default_latent_size if latent_size is None else int(latent_size)
    latent_shape = (side, side, decoder.latent_channels)
    if noise is None:
        noise = initial_noise(seed, np.arange(batch) if indices is None else indices, latent_shape)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (batch, *latent_shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {(batch, *latent_shape)}")
    guided = cfg_loop.uses_guidance(guidance_scale)
    fn = _sample_fn(decoder, int(steps), guided, output)
    return fn(decoder.transformer_params, decoder.vae_params, noise, features, null_features,
              jnp.float32(guidance_scale))


def reconstruct(decoder: SanaDecoder, images_uint8, *, steps: int = 30, guidance_scale: float = 3.0, seed: int = 0,
                latent_size: int | None = None, indices=None, resize: str = "squash",
                output: str = "uint8") -> jax.Array:
    """uint8 images (B, H, W, 3) -> their reconstructions (B, S, S, 3), S = latent_size * the DC-AE factor
    (512 px for SANA-1600M-512px's sample_size 16). `indices`: the images' global indices (default 0..B-1), so
    that a batch split differently gives the same pixels."""
    features = encode_images(decoder, images_uint8, resize=resize)
    return decode_features(decoder, features, null_condition(decoder, features.shape[0]), steps=steps,
                           guidance_scale=guidance_scale, seed=seed, indices=indices, latent_size=latent_size,
                           output=output)


__all__ = ["SanaDecoder", "load_sana_decoder", "from_parts", "penultimate_encoder", "scheduler_from_config",
           "encode_images", "null_condition", "initial_noise", "decode_features", "reconstruct"]
