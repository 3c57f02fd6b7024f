"""SANA's diffusion transformer: diffusers `SanaTransformer2DModel`, channels-last.

The BLIP3-o SigLIP2 -> SANA decoder runs `Efficient-Large-Model/Sana_1600M_512px_diffusers`: linear (ReLU-kernel)
self-attention, softmax cross-attention to the caption tokens, a GLUMBConv Mix-FFN on the token grid and
AdaLN-single timestep modulation (diffusers `sana_transformer.py`, 0.42.1). Differences in layout only:

- latents are channels-last `(B, H, W, C)` in and out (torch: `(B, C, H, W)`); inside the blocks the residual
  stream is kept as the `(B, H/p, W/p, D)` token grid, so the GLUMBConv convolutions need no reshuffling;
- the blocks are stacked with `nn.scan` (params on a leading `layers` axis) and optionally rematerialised;
- where diffusers silently truncates (a latent side not divisible by the patch size) or fails deep in the
  forward (`cross_attention_dim` != heads * head_dim), we raise a ValueError naming the value.

Parameter names mirror the PyTorch module tree (`attn1/to_q`, `ff/conv_inverted`, `time_embed/linear`, ...), so
`convert/sana.py` is a table of renames plus transposes. The output is float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry
from blip3o_jax.models.dit import timestep_sinusoid

TIME_FREQ_CHANNELS = 256  # PixArtAlphaCombinedTimestepSizeEmbeddings: Timesteps(256, flip_sin_to_cos=True, shift=0)
LINEAR_ATTN_EPS = 1e-15  # SanaLinearAttnProcessor2_0
QK_NORM_EPS = 1e-5  # diffusers `Attention(eps=1e-5)` for norm_q / norm_k
CAPTION_NORM_EPS = 1e-5  # SanaTransformer2DModel.caption_norm
NORM_OUT_EPS = 1e-6  # SanaModulatedNorm (fixed, independent of norm_eps)
MASK_BIAS = -10000.0  # diffusers turns a (B, N) keep-mask into this additive bias

# Activation layouts, named once (see sharding.LOGICAL_AXIS_RULES).
_TOKENS = ("activation_batch", "activation_length", "activation_embed")
_GRID = ("activation_batch", None, None, "activation_embed")
_GRID_MLP = ("activation_batch", None, None, "activation_mlp")
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """Field names and defaults of diffusers `SanaTransformer2DModel` (SANA-1600M), plus our policy fields."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0  # in diffusers' signature but unused by its forward; kept for the round trip
    # ours
    dtype: str = "float32"  # compute dtype of matmuls, convolutions and the residual stream
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "full"
    # GLUMBConv's depthwise 3x3: "conv" = XLA's grouped convolution (fast on TPU/GPU), "shifts" = a sum of shifted
    # slices (layers.depthwise_conv2d; ~20x faster on XLA:CPU), "auto" = shifts for a CPU program, else conv. Same
    # parameters either way
    depthwise_impl: str = "auto"

    def __post_init__(self):
        if self.guidance_embeds:
            raise ValueError("SanaConfig: guidance_embeds=True is not supported (BLIP3-o's SANA has no guidance "
                             "embedding)")
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"SanaConfig: qk_norm={self.qk_norm!r} is not supported; expected None or "
                             "'rms_norm_across_heads' (the SANA 1.0 / 1.5 values)")
        if self.dropout:
            raise ValueError(f"SanaConfig: dropout={self.dropout} is not supported (this port is deterministic)")
        if self.num_cross_attention_heads is None or self.cross_attention_head_dim is None:
            raise ValueError("SanaConfig: num_cross_attention_heads and cross_attention_head_dim must be set "
                             "(every SANA block has a cross-attention)")
        if self.cross_attention_dim != self.inner_dim:
            # captions are projected to the inner dim before attn2, so any other width fails in diffusers' forward
            raise ValueError(f"SanaConfig: cross_attention_dim={self.cross_attention_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {self.inner_dim}")
        if self.patch_size < 1:
            raise ValueError(f"SanaConfig: patch_size={self.patch_size} must be >= 1")
        if self.inner_dim % 2:
            raise ValueError(f"SanaConfig: inner dim {self.inner_dim} must be even")
        if self.depthwise_impl not in layers.DEPTHWISE_IMPLS:
            raise ValueError(f"SanaConfig: depthwise_impl={self.depthwise_impl!r}; expected one of "
                             f"{layers.DEPTHWISE_IMPLS}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def ff_hidden(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)  # GLUMBConv hidden_channels


def config_from_hf(hf: dict) -> SanaConfig:
    """SanaConfig from a diffusers `transformer/config.json` dict (unknown keys ignored; our policy fields
    dtype, scan_layers, ... may be given in the same dict)."""
    fields = {f.name for f in dataclasses.fields(SanaConfig)}
    return SanaConfig(**{k: v for k, v in dict(hf).items() if k in fields})


# ---------------------------------------------------------------------------------------------------------------
# Host-side constants.


def sincos_pos_embed(embed_dim: int, height: int, width: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """(height*width, embed_dim) float32: diffusers `get_2d_sincos_pos_embed(embed_dim, (height, width), base_size,
    interpolation_scale)`, tokens row-major.

    As diffusers, the first half of the channels encodes the column (w) coordinate and the second half the row,
    each as [sin, cos] of pos * 10000^(-k/(D/4)) in float64; positions are arange(n) / (n / base_size) / scale.
    """
    grid_h = np.arange(height, dtype=np.float32) / np.float32(height / base_size) / np.float32(interpolation_scale)
    grid_w = np.arange(width, dtype=np.float32) / np.float32(width / base_size) / np.float32(interpolation_scale)

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols = np.broadcast_to(grid_w[None, :], (height, width))
    rows = np.broadcast_to(grid_h[:, None], (height, width))
    return np.concatenate([one_d(embed_dim // 2, cols), one_d(embed_dim // 2, rows)], axis=1).astype(np.float32)


def mask_to_bias(encoder_attention_mask):
    """(B, N) keep-mask (1 = keep) -> (B, 1, 1, N) additive fp32 bias, as diffusers: (1 - mask) * -10000.

    A bias, not a boolean mask, on purpose: a row with every token masked then attends to all of them, as in
    diffusers, instead of producing NaN or zeros."""
    return ((1.0 - encoder_attention_mask.astype(jnp.float32)) * MASK_BIAS)[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# Modules. Names mirror the PyTorch attributes.


def _dense(cfg: SanaConfig, features: int, axes, use_bias: bool, name: str):
    return layers.Dense(features, use_bias=use_bias, kernel_axes=axes, dtype=layers.to_dtype(cfg.dtype),
                        param_dtype=layers.to_dtype(cfg.param_dtype), name=name)


def _rms(cfg: SanaConfig, eps: float, axis_name: str, name: str):
    return layers.RMSNorm(eps=eps, dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype),
                          axis_name=axis_name, name=name)


def _conv(cfg: SanaConfig, features: int, kernel: int, *, stride: int = 1, padding=0,
          axes=(None, None, None, "embed"), use_bias: bool = True, name: str):
    """torch Conv2d as flax nn.Conv (NHWC, kernel (kh, kw, I, O)) with logical axis names."""
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        use_bias=use_bias, dtype=layers.to_dtype(cfg.dtype),
        param_dtype=layers.to_dtype(cfg.param_dtype),
        kernel_init=layers.partitioned(layers.torch_linear_init(3), axes),
        bias_init=layers.partitioned(nn.initializers.zeros, axes[-1:]), name=name)


class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed`: Conv2d(k=p, stride=p) -> tokens; + the sincos table when interpolation_scale is set.

    The table is diffusers' non-persistent `pos_embed` buffer (base size sample_size // p), recomputed for the
    actual grid as diffusers does when the latent is not sample_size square; it is not a parameter.
    """

    cfg: SanaConfig

    @nn.compact
    def __call__(self, latents):  # (B, H, W, C) -> (B, H/p, W/p, D)
        cfg = self.cfg
        p = cfg.patch_size
        grid = _conv(cfg, cfg.inner_dim, p, stride=p, axes=(None, None, "patch", "embed"), name="proj")(latents)
        if cfg.interpolation_scale is None:
            return grid
        _, hp, wp, d = grid.shape
        pos = sincos_pos_embed(d, hp, wp, cfg.sample_size // p, cfg.interpolation_scale).reshape(hp, wp, d)
        return (grid.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(grid.dtype)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding(256 -> D)`: linear_1, SiLU, linear_2."""

    cfg: SanaConfig

    @nn.compact
    def __call__(self, freq):
        cfg = self.cfg
        x = _dense(cfg, cfg.inner_dim, ("time", "embed"), True, "linear_1")(freq)
        return _dense(cfg, cfg.inner_dim, ("mlp", "embed"), True, "linear_2")(nn.silu(x))


class CombinedTimestepEmbeddings(nn.Module):
    """diffusers `PixArtAlphaCombinedTimestepSizeEmbeddings` without additional conditions (torch `emb`)."""

    cfg: SanaConfig

    @nn.compact
    def __call__(self, timesteps):
        freq = timestep_sinusoid(timesteps, TIME_FREQ_CHANNELS).astype(layers.to_dtype(self.cfg.dtype))
        return TimestepEmbedding(self.cfg, name="timestep_embedder")(freq)


class AdaLayerNormSingle(nn.Module):
    """diffusers `AdaLayerNormSingle` (torch `time_embed`): returns (t6 (B, 6D), embedded_timestep (B, D))."""

    cfg: SanaConfig

    @nn.compact
    def __call__(self, timesteps):
        cfg = self.cfg
        embedded_timestep = CombinedTimestepEmbeddings(cfg, name="emb")(timesteps)
        t6 = _dense(cfg, 6 * cfg.inner_dim, ("embed", "mlp"), True, "linear")(nn.silu(embedded_timestep))
        return t6, embedded_timestep


class CaptionProjection(nn.Module):
    """diffusers `PixArtAlphaTextProjection(caption_channels -> D)`: linear_1, GELU(tanh), linear_2."""

    cfg: SanaConfig

    @nn.compact
    def __call__(self, captions):
        cfg = self.cfg
        x = _dense(cfg, cfg.inner_dim, ("cond", "mlp"), True, "linear_1")(captions)
        x = jax.nn.gelu(x, approximate=True)
        return _dense(cfg, cfg.inner_dim, ("mlp", "embed"), True, "linear_2")(x)


class LinearAttention(nn.Module):
    """diffusers `Attention` + `SanaLinearAttnProcessor2_0` (torch `attn1`): ReLU-kernel linear self-attention.

    Per head, out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + 1e-15) with q = ReLU(W_q x), k = ReLU(W_k x);
    no 1/sqrt(d) scale and no mask. Computed in float32 whatever the compute dtype (as diffusers), at full matmul
    precision: the sums run over every token. Optional q/k RMSNorm over all heads before the head split.
    """

    cfg: SanaConfig

    @nn.compact
    def __call__(self, x):  # (B, L, D) -> (B, L, D)
        cfg = self.cfg
        b, length, _ = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        q = _dense(cfg, cfg.inner_dim, ("embed", "heads"), cfg.attention_bias, "to_q")(x)
        k = _dense(cfg, cfg.inner_dim, ("embed", "heads"), cfg.attention_bias, "to_k")(x)
        v = _dense(cfg, cfg.inner_dim, ("embed", "heads"), cfg.attention_bias, "to_v")(x)
        if cfg.qk_norm is not None:
            q = _rms(cfg, QK_NORM_EPS, "heads", "norm_q")(q)
            k = _rms(cfg, QK_NORM_EPS, "heads", "norm_k")(k)
        split = lambda t: nn.with_logical_constraint(  # noqa: E731
            jax.nn.relu(t.astype(jnp.float32)).reshape(b, length, heads, head_dim), _HEADS)
        q, k = split(q), split(k)
        v = nn.with_logical_constraint(v.astype(jnp.float32).reshape(b, length, heads, head_dim), _HEADS)
        out = relu_linear_attention(q, k, v)
        out = out.reshape(b, length, cfg.inner_dim).astype(layers.to_dtype(cfg.dtype))
        return _dense(cfg, cfg.inner_dim, ("heads", "embed"), True, "to_out")(out)


def relu_linear_attention(q, k, v):
    """out[b, l, h] = (sum_j v_j (k_j . q_l)) / (sum_j k_j . q_l + eps), fp32 at HIGHEST precision; q, k, v (B, L,
    H, d). For a CPU program (`layers.target_platform`) the two contractions run as heads-major batched matmuls
    (explicit transposes): XLA:CPU runs the einsums' token-axis contraction ~2x slower at SANA's shapes."""
    hi = jax.lax.Precision.HIGHEST
    if layers.target_platform() == "cpu":
        kv = jnp.matmul(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), precision=hi)  # (B, H, d_k, d_v)
        qt = q.transpose(0, 2, 1, 3)  # (B, H, L, d_k)
        numerator = jnp.matmul(qt, kv, precision=hi)
        denominator = jnp.matmul(qt, jnp.sum(k, axis=1)[..., None], precision=hi)  # (B, H, L, 1)
        return (numerator / (denominator + LINEAR_ATTN_EPS)).transpose(0, 2, 1, 3)
    kv = jnp.einsum("blhd,blhe->bhde", k, v, precision=hi)  # (B, H, d_k, d_v)
    numerator = jnp.einsum("blhd,bhde->blhe", q, kv, precision=hi)
    denominator = jnp.einsum("blhd,bhd->blh", q, jnp.sum(k, axis=1), precision=hi)
    return numerator / (denominator[..., None] + LINEAR_ATTN_EPS)


class CrossAttention(nn.Module):
    """diffusers `Attention` + `SanaAttnProcessor2_0` (torch `attn2`): softmax attention to the caption tokens.

    Its own head layout (num_cross_attention_heads x cross_attention_head_dim, which need not multiply to D),
    q/k/v/out with bias, scale 1/sqrt(cross head dim), softmax in fp32, an additive (B, 1, 1, N) bias.
    """

    cfg: SanaConfig

    @nn.compact
    def __call__(self, x, context, bias):  # x (B, L, D), context (B, N, D), bias (B, 1, 1, N) fp32
        cfg = self.cfg
        b, length, _ = x.shape
        n = context.shape[1]
        heads, head_dim = cfg.num_cross_attention_heads, cfg.cross_attention_head_dim
        inner = cfg.cross_inner_dim
        q = _dense(cfg, inner, ("embed", "heads"), True, "to_q")(x)
        k = _dense(cfg, inner, ("embed", "heads"), True, "to_k")(context)
        v = _dense(cfg, inner, ("embed", "heads"), True, "to_v")(context)
        if cfg.qk_norm is not None:
            q = _rms(cfg, QK_NORM_EPS, "heads", "norm_q")(q)
            k = _rms(cfg, QK_NORM_EPS, "heads", "norm_k")(k)
        q = nn.with_logical_constraint(q.reshape(b, length, heads, head_dim), _HEADS)
        k = nn.with_logical_constraint(k.reshape(b, n, heads, head_dim), _HEADS)
        v = nn.with_logical_constraint(v.reshape(b, n, heads, head_dim), _HEADS)
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        out = jax.nn.dot_product_attention(f32(q), f32(k), f32(v), bias=bias, scale=head_dim ** -0.5)
        out = out.reshape(b, length, inner).astype(layers.to_dtype(cfg.dtype))
        return _dense(cfg, cfg.inner_dim, ("heads", "embed"), True, "to_out")(out)


class GLUMBConv(nn.Module):
    """diffusers `GLUMBConv(D, D, mlp_ratio, norm_type=None, residual_connection=False)` (torch `ff`), NHWC.

    conv_inverted 1x1 (D -> 2h) + SiLU, depthwise 3x3 conv_depth, split channels [x | gate], x * SiLU(gate),
    conv_point 1x1 (h -> D, no bias). The 1x1 convolutions are Dense layers over the channel axis.
    """

    cfg: SanaConfig

    @nn.compact
    def __call__(self, grid):  # (B, h, w, D) -> (B, h, w, D)
        cfg = self.cfg
        hidden = cfg.ff_hidden
        x = _dense(cfg, 2 * hidden, ("embed", "mlp"), True, "conv_inverted")(grid)
        x = nn.with_logical_constraint(nn.silu(x), _GRID_MLP)
        x = layers.DepthwiseConv(3, padding=1, impl=cfg.depthwise_impl, axis_name="mlp",
                                 dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype),
                                 name="conv_depth")(x)
        x, gate = x[..., :hidden], x[..., hidden:]
        x = nn.with_logical_constraint(x * nn.silu(gate), _GRID_MLP)
        return _dense(cfg, cfg.inner_dim, ("mlp", "embed"), False, "conv_point")(x)


class SanaTransformerBlock(nn.Module):
    """diffusers `SanaTransformerBlock` on the (B, H/p, W/p, D) token grid. Scan-friendly: returns (grid, None).

    Modulation rows of scale_shift_table + t6: [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp].
    Self-attention is pre-normed (LayerNorm without affine), modulated and gated; cross-attention has no norm,
    no modulation and no gate; the Mix-FFN is pre-normed (norm2, affine iff norm_elementwise_affine), modulated
    and gated.
    """

    cfg: SanaConfig

    @nn.compact
    def __call__(self, grid, t6, context, context_bias):
        cfg = self.cfg
        dt, pd = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        b, hp, wp, d = grid.shape
        table = self.param("scale_shift_table", layers.partitioned(nn.initializers.normal(d ** -0.5), (None, "norm")),
                           (6, d), pd)
        mod = table.astype(dt)[None] + t6.reshape(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))

        h = grid.reshape(b, hp * wp, d)
        norm_h = layers.LayerNorm(eps=cfg.norm_eps, use_scale=False, use_bias=False, dtype=dt, name="norm1")(h)
        norm_h = norm_h * (1 + scale_msa) + shift_msa
        h = h + gate_msa * LinearAttention(cfg, name="attn1")(norm_h)
        h = h + CrossAttention(cfg, name="attn2")(h, context, context_bias)
        h = nn.with_logical_constraint(h, _TOKENS)

        affine = cfg.norm_elementwise_affine
        norm_h = layers.LayerNorm(eps=cfg.norm_eps, use_scale=affine, use_bias=affine, dtype=dt, param_dtype=pd,
                                  name="norm2")(h)
        norm_h = norm_h * (1 + scale_mlp) + shift_mlp
        ff = GLUMBConv(cfg, name="ff")(norm_h.reshape(b, hp, wp, d)).reshape(b, hp * wp, d)
        h = h + gate_mlp * ff
        grid = nn.with_logical_constraint(h.astype(dt).reshape(b, hp, wp, d), _GRID)
        return grid, None


class SanaTransformer2DModel(nn.Module):
    """v = SANA(latents (B,H,W,C), timesteps (B,), encoder_hidden_states (B,N,caption_channels),
    encoder_attention_mask (B,N) 1 = keep, optional) -> (B,H,W,out_channels) float32."""

    cfg: SanaConfig

    def setup(self):
        cfg = self.cfg
        pd = layers.to_dtype(cfg.param_dtype)
        self.patch_embed = PatchEmbed(cfg)
        self.time_embed = AdaLayerNormSingle(cfg)
        self.caption_projection = CaptionProjection(cfg)
        self.caption_norm = _rms(cfg, CAPTION_NORM_EPS, "norm", "caption_norm")
        self.transformer_blocks = layers.repeat_blocks(
            SanaTransformerBlock, cfg.num_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat,
            remat_policy=cfg.remat_policy, n_broadcast=3)
        self.scale_shift_table = self.param(
            "scale_shift_table", layers.partitioned(nn.initializers.normal(cfg.inner_dim ** -0.5), (None, "norm")),
            (2, cfg.inner_dim), pd)
        self.norm_out = layers.LayerNorm(eps=NORM_OUT_EPS, use_scale=False, use_bias=False,
                                         dtype=layers.to_dtype(cfg.dtype))  # no parameters
        self.proj_out = _dense(cfg, cfg.patch_size ** 2 * cfg.output_channels, ("embed", "patch"), True, "proj_out")

    def _check(self, latents, encoder_hidden_states, encoder_attention_mask):
        cfg = self.cfg
        p = cfg.patch_size
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"SANA latents have shape {latents.shape}; expected (B, H, W, {cfg.in_channels}) "
                             "channels-last")
        if latents.shape[1] % p or latents.shape[2] % p:
            # diffusers silently drops the remainder rows/columns
            raise ValueError(f"SANA latent size {latents.shape[1]}x{latents.shape[2]} is not divisible by "
                             f"patch_size={p}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.caption_channels:
            raise ValueError(f"SANA encoder_hidden_states have shape {encoder_hidden_states.shape}; expected "
                             f"(B, N, {cfg.caption_channels})")
        if encoder_attention_mask is not None and encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(f"SANA encoder_attention_mask has shape {encoder_attention_mask.shape}; expected "
                             f"{encoder_hidden_states.shape[:2]} (B, N)")

    def __call__(self, latents, timesteps, encoder_hidden_states, encoder_attention_mask=None):
        cfg = self.cfg
        dt = layers.to_dtype(cfg.dtype)
        self._check(latents, encoder_hidden_states, encoder_attention_mask)
        b, height, width, _ = latents.shape
        p = cfg.patch_size

        grid = nn.with_logical_constraint(self.patch_embed(latents.astype(dt)), _GRID)  # (B, H/p, W/p, D)
        t6, embedded_timestep = self.time_embed(jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,)))
        context = self.caption_norm(self.caption_projection(encoder_hidden_states.astype(dt)))  # (B, N, D)
        context = nn.with_logical_constraint(context, _TOKENS)
        if encoder_attention_mask is None:
            context_bias = jnp.zeros((b, 1, 1, context.shape[1]), jnp.float32)
        else:
            context_bias = mask_to_bias(encoder_attention_mask)

        grid = layers.run_blocks(self.transformer_blocks, grid, t6, context, context_bias)

        # SanaModulatedNorm: rows [shift, scale] of scale_shift_table + embedded_timestep
        mod = self.scale_shift_table.astype(dt)[None] + embedded_timestep[:, None]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        h = grid.reshape(b, -1, cfg.inner_dim)
        h = self.norm_out(h) * (1 + scale) + shift
        out = self.proj_out(h).astype(jnp.float32)  # (B, L, p*p*C), features (ph, pw, C)
        c = cfg.output_channels
        out = out.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, height, width, c)


def count_params(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _init_args(cfg: SanaConfig):
    side = 2 * cfg.patch_size
    latents = jnp.zeros((1, side, side, cfg.in_channels), jnp.float32)
    captions = jnp.zeros((1, 1, cfg.caption_channels), jnp.float32)
    return (latents, jnp.zeros((1,), jnp.float32), captions), {}, None


registry.register(registry.Kind(
    name="sana", config_from_hf=config_from_hf, build=lambda cfg: SanaTransformer2DModel(cfg),
    init_args=_init_args, converter="sana", class_names=("SanaTransformer2DModel",)))

__all__ = [
    "SanaConfig", "SanaTransformer2DModel", "SanaTransformerBlock", "LinearAttention", "CrossAttention",
    "GLUMBConv", "AdaLayerNormSingle", "config_from_hf", "sincos_pos_embed", "mask_to_bias", "count_params",
]
