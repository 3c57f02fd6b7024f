"""The SDXL-architecture UNet of BLIP3-o's diffusion decoder: diffusers `UNet2DConditionModel`, channels-last.

The BLIP3-o (Emu2-Gen) decoder turns 64 EVA-CLIP feature tokens into SDXL latents with this UNet: DownBlock2D /
CrossAttnDownBlock2D levels, a `UNetMidBlock2DCrossAttn`, CrossAttnUpBlock2D / UpBlock2D levels, Transformer2DModel
attentions of BasicTransformerBlocks (self-attention, cross-attention, GEGLU), and SDXL's "text_time" added
conditioning (pooled text vector + six micro-conditioning sinusoids). The forward is the one of diffusers 0.42.1
for that family; other diffusers options raise a ValueError in `config_from_hf`.

Differences in layout only: inputs and outputs are (B, H, W, C); the BasicTransformerBlocks of one
Transformer2DModel are stacked with `nn.scan` (params on a leading "layers" axis) when `scan_layers`, so the
Emu2 UNet's 10-block attentions compile once. Parameter names mirror the torch module tree (`down_blocks_1/
attentions_0/transformer_blocks/attn2/to_k`, `ff/net_0/proj`, ...), so `convert/unet.py` is renames plus
transposes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from blip3o_jax.models import layers, registry
from blip3o_jax.models.conv_blocks import (
    Conv2D,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    check_groups,
)

NUM_TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)
TRANSFORMER_GROUPNORM_EPS = 1e-6  # hard-coded in diffusers' Transformer2DModel, independent of norm_eps
TRANSFORMER_LAYERNORM_EPS = 1e-5  # BasicTransformerBlock's norm_eps default, as Transformer2DModel passes it
FF_MULT = 4  # diffusers FeedForward(mult=4): GEGLU projects to 2 * 4C, net.2 maps 4C back to C

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

_TOKENS = ("activation_batch", "activation_length", "activation_embed")
_MAPS = ("activation_batch", None, None, "activation_embed")


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name}={list(value)} has {len(value)} entries for {n} levels")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers `UNet2DConditionModel` config fields (diffusers' defaults), plus our policy fields.

    `attention_head_dim` is read as diffusers does when `num_attention_heads` is null: it is the number of heads per
    level (Emu2-Gen: [5, 10, 20] heads of width 64). Per-level fields may be an int or one entry per level; the up
    path uses them reversed and the mid block uses the last.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # heads per level (diffusers naming)
    use_linear_projection: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    upcast_attention: bool = False  # softmax is always fp32 here (layers.attention), so this changes nothing
    # ours
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True  # nn.scan over the BasicTransformerBlocks of each Transformer2DModel
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "xla"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                     "transformer_layers_per_block", "attention_head_dim", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {len(self.down_block_types)} down_block_types, {len(self.up_block_types)} "
                             f"up_block_types and {n} block_out_channels; they must be equal")
        for kind, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, kind) if t not in allowed]
            if bad:
                raise ValueError(f"UNet config: {kind} {bad} not supported; expected {list(allowed)}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} not supported; expected "
                             f"'UNetMidBlock2DCrossAttn' or null")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"UNet config: act_fn={self.act_fn!r} not supported; expected 'silu'")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            values = _per_level(getattr(self, name), n, name)
            if any(isinstance(v, (list, tuple)) for v in values):
                raise ValueError(f"UNet config: nested {name} (an asymmetric UNet) is not supported")
        if isinstance(self.cross_attention_dim, (list, tuple)):
            raise ValueError("UNet config: a per-level cross_attention_dim list is not supported; expected one int")
        if self.norm_num_groups is None:
            raise ValueError("UNet config: norm_num_groups=null is not supported; expected an int")
        check_groups(self.block_out_channels, self.norm_num_groups, "UNet config")
        # diffusers builds inner width heads * (C // heads), silently != C when heads do not divide C: refuse
        for where, channels, heads, attn in self._attention_sites():
            if attn and channels % heads:
                raise ValueError(f"UNet config: {where} has {channels} channels, not divisible by its {heads} "
                                 f"attention heads (attention_head_dim is the head count)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={self.addition_embed_type!r} not supported; expected "
                             f"'text_time' or null")
        if self.addition_embed_type == "text_time":
            if self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None:
                raise ValueError("UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            if self.text_embeds_dim <= 0:
                raise ValueError(
                    f"UNet config: projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim}"
                    f" leaves no room for the pooled text vector next to {NUM_TIME_IDS} x "
                    f"addition_time_embed_dim={self.addition_time_embed_dim} time-id sinusoids")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ValueError(f"UNet config: {name}={getattr(self, name)} must be odd")
        if self.downsample_padding < 0:
            raise ValueError(f"UNet config: downsample_padding={self.downsample_padding} must be >= 0")

    def _attention_sites(self):
        n = len(self.block_out_channels)
        for i in range(n):
            yield (f"down_blocks.{i}", self.block_out_channels[i], self.heads[i],
                   self.down_block_types[i] == "CrossAttnDownBlock2D")
            j = n - 1 - i
            yield (f"up_blocks.{i}", self.block_out_channels[j], self.heads[j],
                   self.up_block_types[i] == "CrossAttnUpBlock2D")
        yield "mid_block", self.block_out_channels[-1], self.heads[-1], self.mid_block_type is not None

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_level(self.attention_head_dim, self.num_levels, "attention_head_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_level(self.layers_per_block, self.num_levels, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_level(self.transformer_layers_per_block, self.num_levels, "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text vector that "text_time" expects (projection input minus the time-id part)."""
        return self.projection_class_embeddings_input_dim - NUM_TIME_IDS * self.addition_time_embed_dim


@dataclasses.dataclass(frozen=True)
class Level:
    """One down or up level, as diffusers builds it."""

    resnets: tuple[tuple[int, int], ...]  # (in, out) channels of each ResnetBlock2D
    attention: bool  # Transformer2DModel after each resnet (CrossAttn*Block2D)
    heads: int
    transformer_layers: int
    resample: bool  # ends with a Downsample2D (down path) / an Upsample2D (up path)


def down_levels(cfg: UNetConfig) -> tuple[Level, ...]:
    chans = cfg.block_out_channels
    out = []
    for i, block_type in enumerate(cfg.down_block_types):
        cin = chans[max(i - 1, 0)]
        resnets = tuple((cin if j == 0 else chans[i], chans[i]) for j in range(cfg.layers[i]))
        out.append(Level(resnets, block_type == "CrossAttnDownBlock2D", cfg.heads[i], cfg.transformer_layers[i],
                         i < cfg.num_levels - 1))
    return tuple(out)


def up_levels(cfg: UNetConfig) -> tuple[Level, ...]:
    """Up level i: resnet j takes [h, skip] with h from the previous level (j = 0) and the skip popped last-first."""
    rev = tuple(reversed(cfg.block_out_channels))
    n = cfg.num_levels
    out = []
    for i, block_type in enumerate(cfg.up_block_types):
        width, prev = rev[i], rev[max(i - 1, 0)]
        skip_last = rev[min(i + 1, n - 1)]
        num = cfg.layers[n - 1 - i] + 1
        resnets = tuple(((prev if j == 0 else width) + (skip_last if j == num - 1 else width), width)
                        for j in range(num))
        out.append(Level(resnets, block_type == "CrossAttnUpBlock2D", cfg.heads[n - 1 - i],
                         cfg.transformer_layers[n - 1 - i], i < n - 1))
    return tuple(out)


def mid_level(cfg: UNetConfig) -> Level | None:
    if cfg.mid_block_type is None:
        return None
    c = cfg.block_out_channels[-1]
    return Level(((c, c), (c, c)), True, cfg.heads[-1], cfg.transformer_layers[-1], False)


# diffusers UNet2DConditionModel arguments we do not implement, with the only value we accept
_FIXED = {
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
}


def config_from_hf(hf: dict) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` dict; absent keys take diffusers' defaults.

    Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored; diffusers options outside the SDXL family
    raise a ValueError naming the key.
    """
    if hf.get("num_attention_heads") is not None:
        # as diffusers: "it is not possible to define the number of attention heads via `num_attention_heads`"
        raise ValueError("UNet config: num_attention_heads must be null; diffusers reads the head count from "
                         "attention_head_dim and refuses num_attention_heads")
    for key, accepted in _FIXED.items():
        value = hf.get(key, accepted)
        if key == "only_cross_attention" and isinstance(value, (list, tuple)):
            value = any(value)
        if key == "mid_block_only_cross_attention" and value is False:
            value = None
        if value != accepted:
            raise ValueError(f"UNet config: {key}={value!r} is not supported; expected {accepted!r}")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    return UNetConfig(**{k: v for k, v in hf.items() if k in fields})


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """diffusers `get_timestep_embedding`: (N,) -> (N, dim) fp32 [sin, cos] (or [cos, sin]) of t * freqs."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - freq_shift)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ---------------------------------------------------------------------------------------------------------------
# Modules. Names mirror the PyTorch attributes.


def _policy(cfg: UNetConfig) -> dict:
    return dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""

    features: int
    in_axis: str = "time"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(self.features, kernel_axes=(self.in_axis, "time"), name="linear_1", **kw)(x)
        return layers.Dense(self.features, kernel_axes=("time", "time"), name="linear_2", **kw)(nn.silu(x))


class Attention(nn.Module):
    """diffusers `Attention` of a BasicTransformerBlock: q/k/v without bias, `to_out.0` with bias, no mask."""

    channels: int
    heads: int
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):  # x (B, L, C); context (B, N, D_ctx) or None for self-attention
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        source, kv_axis = (x, "embed") if context is None else (context.astype(self.dtype), "cond")
        head_dim = self.channels // self.heads

        def project(name, inputs, in_axis):
            y = layers.Dense(self.channels, use_bias=False, kernel_axes=(in_axis, "heads"), name=name, **kw)(inputs)
            return nn.with_logical_constraint(
                y.reshape(*y.shape[:2], self.heads, head_dim),
                ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))

        q = project("to_q", x, "embed")
        k, v = project("to_k", source, kv_axis), project("to_v", source, kv_axis)
        out = layers.attention(q, k, v, scale=head_dim ** -0.5, implementation=self.attention_impl)
        out = out.reshape(*out.shape[:2], self.channels)
        return layers.Dense(self.channels, kernel_axes=("heads", "embed"), name="to_out", **kw)(out)


class GEGLU(nn.Module):
    """diffusers `GEGLU`: proj to 2 * inner, first half value, second half gate, value * GELU_erf(gate)."""

    inner: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = layers.Dense(2 * self.inner, kernel_axes=("embed", "mlp"), name="proj", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        value, gate = jnp.split(y, 2, axis=-1)
        gate = layers.gelu_exact(gate.astype(jnp.float32)).astype(value.dtype)
        return nn.with_logical_constraint(value * gate, ("activation_batch", "activation_length", "activation_mlp"))


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu")`: net.0 = GEGLU, net.1 = dropout, net.2 = Linear(4C -> C)."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(FF_MULT * self.channels, name="net_0", **kw)(x)
        return layers.Dense(self.channels, kernel_axes=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (norm_type "layer_norm"): pre-norm self-attn, cross-attn, GEGLU FF.

    Scan-friendly: `(h, context) -> (h, None)`.
    """

    channels: int
    heads: int
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, context):  # h (B, L, C), context (B, N, D_ctx)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return layers.LayerNorm(eps=TRANSFORMER_LAYERNORM_EPS, name=name, **kw)

        attn = dict(channels=self.channels, heads=self.heads, attention_impl=self.attention_impl, **kw)
        h = h + Attention(name="attn1", **attn)(norm("norm1")(h))
        h = h + Attention(name="attn2", **attn)(norm("norm2")(h), context)
        h = h + FeedForward(self.channels, name="ff", **kw)(norm("norm3")(h))
        return nn.with_logical_constraint(h, _TOKENS), None


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel`, continuous input: GroupNorm(eps 1e-6) -> proj_in -> blocks -> proj_out -> +x.

    `proj_in`/`proj_out` are Dense layers over channels for both `use_linear_projection` settings: a 1x1 conv on
    (B, H, W, C) is the same matmul (the converter reshapes the torch conv weights).
    """

    cfg: UNetConfig
    channels: int
    heads: int
    num_layers: int

    def setup(self):
        cfg, kw = self.cfg, _policy(self.cfg)
        self.norm = GroupNorm(cfg.norm_num_groups, TRANSFORMER_GROUPNORM_EPS, **kw)
        self.proj_in = layers.Dense(self.channels, kernel_axes=("embed", "mlp"), **kw)
        self.transformer_blocks = layers.repeat_blocks(
            BasicTransformerBlock, self.num_layers, scan=cfg.scan_layers, remat=cfg.remat,
            remat_policy=cfg.remat_policy, n_broadcast=1, channels=self.channels, heads=self.heads,
            attention_impl=cfg.attention_impl, **kw)
        self.proj_out = layers.Dense(self.channels, kernel_axes=("mlp", "embed"), **kw)

    def __call__(self, x, context):  # x (B, H, W, C), context (B, N, D_ctx)
        b, height, width, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(b, height * width, c))
        tokens = nn.with_logical_constraint(tokens, _TOKENS)
        tokens = layers.run_blocks(self.transformer_blocks, tokens, context)
        return self.proj_out(tokens).reshape(b, height, width, c) + x.astype(tokens.dtype)


def _resnet(cfg: UNetConfig, out_channels: int, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(out_channels, cfg.norm_num_groups, cfg.norm_eps, output_scale_factor=scale, **_policy(cfg))


class DownBlock(nn.Module):
    """diffusers `DownBlock2D` / `CrossAttnDownBlock2D` (down level `level`): returns (h, skip outputs)."""

    cfg: UNetConfig
    level: int

    def setup(self):
        cfg = self.cfg
        spec = down_levels(cfg)[self.level]
        self.resnets = [_resnet(cfg, cout) for _, cout in spec.resnets]
        if spec.attention:
            width = spec.resnets[-1][1]
            self.attentions = [Transformer2DModel(cfg, width, spec.heads, spec.transformer_layers)
                               for _ in spec.resnets]
        if spec.resample:
            self.downsamplers = [Downsample2D(spec.resnets[-1][1], cfg.downsample_padding, **_policy(cfg))]

    def __call__(self, h, temb, context):
        spec = down_levels(self.cfg)[self.level]
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if spec.attention:
                h = self.attentions[j](h, context)
            skips.append(h)
        if spec.resample:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class UpBlock(nn.Module):
    """diffusers `UpBlock2D` / `CrossAttnUpBlock2D` (up level `level`): each resnet takes concat([h, skip])."""

    cfg: UNetConfig
    level: int

    def setup(self):
        cfg = self.cfg
        spec = up_levels(cfg)[self.level]
        self.resnets = [_resnet(cfg, cout) for _, cout in spec.resnets]
        if spec.attention:
            width = spec.resnets[-1][1]
            self.attentions = [Transformer2DModel(cfg, width, spec.heads, spec.transformer_layers)
                               for _ in spec.resnets]
        if spec.resample:
            self.upsamplers = [Upsample2D(spec.resnets[-1][1], **_policy(cfg))]

    def __call__(self, h, skips, temb, context, upsample_size=None):
        spec = up_levels(self.cfg)[self.level]
        skips = list(skips)
        for j, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1), temb)
            if spec.attention:
                h = self.attentions[j](h, context)
        if spec.resample:
            h = self.upsamplers[0](h, upsample_size)
        return h


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn` (num_layers 1): resnet -> Transformer2DModel -> resnet."""

    cfg: UNetConfig

    def setup(self):
        cfg = self.cfg
        spec = mid_level(cfg)
        width = spec.resnets[0][1]
        self.resnets = [_resnet(cfg, width, cfg.mid_block_scale_factor) for _ in spec.resnets]
        self.attentions = [Transformer2DModel(cfg, width, spec.heads, spec.transformer_layers)]

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UNet2DConditionModel(nn.Module):
    """eps = UNet(sample (B,H,W,C_in), timesteps (B,) or scalar, encoder_hidden_states (B,N,D_ctx),
    text_embeds=(B,P), time_ids=(B,6)) -> (B,H,W,C_out) float32."""

    cfg: UNetConfig

    def setup(self):
        cfg, kw = self.cfg, _policy(self.cfg)
        self.conv_in = Conv2D(cfg.block_out_channels[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, **kw)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.time_embed_dim, in_axis="cond", **kw)
        self.down_blocks = [DownBlock(cfg, i) for i in range(cfg.num_levels)]
        if cfg.mid_block_type is not None:
            self.mid_block = MidBlock(cfg)
        self.up_blocks = [UpBlock(cfg, i) for i in range(cfg.num_levels)]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=jnp.float32,
                                       param_dtype=kw["param_dtype"])  # SiLU in fp32, rounded at conv_out
        self.conv_out = Conv2D(cfg.out_channels, cfg.conv_out_kernel, **kw)

    def embed_time(self, timesteps, batch: int, text_embeds=None, time_ids=None):
        """temb (B, time_embed_dim): time_embedding(sinusoid(t)) + add_embedding([text_embeds, sinusoids(time_ids)])."""
        cfg = self.cfg
        dt = layers.to_dtype(cfg.dtype)
        t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
        t = jnp.broadcast_to(t, (batch,))  # a scalar (or one value) serves the whole batch, as diffusers' expand
        emb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("UNet: addition_embed_type 'text_time' needs text_embeds and time_ids")
            if text_embeds.shape[-1] != cfg.text_embeds_dim:
                raise ValueError(f"UNet: text_embeds has width {text_embeds.shape[-1]}; the config expects "
                                 f"{cfg.text_embeds_dim} (projection_class_embeddings_input_dim minus "
                                 f"{NUM_TIME_IDS} x addition_time_embed_dim)")
            # each time id gets its own sinusoid; concatenated in id order after the pooled text vector (diffusers
            # flattens, embeds and reshapes to (text_embeds rows, -1), so a flat (B*6,) vector also works)
            time_embeds = timestep_embedding(jnp.asarray(time_ids).reshape(-1), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift)
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            add_embeds = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_embeds], axis=-1).astype(dt)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
        cfg = self.cfg
        dt = layers.to_dtype(cfg.dtype)
        b, height, width, channels = sample.shape
        if channels != cfg.in_channels:
            raise ValueError(f"UNet: sample has {channels} channels (channels-last); expected {cfg.in_channels}")
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet: encoder_hidden_states has width {encoder_hidden_states.shape[-1]}; expected "
                             f"cross_attention_dim={cfg.cross_attention_dim}")
        # the upsamplers are told the skip's size when the latent is not a multiple of 2^(num upsamplers)
        overall_up = 2 ** (cfg.num_levels - 1)
        forward_upsample_size = height % overall_up != 0 or width % overall_up != 0

        emb = self.embed_time(timesteps, b, text_embeds, time_ids)
        context = encoder_hidden_states.astype(dt)
        x = sample.astype(dt)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = nn.with_logical_constraint(self.conv_in(x), _MAPS)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, context)
            skips += outputs
        if cfg.mid_block_type is not None:
            h = self.mid_block(h, emb, context)
        for i, (block, spec) in enumerate(zip(self.up_blocks, up_levels(cfg))):
            n = len(spec.resnets)
            taken, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if spec.resample and forward_upsample_size else None
            h = nn.with_logical_constraint(block(h, taken, emb, context, size), _MAPS)
        h = self.conv_out(nn.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)


def _init_args(cfg: UNetConfig):
    side = 2 ** (cfg.num_levels - 1)
    args = (jnp.zeros((1, side, side, cfg.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32))
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        kwargs = {"text_embeds": jnp.zeros((1, cfg.text_embeds_dim), jnp.float32),
                  "time_ids": jnp.zeros((1, NUM_TIME_IDS), jnp.float32)}
    return args, kwargs, None


registry.register(registry.Kind(
    name="unet", config_from_hf=config_from_hf, build=lambda cfg: UNet2DConditionModel(cfg), init_args=_init_args,
    converter="unet", class_names=("UNet2DConditionModel",)))


__all__ = [
    "UNetConfig", "UNet2DConditionModel", "Transformer2DModel", "BasicTransformerBlock", "DownBlock", "UpBlock",
    "MidBlock", "TimestepEmbedding", "Level", "down_levels", "up_levels", "mid_level", "config_from_hf",
    "timestep_embedding", "NUM_TIME_IDS",
]
