"""Deep Compression Autoencoder (DC-AE), the image tokenizer of SANA: diffusers `AutoencoderDC`.

The forward of diffusers 0.42.1 `models/autoencoders/autoencoder_dc.py` (with `SanaMultiscaleLinearAttention` /
`SanaMultiscaleAttnProcessor2_0` and SANA's `GLUMBConv`), for every block type and option it supports:
`ResBlock` and `EfficientViTBlock` stages, strided-conv or pixel-unshuffle downsampling, interpolate or
pixel-shuffle upsampling, "rms_norm" or "batch_norm" decoder norms, per-stage activations, and the
parameter-free shortcuts (channel-group means, repeat-interleave) around every resampling step.

Layout differences only (no numerical difference):

- images and latents are channels-last `(B, H, W, C)` (torch: `(B, C, H, W)`); pixel (un)shuffle keeps torch's
  channel order (channel `c * 4 + 2 * dy + dx` holds pixel `(dy, dx)` of channel `c`), so weights convert as is;
- the (ungrouped) 1x1 convolutions of GLUMBConv and the q/k/v/out projections are `Dense` layers applied
  channels-last; the grouped 1x1 convolution of the multiscale branch is a block-diagonal matmul;
- the attention math runs in fp32 on both the linear and the quadratic path (diffusers upcasts the linear path
  only; the quadratic path in fp32 is at least as accurate in a bf16 compute policy);
- BatchNorm (inference only, running statistics) keeps its statistics in the `params` collection as `mean` and
  `var` next to `scale`/`bias`, so one params tree converts and loads; the forward stops their gradient.

`encode` returns the deterministic latent, unscaled; a diffusion model sees `(latent - shift_factor) *
scaling_factor` (shift 0 when None), as the SANA pipelines do with `vae.config.scaling_factor`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip3o_jax.models import conv_blocks, layers, registry

NORM_EPS = 1e-5  # diffusers `get_normalization` and the RMSNorms of GLUMBConv / the decoder output
ATTN_EPS = 1e-15  # SanaMultiscaleLinearAttention(eps=1e-15)
GLU_EXPAND = 4  # GLUMBConv(expand_ratio=4)
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
# diffusers `get_activation` (ACT2CLS); GELU is torch's exact-erf default
ACTIVATIONS = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": layers.gelu_exact,
    "relu": jax.nn.relu,
}


def _per_stage(value, n: int, name: str) -> tuple:
    """A per-stage setting as a tuple of n: a single string is repeated (as diffusers does), a sequence is kept."""
    if isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"AutoencoderDCConfig: {name} has {len(value)} entries but there are {n} stages")
    return value


@dataclasses.dataclass(frozen=True)
class AutoencoderDCConfig:
    """Field names and defaults of diffusers `AutoencoderDC.__init__`, plus `shift_factor` and our dtype policy."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: Any = "ResBlock"
    decoder_block_types: Any = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"  # "interpolate" = nearest x2 + conv; anything else = pixel shuffle
    downsample_block_type: str = "pixel_unshuffle"  # anything else (the hub's "Conv") = 3x3 stride-2 conv
    decoder_norm_types: Any = "rms_norm"
    decoder_act_fns: Any = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0
    shift_factor: float | None = None  # not an AutoencoderDC field; kept for configs that carry one
    # ours
    dtype: str = "float32"  # compute dtype of convolutions and projections (attention math and norms run in fp32)
    param_dtype: str = "float32"
    # the depthwise convolutions (GLUMBConv 3x3, multiscale kxk): "conv" = XLA's grouped convolution (fast on
    # TPU/GPU), "shifts" = a sum of shifted slices (layers.depthwise_conv2d; 12-40x faster on XLA:CPU); same parameters
    depthwise_impl: str = "auto"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise lists to tuples)
        for side in ("encoder", "decoder"):
            widths = tuple(int(c) for c in getattr(self, f"{side}_block_out_channels"))
            n = len(widths)
            if n == 0:
                raise ValueError(f"AutoencoderDCConfig: {side}_block_out_channels is empty")
            set_(f"{side}_block_out_channels", widths)
            set_(f"{side}_layers_per_block",
                 tuple(int(x) for x in _per_stage(getattr(self, f"{side}_layers_per_block"), n,
                                                  f"{side}_layers_per_block")))
            set_(f"{side}_block_types", _per_stage(getattr(self, f"{side}_block_types"), n, f"{side}_block_types"))
            scales = _per_stage(getattr(self, f"{side}_qkv_multiscales"), n, f"{side}_qkv_multiscales")
            set_(f"{side}_qkv_multiscales", tuple(tuple(int(k) for k in s) for s in scales))
        n_dec = len(self.decoder_block_out_channels)
        set_("decoder_norm_types", _per_stage(self.decoder_norm_types, n_dec, "decoder_norm_types"))
        set_("decoder_act_fns", _per_stage(self.decoder_act_fns, n_dec, "decoder_act_fns"))
        self._validate()

    def _validate(self):
        if self.depthwise_impl not in layers.DEPTHWISE_IMPLS:
            raise ValueError(f"AutoencoderDCConfig: depthwise_impl={self.depthwise_impl!r}; expected one of "
                             f"{layers.DEPTHWISE_IMPLS}")
        for t in self.encoder_block_types + self.decoder_block_types:
            if t not in BLOCK_TYPES:
                raise ValueError(f"AutoencoderDCConfig: block type {t!r} is not supported; expected one of "
                                 f"{BLOCK_TYPES}")
        for t in self.decoder_norm_types:
            if t not in NORM_TYPES:
                raise ValueError(f"AutoencoderDCConfig: decoder norm type {t!r} is not supported; expected one of "
                                 f"{NORM_TYPES}")
        for a in self.decoder_act_fns + (self.decoder_conv_act_fn,):
            if a not in ACTIVATIONS:
                raise ValueError(f"AutoencoderDCConfig: activation {a!r} is not supported; expected one of "
                                 f"{sorted(ACTIVATIONS)}")
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_block_out_channels")
            depths = getattr(self, f"{side}_layers_per_block")
            n = len(widths)
            if any(c <= 0 for c in widths) or any(d < 0 for d in depths):
                raise ValueError(f"AutoencoderDCConfig: {side} widths {widths} and depths {depths} must be positive")
            # diffusers skips the resampling step of an empty stage, so an empty middle stage silently changes the
            # compression ratio (or the channel count); only the first stage (a resampling stem instead) and the
            # last stage may be empty
            for i in range(1, n - 1):
                if depths[i] == 0:
                    raise ValueError(f"AutoencoderDCConfig: {side}_layers_per_block[{i}] = 0; only the first and the "
                                     "last stage may have no blocks")
            if depths[0] == 0 and n < 2:
                raise ValueError(f"AutoencoderDCConfig: {side}_layers_per_block[0] = 0 needs at least two stages")
            for scales in getattr(self, f"{side}_qkv_multiscales"):
                if any(k <= 0 or k % 2 == 0 for k in scales):
                    raise ValueError(f"AutoencoderDCConfig: {side}_qkv_multiscales kernel sizes {scales} must be odd "
                                     "(a same-size depthwise convolution)")
            for i, (c, t) in enumerate(zip(widths, getattr(self, f"{side}_block_types"))):
                if t == "EfficientViTBlock" and depths[i] and c % self.attention_head_dim:
                    raise ValueError(f"AutoencoderDCConfig: attention_head_dim={self.attention_head_dim} does not "
                                     f"divide the {side} width {c} of stage {i}")
            for i in range(n - 1):
                if depths[i] and (4 * widths[i]) % widths[i + 1]:
                    raise ValueError(f"AutoencoderDCConfig: the {side} resampling shortcut between widths "
                                     f"{widths[i]} and {widths[i + 1]} needs 4 * {widths[i]} to be divisible by "
                                     f"{widths[i + 1]}")
            shortcut = self.encoder_out_shortcut if side == "encoder" else self.decoder_in_shortcut
            if shortcut and widths[-1] % self.latent_channels:
                raise ValueError(f"AutoencoderDCConfig: latent_channels={self.latent_channels} does not divide the "
                                 f"last {side} width {widths[-1]} (needed by the {side} latent shortcut)")
        if self.downsample_block_type == "pixel_unshuffle":
            w, d = self.encoder_block_out_channels, self.encoder_layers_per_block
            outs = [w[i + 1] for i in range(len(w) - 1) if d[i]] + ([w[1]] if d[0] == 0 else [])
            for c in outs:
                if c % 4:
                    raise ValueError(f"AutoencoderDCConfig: pixel_unshuffle downsampling to width {c} needs a "
                                     "multiple of 4")

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (self.num_stages - 1)

    @property
    def uses_pixel_unshuffle(self) -> bool:
        return self.downsample_block_type == "pixel_unshuffle"

    @property
    def uses_interpolate(self) -> bool:
        return self.upsample_block_type == "interpolate"


_HF_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def config_from_hf(hf: dict) -> AutoencoderDCConfig:
    """AutoencoderDCConfig from a diffusers `AutoencoderDC` config.json dict; unknown keys are ignored."""
    fields = {f.name for f in dataclasses.fields(AutoencoderDCConfig)}
    return AutoencoderDCConfig(**{k: v for k, v in dict(hf).items() if k in fields and k not in _HF_IGNORED})


# ----------------------------------------------------------------------------------------------------------------
# channels-last pixel (un)shuffle with torch's channel order


def pixel_unshuffle(x, factor: int = 2):
    """torch `F.pixel_unshuffle` on (B, H, W, C) -> (B, H/f, W/f, C*f*f); channel c*f*f + f*dy + dx."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)  # (b, h, dy, w, dx, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))  # (b, h, w, c, dy, dx)
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x, factor: int = 2):
    """torch `F.pixel_shuffle` on (B, H, W, C*f*f) -> (B, H*f, W*f, C); the inverse of `pixel_unshuffle`."""
    b, h, w, cff = x.shape
    c = cff // (factor * factor)
    x = x.reshape(b, h, w, c, factor, factor)  # (b, h, w, c, dy, dx)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))  # (b, h, dy, w, dx, c)
    return x.reshape(b, h * factor, w * factor, c)


def channel_group_mean(x, groups: int):
    """Mean over `groups` runs of consecutive channels (torch `x.unflatten(1, (groups, -1)).mean(2)`)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).mean(axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# layers


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, use_bias: bool = True,
         axes: tuple = ("embed", "mlp"), dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
         name: str | None = None) -> nn.Conv:
    """torch `nn.Conv2d(padding=k // 2)` channels-last: kernel (kh, kw, in, out); `axes` are the logical names of
    (in, out). The depthwise convolutions are `layers.DepthwiseConv`."""
    pad = kernel_size // 2
    kernel_init, bias_init = _conv_inits(axes)
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
        name=name)


def _conv_inits(axes: tuple):
    """(kernel_init, bias_init) of `conv` (torch Conv2d's default init, logical axes (in, out) of `axes`)."""
    return (layers.partitioned(layers.torch_linear_init(fan_in_axes=3), (None, None, *axes)),
            layers.partitioned(nn.initializers.zeros, axes[-1:]))


class ChannelRMSNorm(nn.Module):
    """diffusers `RMSNorm(C, eps, elementwise_affine=True, bias=True)` over the channels-last axis, in fp32."""

    eps: float = NORM_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", layers.partitioned(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class InferenceBatchNorm(nn.Module):
    """torch `nn.BatchNorm2d(C, eps=1e-5)` in eval mode: running statistics `mean`/`var` kept in `params`."""

    eps: float = NORM_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]

        def vector(name, init):
            return self.param(name, layers.partitioned(init, ("norm",)), (c,), self.param_dtype)

        scale, bias = vector("scale", nn.initializers.ones), vector("bias", nn.initializers.zeros)
        # statistics, not weights: a gradient step must not move them
        mean = jax.lax.stop_gradient(vector("mean", nn.initializers.zeros)).astype(jnp.float32)
        var = jax.lax.stop_gradient(vector("var", nn.initializers.ones)).astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(norm_type: str, dtype, param_dtype, name: str) -> nn.Module:
    if norm_type == "rms_norm":
        return ChannelRMSNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    if norm_type == "batch_norm":
        return InferenceBatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm type {norm_type!r} is not supported; expected one of {NORM_TYPES}")


# ----------------------------------------------------------------------------------------------------------------
# blocks (each maps (B, H, W, C) -> (B, H', W', C'); parameter names mirror the diffusers module tree)


class ResBlock(nn.Module):
    """diffusers `ResBlock`: conv1 (bias) -> act -> conv2 (no bias) -> norm -> + x."""

    channels: int
    norm_type: str = "rms_norm"
    act_fn: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv(self.channels, 3, name="conv1", **kw)(x)
        h = ACTIVATIONS[self.act_fn](h)
        h = conv(self.channels, 3, use_bias=False, name="conv2", **kw)(h)
        h = make_norm(self.norm_type, name="norm", **kw)(h)
        return h + x


class GroupedPointwiseConv(nn.Module):
    """torch `nn.Conv2d(C_in, C_out, 1, groups=g, bias=False)` as a block-diagonal matmul, kernel (1, 1, C_in/g,
    C_out) as flax's grouped Conv. Not `nn.Conv(feature_group_count=g)`: with its output features sharded, XLA's
    SPMD partitioner (jax 0.10.2) computes a wrong grouped convolution for 1 < g < C_in."""

    features: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        g, c_in = self.groups, x.shape[-1]
        init = layers.partitioned(layers.torch_linear_init(fan_in_axes=3), (None, None, None, "heads"))
        kernel = self.param("kernel", init, (1, 1, c_in // g, self.features), self.param_dtype)
        w = kernel[0, 0].reshape(c_in // g, g, self.features // g).astype(self.dtype)  # (in/g, g, out/g)
        x = x.astype(self.dtype).reshape(*x.shape[:-1], g, c_in // g)
        return jnp.einsum("...gi,igo->...go", x, w).reshape(*x.shape[:-2], self.features)


class MultiscaleProjection(nn.Module):
    """diffusers `SanaMultiscaleAttentionProjection`: depthwise kxk, then a 1x1 conv with 3*heads groups."""

    channels: int  # 3 * inner
    heads: int
    kernel_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.DepthwiseConv(self.kernel_size, padding=self.kernel_size // 2, use_bias=False,
                                 impl=self.depthwise_impl, axis_name="heads", name="proj_in", **kw)(x)
        return GroupedPointwiseConv(self.channels, 3 * self.heads, name="proj_out", **kw)(x)


def linear_relu_attention(q, k, v, eps: float = ATTN_EPS):
    """SanaMultiscaleLinearAttention.apply_linear_attention on (B, N, G, d), fp32: V padded with a row of ones."""
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # (B, N, G, d+1)
    vk = jnp.einsum("bnge,bngd->bged", v, k)  # (B, G, d+1, d) = (V ⊕ 1) Kᵀ
    out = jnp.einsum("bged,bngd->bnge", vk, q)  # (B, N, G, d+1)
    return out[..., :-1] / (out[..., -1:] + eps)


def quadratic_relu_attention(q, k, v, eps: float = ATTN_EPS):
    """SanaMultiscaleLinearAttention.apply_quadratic_attention on (B, N, G, d), fp32: scores normalised over keys."""
    scores = jnp.einsum("bkgd,bqgd->bgkq", k, q)  # (B, G, N_k, N_q) = Kᵀ Q
    scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + eps)
    return jnp.einsum("bkge,bgkq->bqge", v, scores)


class MultiscaleLinearAttention(nn.Module):
    """diffusers `SanaMultiscaleLinearAttention` with `SanaMultiscaleAttnProcessor2_0` (mult 1, residual)."""

    channels: int
    attention_head_dim: int
    kernel_sizes: tuple[int, ...] = (5,)
    norm_type: str = "rms_norm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        hd = self.attention_head_dim
        heads = self.channels // hd
        inner = heads * hd
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # [q_all | k_all | v_all] along channels, then one depthwise+grouped projection per scale appended
        qkv = jnp.concatenate([
            layers.Dense(inner, use_bias=False, kernel_axes=("embed", "heads"), name=name, **kw)(x)
            for name in ("to_q", "to_k", "to_v")
        ], axis=-1)  # (B, H, W, 3*inner)
        scales = [qkv] + [
            MultiscaleProjection(3 * inner, heads, k, depthwise_impl=self.depthwise_impl,
                                 name=f"to_qkv_multiscale_{s}", **kw)(qkv)
            for s, k in enumerate(self.kernel_sizes)
        ]
        qkv = jnp.concatenate(scales, axis=-1).astype(jnp.float32)  # (B, H, W, 3*inner*(1+S))
        # the original single-qkv-conv layout: consecutive chunks of 3*head_dim channels, each split q | k | v, so a
        # group mixes channels of different q/k/v heads; keep the reshape exactly
        qkv = qkv.reshape(b, h * w, -1, 3 * hd)  # (B, N, G, 3d), G = heads*(1+S)
        q, k, v = jax.nn.relu(qkv[..., :hd]), jax.nn.relu(qkv[..., hd:2 * hd]), qkv[..., 2 * hd:]
        attend = linear_relu_attention if h * w > hd else quadratic_relu_attention  # as the processor's switch
        out = attend(q, k, v).reshape(b, h, w, -1).astype(self.dtype)  # (B, H, W, inner*(1+S))
        out = layers.Dense(self.channels, use_bias=False, kernel_axes=("heads", "embed"), name="to_out", **kw)(out)
        out = make_norm(self.norm_type, name="norm_out", **kw)(out)
        return out + x


class GLUMBConv(nn.Module):
    """SANA's `GLUMBConv(expand_ratio=4, norm_type="rms_norm", residual_connection=True)`."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        hidden = GLU_EXPAND * self.channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.Dense(2 * hidden, kernel_axes=("embed", "mlp"), name="conv_inverted", **kw)(x)
        h = jax.nn.silu(h)
        h = layers.DepthwiseConv(3, padding=1, impl=self.depthwise_impl, axis_name="mlp", name="conv_depth", **kw)(h)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * jax.nn.silu(gate)
        h = layers.Dense(self.channels, use_bias=False, kernel_axes=("mlp", "embed"), name="conv_point", **kw)(h)
        h = ChannelRMSNorm(name="norm", **kw)(h)
        return h + x


class EfficientViTBlock(nn.Module):
    """diffusers `EfficientViTBlock`: multiscale linear attention (residual), then GLUMBConv (residual)."""

    channels: int
    attention_head_dim: int
    qkv_multiscales: tuple[int, ...] = (5,)
    norm_type: str = "rms_norm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, depthwise_impl=self.depthwise_impl)
        x = MultiscaleLinearAttention(self.channels, self.attention_head_dim, self.qkv_multiscales, self.norm_type,
                                      name="attn", **kw)(x)
        return GLUMBConv(self.channels, name="conv_out", **kw)(x)


class DCDownBlock2d(nn.Module):
    """diffusers `DCDownBlock2d`: a 3x3 stride-2 conv, or a 3x3 conv to C/4 + pixel-unshuffle; shortcut = the
    pixel-unshuffled input averaged over groups of 4*C_in/C_out consecutive channels."""

    out_channels: int
    use_pixel_unshuffle: bool = False
    shortcut: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_pixel_unshuffle:
            y = pixel_unshuffle(conv(self.out_channels // 4, 3, name="conv", **kw)(x))
        else:
            y = conv(self.out_channels, 3, stride=2, name="conv", **kw)(x)
        if self.shortcut:
            y = y + channel_group_mean(pixel_unshuffle(x), self.out_channels)
        return y


class UpsampleConv(nn.Module):
    """`conv(features, 3)` applied to the nearest x2 upsample of x, with `conv`'s parameters (kernel (3, 3, in,
    out), bias), computed by `conv_blocks.upsample2x_conv` (4/9 of the multiply-adds, no upsampled copy)."""

    features: int
    axes: tuple = ("embed", "mlp")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = _conv_inits(self.axes)
        kernel = self.param("kernel", kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        return conv_blocks.upsample2x_conv(x.astype(self.dtype), kernel, self.dtype) + bias.astype(self.dtype)


class DCUpBlock2d(nn.Module):
    """diffusers `DCUpBlock2d`: nearest x2 + 3x3 conv ("interpolate"), or a 3x3 conv to 4C + pixel-shuffle;
    shortcut = the input's channels repeat-interleaved 4*C_out/C_in times, then pixel-shuffled."""

    out_channels: int
    interpolate: bool = False
    shortcut: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.interpolate:
            # F.interpolate(scale_factor=2, mode="nearest") then the 3x3 conv, as four 2x2 phase convolutions of x
            y = UpsampleConv(self.out_channels, name="conv", **kw)(x)
        else:
            y = pixel_shuffle(conv(4 * self.out_channels, 3, name="conv", **kw)(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, 4 * self.out_channels // x.shape[-1], axis=-1))
        return y


def make_block(block_type: str, channels: int, cfg: AutoencoderDCConfig, norm_type: str, act_fn: str,
               qkv_multiscales: tuple[int, ...], name: str) -> nn.Module:
    kw = dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype), name=name)
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn, **kw)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, cfg.attention_head_dim, qkv_multiscales, norm_type,
                                 depthwise_impl=cfg.depthwise_impl, **kw)
    raise ValueError(f"block type {block_type!r} is not supported; expected one of {BLOCK_TYPES}")


# ----------------------------------------------------------------------------------------------------------------
# encoder, decoder, autoencoder


class Encoder(nn.Module):
    """diffusers DC-AE `Encoder`. Stage i = `down_blocks_{i}_{j}`: its blocks, then (not in the last stage) the
    downsampler; an empty first stage is replaced by a downsampling `conv_in`."""

    config: AutoencoderDCConfig

    @nn.compact
    def __call__(self, images):  # (B, H, W, C_in) -> (B, H/f, W/f, latent_channels)
        cfg = self.config
        kw = dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))
        widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        n = len(widths)
        if depths[0] > 0:
            x = conv(widths[0], 3, name="conv_in", **kw)(images)
        else:
            x = DCDownBlock2d(widths[1], cfg.uses_pixel_unshuffle, shortcut=False, name="conv_in", **kw)(images)
        for i in range(n):
            for j in range(depths[i]):
                # the encoder's blocks always use RMSNorm and SiLU
                x = make_block(cfg.encoder_block_types[i], widths[i], cfg, "rms_norm", "silu",
                               cfg.encoder_qkv_multiscales[i], name=f"down_blocks_{i}_{j}")(x)
            if i < n - 1 and depths[i] > 0:
                x = DCDownBlock2d(widths[i + 1], cfg.uses_pixel_unshuffle, name=f"down_blocks_{i}_{depths[i]}", **kw)(x)
        latent = conv(cfg.latent_channels, 3, name="conv_out", **kw)(x)
        if cfg.encoder_out_shortcut:
            latent = latent + channel_group_mean(x, cfg.latent_channels)
        return latent


class Decoder(nn.Module):
    """diffusers DC-AE `Decoder`, run from the deepest stage up. Stage i = `up_blocks_{i}_{j}`: (not in the last
    stage) the upsampler first, then its blocks; an empty first stage is replaced by an upsampling `conv_out`."""

    config: AutoencoderDCConfig

    @nn.compact
    def __call__(self, latents):  # (B, h, w, latent_channels) -> (B, h*f, w*f, C_in)
        cfg = self.config
        kw = dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        n = len(widths)
        x = conv(widths[-1], 3, name="conv_in", **kw)(latents)
        if cfg.decoder_in_shortcut:
            x = x + jnp.repeat(latents, widths[-1] // cfg.latent_channels, axis=-1).astype(x.dtype)
        for i in reversed(range(n)):
            first = 0
            if i < n - 1 and depths[i] > 0:
                x = DCUpBlock2d(widths[i], cfg.uses_interpolate, name=f"up_blocks_{i}_0", **kw)(x)
                first = 1
            for j in range(depths[i]):
                x = make_block(cfg.decoder_block_types[i], widths[i], cfg, cfg.decoder_norm_types[i],
                               cfg.decoder_act_fns[i], cfg.decoder_qkv_multiscales[i],
                               name=f"up_blocks_{i}_{first + j}")(x)
        x = ChannelRMSNorm(name="norm_out", **kw)(x)
        x = ACTIVATIONS[cfg.decoder_conv_act_fn](x)
        if depths[0] > 0:
            return conv(cfg.in_channels, 3, name="conv_out", **kw)(x)
        return DCUpBlock2d(cfg.in_channels, cfg.uses_interpolate, shortcut=False, name="conv_out", **kw)(x)


class AutoencoderDC(nn.Module):
    """`encode`: images in [-1, 1] -> unscaled latents; `decode`: latents -> images; `__call__`: both."""

    config: AutoencoderDCConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, images):  # (B, H, W, in_channels) -> (B, H/f, W/f, latent_channels)
        cfg = self.config
        f = cfg.spatial_compression_ratio
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"AutoencoderDC.encode: expected images (B, H, W, {cfg.in_channels}), got "
                             f"{tuple(images.shape)}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"AutoencoderDC.encode: image size {images.shape[1]}x{images.shape[2]} is not a "
                             f"multiple of the spatial compression ratio {f}")
        return self.encoder(images)

    def decode(self, latents):  # (B, h, w, latent_channels) -> (B, h*f, w*f, in_channels)
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"AutoencoderDC.decode: expected latents (B, h, w, {cfg.latent_channels}), got "
                             f"{tuple(latents.shape)}")
        return self.decoder(latents)

    def __call__(self, images):
        return self.decode(self.encode(images))


def build(cfg: AutoencoderDCConfig) -> AutoencoderDC:
    return AutoencoderDC(cfg)


def _init_args(cfg: AutoencoderDCConfig):
    # the smallest legal image: the deepest map is 1x1, and encode+decode touches every parameter
    f = cfg.spatial_compression_ratio
    return (jnp.zeros((1, f, f, cfg.in_channels), jnp.float32),), {}, None


registry.register(registry.Kind(
    name="autoencoder_dc",
    config_from_hf=config_from_hf,
    build=build,
    init_args=_init_args,
    converter="autoencoder_dc",
    class_names=("AutoencoderDC",),
))
