"""The SDXL VAE of BLIP3-o's diffusion decoder: diffusers `AutoencoderKL`, channels-last.

Encoder: conv_in -> DownEncoderBlock2D levels (resnets without temb, GroupNorm eps 1e-6, a stride-2 conv with a
bottom/right-only pad ending every level but the last) -> mid block (resnet, single-head attention, resnet) ->
GroupNorm -> SiLU -> conv_out to 2 x latent channels -> quant_conv. Decoder: post_quant_conv -> conv_in -> mid
block -> UpDecoderBlock2D levels (layers_per_block + 1 resnets, nearest x2 + conv) -> GroupNorm -> SiLU -> conv_out.
As diffusers 0.42.1 `Encoder`/`Decoder` with norm_type "group"; parameter names mirror the torch module tree.

`encode` returns the diagonal Gaussian's (mean, logvar), logvar clamped to [-30, 20] as diffusers'
`DiagonalGaussianDistribution`; `decode` maps latents (already divided by `scaling_factor`, shifted by
`shift_factor` if any: the pipeline does that) to images in about [-1, 1].
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from blip3o_jax.models import layers, registry
from blip3o_jax.models.conv_blocks import (
    Conv2D,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SpatialAttention,
    Upsample2D,
    check_groups,
)

VAE_NORM_EPS = 1e-6  # every GroupNorm of diffusers' Encoder/Decoder
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp

_MAPS = ("activation_batch", None, None, "activation_embed")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config fields (diffusers' defaults), plus our policy fields."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # ours
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size", "latents_mean",
                     "latents_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"AutoencoderKL config: {len(self.down_block_types)} down_block_types, "
                             f"{len(self.up_block_types)} up_block_types and {n} block_out_channels; they must be "
                             f"equal")
        for kind, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in getattr(self, kind) if t != allowed]
            if bad:
                raise ValueError(f"AutoencoderKL config: {kind} {bad} not supported; expected {allowed!r}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL config: act_fn={self.act_fn!r} not supported; expected 'silu'")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"AutoencoderKL config: layers_per_block={self.layers_per_block!r} must be one int")
        check_groups(self.block_out_channels, self.norm_num_groups, "AutoencoderKL config")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def encoder_resnet_channels(cfg: AutoencoderKLConfig) -> list[list[tuple[int, int]]]:
    """(in, out) channels of every encoder resnet, per down level."""
    chans = cfg.block_out_channels
    return [[(chans[max(i - 1, 0)] if j == 0 else chans[i], chans[i]) for j in range(cfg.layers_per_block)]
            for i in range(len(chans))]


def decoder_resnet_channels(cfg: AutoencoderKLConfig) -> list[list[tuple[int, int]]]:
    """(in, out) channels of every decoder resnet, per up level (layers_per_block + 1 each)."""
    rev = tuple(reversed(cfg.block_out_channels))
    return [[(rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i]) for j in range(cfg.layers_per_block + 1)]
            for i in range(len(rev))]


_ACCEPTED = {"norm_type": "group"}  # AutoencoderKL has no such key; some derived configs do


def config_from_hf(hf: dict) -> AutoencoderKLConfig:
    """AutoencoderKLConfig from a diffusers `vae/config.json` dict; absent keys take diffusers' defaults."""
    for key, accepted in _ACCEPTED.items():
        if hf.get(key, accepted) != accepted:
            raise ValueError(f"AutoencoderKL config: {key}={hf[key]!r} is not supported; expected {accepted!r}")
    fields = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
    return AutoencoderKLConfig(**{k: v for k, v in hf.items() if k in fields})


def _policy(cfg: AutoencoderKLConfig) -> dict:
    return dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))


def _resnet(cfg: AutoencoderKLConfig, out_channels: int) -> ResnetBlock2D:
    return ResnetBlock2D(out_channels, cfg.norm_num_groups, VAE_NORM_EPS, **_policy(cfg))


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` without temb: resnet -> single-head attention (optional) -> resnet."""

    cfg: AutoencoderKLConfig

    def setup(self):
        cfg = self.cfg
        width = cfg.block_out_channels[-1]
        self.resnets = [_resnet(cfg, width) for _ in range(2)]
        if cfg.mid_block_add_attention:
            # attention_head_dim = block_out_channels[-1] in diffusers' Encoder/Decoder: one head over all channels
            self.attentions = [SpatialAttention(1, cfg.norm_num_groups, VAE_NORM_EPS,
                                                attention_impl=cfg.attention_impl, **_policy(cfg))]

    def __call__(self, h):
        h = self.resnets[0](h)
        if self.cfg.mid_block_add_attention:
            h = self.attentions[0](h)
        return self.resnets[1](h)


class DownEncoderBlock2D(nn.Module):
    cfg: AutoencoderKLConfig
    level: int

    def setup(self):
        cfg = self.cfg
        width = cfg.block_out_channels[self.level]
        self.resnets = [_resnet(cfg, cout) for _, cout in encoder_resnet_channels(cfg)[self.level]]
        if self.level < len(cfg.block_out_channels) - 1:
            # downsample_padding=0: diffusers pads bottom/right by one, then a 3x3 stride-2 conv
            self.downsamplers = [Downsample2D(width, padding=0, **_policy(cfg))]

    def __call__(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        if self.level < len(self.cfg.block_out_channels) - 1:
            h = self.downsamplers[0](h)
        return h


class UpDecoderBlock2D(nn.Module):
    cfg: AutoencoderKLConfig
    level: int

    def setup(self):
        cfg = self.cfg
        width = tuple(reversed(cfg.block_out_channels))[self.level]
        self.resnets = [_resnet(cfg, cout) for _, cout in decoder_resnet_channels(cfg)[self.level]]
        if self.level < len(cfg.block_out_channels) - 1:
            self.upsamplers = [Upsample2D(width, **_policy(cfg))]

    def __call__(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        if self.level < len(self.cfg.block_out_channels) - 1:
            h = self.upsamplers[0](h)
        return h


class Encoder(nn.Module):
    """diffusers `Encoder` (double_z): images (B, H, W, C_in) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    cfg: AutoencoderKLConfig

    def setup(self):
        cfg, kw = self.cfg, _policy(self.cfg)
        self.conv_in = Conv2D(cfg.block_out_channels[0], 3, **kw)
        self.down_blocks = [DownEncoderBlock2D(cfg, i) for i in range(len(cfg.block_out_channels))]
        self.mid_block = MidBlock(cfg)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, dtype=jnp.float32,
                                       param_dtype=kw["param_dtype"])  # SiLU in fp32, rounded at conv_out
        self.conv_out = Conv2D(2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = nn.with_logical_constraint(block(h), _MAPS)
        h = self.mid_block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """diffusers `Decoder`: latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C_out)."""

    cfg: AutoencoderKLConfig

    def setup(self):
        cfg, kw = self.cfg, _policy(self.cfg)
        self.conv_in = Conv2D(cfg.block_out_channels[-1], 3, **kw)
        self.mid_block = MidBlock(cfg)
        self.up_blocks = [UpDecoderBlock2D(cfg, i) for i in range(len(cfg.block_out_channels))]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, dtype=jnp.float32,
                                       param_dtype=kw["param_dtype"])  # SiLU in fp32, rounded at conv_out
        self.conv_out = Conv2D(cfg.out_channels, 3, **kw)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = nn.with_logical_constraint(block(h), _MAPS)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """`encode(images) -> (mean, logvar)`, `decode(latents) -> images`; `__call__` = decode(encode mean)."""

    cfg: AutoencoderKLConfig

    def setup(self):
        cfg, kw = self.cfg, _policy(self.cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2D(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2D(cfg.latent_channels, 1, **kw)

    def encode(self, images):
        """images (B, H, W, C_in) in [-1, 1] -> mean, logvar (B, H/f, W/f, latent_channels), float32."""
        cfg = self.cfg
        if images.shape[-1] != cfg.in_channels:
            raise ValueError(f"AutoencoderKL.encode: images have {images.shape[-1]} channels (channels-last); "
                             f"expected {cfg.in_channels}")
        moments = self.encoder(images.astype(layers.to_dtype(cfg.dtype)))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents):
        """latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C_out), float32."""
        cfg = self.cfg
        if latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: latents have {latents.shape[-1]} channels (channels-last); "
                             f"expected {cfg.latent_channels}")
        z = latents.astype(layers.to_dtype(cfg.dtype))
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def _init_args(cfg: AutoencoderKLConfig):
    side = cfg.downsample_factor
    return (jnp.zeros((1, side, side, cfg.in_channels), jnp.float32),), {}, None


registry.register(registry.Kind(
    name="autoencoder_kl", config_from_hf=config_from_hf, build=lambda cfg: AutoencoderKL(cfg),
    init_args=_init_args, converter="autoencoder_kl", class_names=("AutoencoderKL",)))


__all__ = [
    "AutoencoderKLConfig", "AutoencoderKL", "Encoder", "Decoder", "MidBlock", "config_from_hf",
    "encoder_resnet_channels", "decoder_resnet_channels",
]
