"""2-D convolutional building blocks shared by the SDXL-family UNet and the KL autoencoder, channels-last.

Each block mirrors a diffusers module (`torch.nn.GroupNorm`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, the
single-head `Attention` of `UNetMidBlock2D`) with the same parameter names, so the converters are renames plus
layout transposes. Activations are (B, H, W, C); conv kernels are (kh, kw, C_in, C_out) (torch: (O, I, kh, kw)).
This file declares no model kind.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers

# conv kernels (kh, kw, C_in, C_out): FSDP shards the input channels like every other weight's input width
_CONV_AXES = (None, None, "embed", None)


def check_groups(channels: Sequence[int], groups: int, what: str) -> None:
    """torch.nn.GroupNorm refuses a group count that does not divide the channels: say which width fails."""
    bad = sorted({c for c in channels if c % groups})
    if bad:
        raise ValueError(f"{what}: norm_num_groups={groups} does not divide the channel width(s) {bad}")


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on channels-last input: contiguous channel groups, fp32 statistics, biased variance."""

    num_groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, ..., C)
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {channels} channels")
        x32 = x.astype(jnp.float32)
        batch, per_group = x.shape[0], channels // self.num_groups
        spatial = tuple(range(1, x.ndim - 1))  # every axis but batch and channel
        bshape = (batch,) + (1,) * len(spatial) + (channels,)

        def group_mean(per_channel):  # (B, C) means over the spatial axes -> each channel's group mean, (B, C)
            g = per_channel.reshape(batch, self.num_groups, per_group).mean(-1)
            return jnp.repeat(g, per_group, axis=-1)

        # Two passes (mean, then the mean squared deviation: torch's biased variance, no E[x^2] - E[x]^2
        # cancellation), each reducing the spatial axes per channel with channels kept as the minor (vectorised)
        # dimension and only then over each group's channels: on XLA:CPU this is ~2x faster than reducing a
        # (..., groups, C / groups) view whose minor dimension holds only C / groups values.
        mean = group_mean(jnp.mean(x32, axis=spatial))
        var = group_mean(jnp.mean(jnp.square(x32 - mean.reshape(bshape)), axis=spatial))
        scale = self.param("scale", layers.partitioned(nn.initializers.ones, ("norm",)), (channels,), self.param_dtype)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("norm",)), (channels,), self.param_dtype)
        mul = jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)  # (B, C): one multiply-add per element
        add = bias.astype(jnp.float32) - mean * mul
        return (x32 * mul.reshape(bshape) + add.reshape(bshape)).astype(self.dtype)


class Conv2D(nn.Module):
    """torch.nn.Conv2d(kernel_size, stride, bias) with explicit (top, bottom), (left, right) zero padding."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # None: (k - 1) // 2 on every side
    use_bias: bool = True
    # conv(nearest x2 upsample of x) (diffusers `Upsample2D`), computed on x itself: see `upsample2x_conv`
    upsample_nearest2x: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C_in)
        k = self.kernel_size
        pad = self.padding if self.padding is not None else (((k - 1) // 2,) * 2,) * 2
        # torch's default init: kaiming-uniform(a=sqrt(5)) over fan_in = C_in * k * k
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("kernel", layers.partitioned(init, _CONV_AXES), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        if self.upsample_nearest2x:
            if (k, self.stride, tuple(map(tuple, pad))) != (3, 1, ((1, 1), (1, 1))):
                raise ValueError("Conv2D(upsample_nearest2x=True) needs a 3x3 kernel, stride 1, padding 1")
            y = upsample2x_conv(x.astype(self.dtype), kernel, self.dtype)
        elif k == 1 and self.stride == 1 and not any(p for side in pad for p in side) and \
                layers.target_platform() != "tpu":
            # a 1x1 convolution is a matmul: XLA:CPU runs it as one 2-D dot at the matmul rate, and as a
            # convolution at ~1/5 of it (the SDXL VAE's 128 -> 64 shortcut at 256 x 256: 48 ms as a conv)
            y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel[0, 0].astype(self.dtype)).reshape(
                *x.shape[:-1], self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride, self.stride),
                padding=tuple(tuple(p) for p in pad), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", layers.partitioned(nn.initializers.zeros, (None,)), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def upsample2x_conv(x, kernel, dtype):
    """3x3 conv (padding 1) of the nearest x2 upsample of x (B, H, W, C), without upsampling first.

    Output pixel (2i + a, 2j + b) sees, along each axis, upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: a 2-tap filter on x with taps (K0, K1 + K2) at offsets
    (-1, 0), or (K0 + K1, K2) at (0, +1) (zero padding maps to zero padding). So the four output phases are four
    2x2 convolutions of x, run as one (output channels 4 x C_out, x padded by 1, phase (a, b) read at offset (a, b)):
    4 instead of 9 multiply-adds per output pixel and channel pair, and no 4x-sized upsampled copy. Same math as
    upsample-then-conv up to fp32 rounding (weights summed in their parameter dtype).

    For a TPU program (`layers.target_platform()`) it stays upsample-then-conv: there the phase form's 4 x C_out-wide
    output and its interleave move more HBM bytes than the FLOPs they save (the SDXL VAE decode on v5e, XLA's
    estimate: 0.087 s upsampled, 0.108 s phased, docs/decoders_performance.md)."""
    if layers.target_platform() == "tpu":
        return jax.lax.conv_general_dilated(nearest_resize(x, (2 * x.shape[1], 2 * x.shape[2])), kernel.astype(dtype),
                                            window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, w, _ = x.shape
    c_out = kernel.shape[-1]
    taps = ((lambda t: (t[0], t[1] + t[2])), (lambda t: (t[0] + t[1], t[2])))  # phase 0, phase 1
    phases = []
    for row_taps in taps:
        rows = jnp.stack(row_taps(kernel), axis=0)  # (2, 3, C_in, C_out)
        for col_taps in taps:
            phases.append(jnp.stack(col_taps(jnp.moveaxis(rows, 1, 0)), axis=1))  # (2, 2, C_in, C_out)
    kernel4 = jnp.concatenate(phases, axis=-1).astype(dtype)  # phases (0,0), (0,1), (1,0), (1,1)
    y = jax.lax.conv_general_dilated(x, kernel4, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, h + 1, w + 1, 2, 2, c_out)
    out = jnp.stack([jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in range(2)], axis=3) for a in range(2)],
                    axis=2)  # (B, H, 2, W, 2, C_out)
    return out.reshape(b, 2 * h, 2 * w, c_out)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with time_embedding_norm "default" (temb added between the two convs).

    out = (shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + time_emb_proj(SiLU(temb)))))) / output_scale_factor.
    `time_emb_proj` exists only when called with a temb (the VAE's resnets have none); the 1x1 `conv_shortcut`
    only when the input width differs from `out_channels` (diffusers `use_in_shortcut` default).
    """

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):  # x (B, H, W, C_in), temb (B, T)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # norm -> SiLU stays fp32 and is rounded once, at the conv's input (XLA fuses it: nothing fp32 is stored)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", dtype=jnp.float32, param_dtype=self.param_dtype)(x))
        h = Conv2D(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = layers.Dense(self.out_channels, kernel_axes=("time", "embed"), name="time_emb_proj", **kw)(
                nn.silu(temb.astype(jnp.float32)))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", dtype=jnp.float32, param_dtype=self.param_dtype)(h))
        h = Conv2D(self.out_channels, 3, name="conv2", **kw)(h)
        shortcut = x.astype(self.dtype)
        if x.shape[-1] != self.out_channels:
            shortcut = Conv2D(self.out_channels, 1, name="conv_shortcut", **kw)(shortcut)
        out = shortcut + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True)`: 3x3 stride-2 conv (param `conv`).

    padding > 0 pads symmetrically (the UNet's `downsample_padding=1`); padding 0 pads one row/column at the
    bottom/right only (diffusers `F.pad(x, (0, 1, 0, 1))`, the VAE encoder), which is not the same for odd sizes.
    """

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.padding
        pad = ((p, p), (p, p)) if p > 0 else ((0, 1), (0, 1))
        return Conv2D(self.channels, 3, stride=2, padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="conv")(x)


def nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
    """Source row of each output row of torch's `F.interpolate(mode="nearest", size=out_size)`.

    ATen: floor(i * (float32) in/out), clamped to in - 1 (an exact x2 is i >> 1). Host-side: sizes are static.
    """
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(x, size: tuple[int, int]):
    """(B, H, W, C) -> (B, size[0], size[1], C) by torch's nearest-neighbour rule."""
    _, h, w, _ = x.shape
    if tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, jnp.asarray(nearest_source_index(h, size[0])), axis=1)
    return jnp.take(x, jnp.asarray(nearest_source_index(w, size[1])), axis=2)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest x2 (or to an explicit `output_size`), then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        size = tuple(output_size) if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
        if size == (2 * x.shape[1], 2 * x.shape[2]):  # the usual exact x2: 4/9 of the conv's FLOPs, no 4x copy
            return Conv2D(self.channels, 3, upsample_nearest2x=True, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="conv")(x)
        x = nearest_resize(x, size)
        return Conv2D(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class SpatialAttention(nn.Module):
    """The mid-block attention of diffusers `UNetMidBlock2D` (`Attention` with `group_norm`, residual connection).

    Tokens are the H*W positions; q/k/v/out Linear layers all have biases; `heads` = channels / attention_head_dim
    (1 in AutoencoderKL: one head as wide as the channels). Runs through `layers.attention`, i.e.
    `jax.nn.dot_product_attention`, so XLA may pick a memory-efficient kernel for the 16k-token 1024 px case.
    """

    heads: int
    groups: int
    eps: float
    rescale_output_factor: float = 1.0
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        if c % self.heads:
            raise ValueError(f"SpatialAttention: {self.heads} heads do not divide {c} channels")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, h * w, c)
        head_dim = c // self.heads

        def project(name):
            y = layers.Dense(c, kernel_axes=("embed", "heads"), name=name, **kw)(tokens)
            return y.reshape(b, h * w, self.heads, head_dim)

        out = layers.attention(project("to_q"), project("to_k"), project("to_v"), scale=head_dim ** -0.5,
                               implementation=self.attention_impl)
        out = layers.Dense(c, kernel_axes=("heads", "embed"), name="to_out", **kw)(out.reshape(b, h * w, c))
        out = out.reshape(b, h, w, c) + x.astype(self.dtype)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


__all__ = [
    "GroupNorm", "Conv2D", "ResnetBlock2D", "Downsample2D", "Upsample2D", "SpatialAttention", "nearest_resize",
    "upsample2x_conv",
    "nearest_source_index", "check_groups",
]
