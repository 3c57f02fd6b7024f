"""BLIP3-o's diffusion transformer: Lumina-Next `NextDiT` with cross-attention to the LLM's query states.

Exactly the forward of the original `NextDiTCrossAttn`, i.e. a `PixArtAlphaTextProjection`
in front of diffusers' `LuminaNextDiT2DModel(cross_attention_dim=dim)`, with the 2-D RoPE table of
`get_2d_rotary_pos_embed_lumina`. Differences in *layout only* (no numerical difference):

- inputs and outputs are channels-last `(B, H, W, C)` (torch: `(B, C, H, W)`); patches are flattened as
  `(ph, pw, C)` on both ends (the converter permutes `patch_embedder.proj.weight` accordingly);
- the timestep is the raw scheduler timestep in [0, 1000] (high = more noise), fed to the sinusoid as is —
  the original passes `scheduler.timesteps` (σ·1000) straight to the model, not Lumina's 1 − t/1000;
- the blocks are stacked with `nn.scan` (params on a leading `layers` axis) and optionally rematerialised.

Parameter names mirror the PyTorch module tree (`attn1/to_q`, `norm1/linear`, `feed_forward/linear_1`, ...),
so `convert/dit.py` is a table of renames plus transposes.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry

ROPE_THETA = 10000.0  # get_1d_rotary_pos_embed default, linear_factor = ntk_factor = 1
TIME_FREQ_CHANNELS = 256  # LuminaCombinedTimestepCaptionEmbedding.frequency_embedding_size
MAX_TEMB_DIM = 1024  # the time/caption embedding width is min(dim, 1024)

# Activation layouts, named once (see sharding.LOGICAL_AXIS_RULES).
_TOKENS = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_MLP = ("activation_batch", "activation_length", "activation_mlp")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Field names and defaults of the original `NextDiTCrossAttnConfig` (8B release), plus our policy fields."""

    input_size: int = 8
    patch_size: int = 1
    in_channels: int = 1792
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: int | None = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    latent_embedding_size: int = 3584
    learn_sigma: bool = False
    # ours
    dtype: str = "float32"  # compute dtype of matmuls and the residual stream
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.learn_sigma:
            # as the original: `assert config.learn_sigma is False`
            raise ValueError("DiTConfig: learn_sigma=True is not supported (the original asserts it is False)")
        if self.dim % self.n_heads:
            raise ValueError(f"DiTConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 4:
            raise ValueError(f"DiTConfig: head_dim={self.dim // self.n_heads} must be divisible by 4 for the 2-D RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"DiTConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig: input_size={self.input_size} is not divisible by patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def temb_dim(self) -> int:
        return min(self.dim, MAX_TEMB_DIM)

    @property
    def out_channels(self) -> int:
        return self.in_channels  # learn_sigma is always False

    @property
    def ffn_dim(self) -> int:
        # diffusers: inner = int(4 * 2 * dim / 3); optionally * ffn_dim_multiplier; rounded up to multiple_of
        inner = int(4 * 2 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


_HF_IGNORED = {"_gradient_checkpointing", "architectures", "model_type", "transformers_version", "torch_dtype"}


def config_from_hf(kind: str, hf_config: dict) -> DiTConfig:
    """DiTConfig from the original's `NextDiTCrossAttnConfig` dict (`dit` sub-config of a BLIP3o checkpoint).

    Unknown keys are ignored (a PretrainedConfig dict carries many generic ones); our own policy fields
    (dtype, scan_layers, ...) may be given in the same dict.
    """
    if kind != "dit":
        raise ValueError(f"models/dit.py builds kind 'dit', not {kind!r}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    return DiTConfig(**{k: v for k, v in hf_config.items() if k in fields and k not in _HF_IGNORED})


def build(kind: str, cfg: DiTConfig) -> "DiT":
    if kind != "dit":
        raise ValueError(f"models/dit.py builds kind 'dit', not {kind!r}")
    return DiT(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Position and time encodings (host-side constants / tiny elementwise ops).


def rope_table(height: int, width: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (height*width, head_dim/2): `get_2d_rotary_pos_embed_lumina` sliced and flattened.

    Each axis gets a 1-D RoPE of dim head_dim/2 (frequencies theta^(-2k/(head_dim/2)), k < head_dim/4), and the
    complex entries interleave them (h_0, w_0, h_1, w_1, ...). Tokens are row-major (h, w). Computed with the same
    float32 operation order as diffusers, so the table is the one the original slices from its 384x384 grid.
    """
    axis_dim = head_dim // 2
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, axis_dim, 2, dtype=np.float32) / np.float32(axis_dim)))
    ang_h = np.arange(height, dtype=np.float32)[:, None] * freqs[None, :]  # (H, hd/4)
    ang_w = np.arange(width, dtype=np.float32)[:, None] * freqs[None, :]  # (W, hd/4)
    ang = np.stack(
        [np.broadcast_to(ang_h[:, None, :], (height, width, axis_dim // 2)),
         np.broadcast_to(ang_w[None, :, :], (height, width, axis_dim // 2))],
        axis=-1,
    ).reshape(height * width, axis_dim)  # interleaved (h_k, w_k)
    ang64 = ang.astype(np.float64)
    return np.cos(ang64).astype(np.float32), np.sin(ang64).astype(np.float32)


def apply_rope(x, cos, sin):
    """Complex rotation of consecutive channel pairs (2j, 2j+1) of each head (diffusers `use_real=False`).

    x: (B, L, H, D); cos/sin: (L, D/2). Computed in fp32 like torch's complex64 path.
    """
    in_dtype = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(in_dtype)


def timestep_sinusoid(t, channels: int = TIME_FREQ_CHANNELS, max_period: float = 10000.0):
    """diffusers `Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin] of t·freqs."""
    half = channels // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Modules. Names mirror the PyTorch attributes.


def _dense(cfg: DiTConfig, features: int, axes, use_bias: bool, name: str):
    return layers.Dense(
        features, use_bias=use_bias, kernel_axes=axes, dtype=layers.to_dtype(cfg.dtype),
        param_dtype=layers.to_dtype(cfg.param_dtype), name=name,
    )


class Attention(nn.Module):
    """diffusers `Attention` + `LuminaAttnProcessor2_0`, returning per-head outputs (B, L, H, Dh).

    q/k are normalised by one LayerNorm over all heads ("layer_norm_across_heads") *before* RoPE. Keys are rotated
    only when `key_rope` is given (self-attention); in cross-attention only queries are rotated (as the original).
    The output projection `to_out` (attn2 only) is applied by the block to the sum of both attentions.
    """

    cfg: DiTConfig
    has_out: bool = False

    def setup(self):
        cfg = self.cfg
        self.to_q = _dense(cfg, cfg.n_heads * cfg.head_dim, ("embed", "heads"), False, "to_q")
        self.to_k = _dense(cfg, cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), False, "to_k")
        self.to_v = _dense(cfg, cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), False, "to_v")
        if cfg.qk_norm:
            pd = layers.to_dtype(cfg.param_dtype)
            # torch Attention(eps=1e-5) for these LayerNorms, independent of norm_eps
            self.norm_q = layers.LayerNorm(eps=1e-5, dtype=jnp.float32, param_dtype=pd, axis_name="heads", name="norm_q")
            self.norm_k = layers.LayerNorm(eps=1e-5, dtype=jnp.float32, param_dtype=pd, axis_name="kv_heads", name="norm_k")
        if self.has_out:
            self.to_out = _dense(self.cfg, cfg.dim, ("heads", "embed"), False, "to_out")

    def __call__(self, x, context, query_rope, key_rope=None, mask=None):
        cfg = self.cfg
        b, lq, lk = x.shape[0], x.shape[1], context.shape[1]
        dt = layers.to_dtype(cfg.dtype)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if cfg.qk_norm:
            q, k = self.norm_q(q).astype(dt), self.norm_k(k).astype(dt)
        q = nn.with_logical_constraint(q.reshape(b, lq, cfg.n_heads, cfg.head_dim), _HEADS)
        k = nn.with_logical_constraint(k.reshape(b, lk, cfg.kv_heads, cfg.head_dim), _KV_HEADS)
        v = nn.with_logical_constraint(v.reshape(b, lk, cfg.kv_heads, cfg.head_dim), _KV_HEADS)
        q = apply_rope(q, *query_rope)
        if key_rope is not None:
            k = apply_rope(k, *key_rope)
        # GQA: kv head j serves query heads j*G .. j*G+G-1 in both diffusers (repeat per kv head) and jax
        out = layers.attention(q, k, v, mask=mask, scale=cfg.head_dim ** -0.5, implementation=cfg.attention_impl)
        return nn.with_logical_constraint(out, _HEADS)

    def out(self, x):
        return self.to_out(x)


class FeedForward(nn.Module):
    """LuminaFeedForward: linear_2(SiLU(linear_1 x) * linear_3 x), no biases, SiLU in fp32."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), False, "linear_1")(x)
        up = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), False, "linear_3")(x)
        hidden = jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up
        hidden = nn.with_logical_constraint(hidden, _MLP)
        return _dense(cfg, cfg.dim, ("mlp", "embed"), False, "linear_2")(hidden)


class RMSNormZero(nn.Module):
    """LuminaRMSNormZero: adaLN modulation from temb + the first RMSNorm (torch `norm1.linear`, `norm1.norm`)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, temb):
        cfg = self.cfg
        emb = _dense(cfg, 4 * cfg.dim, ("time", "embed"), True, "linear")(nn.silu(temb))
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(emb, 4, axis=-1)
        x = _rms(cfg, "norm")(x) * (1 + scale_msa[:, None, :])
        return x, gate_msa, scale_mlp, gate_mlp


def _rms(cfg: DiTConfig, name: str):
    return layers.RMSNorm(eps=cfg.norm_eps, dtype=layers.to_dtype(cfg.dtype),
                          param_dtype=layers.to_dtype(cfg.param_dtype), name=name)


class DiTBlock(nn.Module):
    """LuminaNextDiTBlock. Call signature is scan-friendly: returns (h, None)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, h, temb, cond, cond_mask, rope):
        cfg = self.cfg
        b, length, _ = h.shape
        residual = h
        norm_h, gate_msa, scale_mlp, gate_mlp = RMSNormZero(cfg, name="norm1")(h, temb)
        self_out = Attention(cfg, name="attn1")(norm_h, norm_h, rope, rope)
        norm_cond = _rms(cfg, "norm1_context")(cond)
        attn2 = Attention(cfg, has_out=True, name="attn2")
        attn_mask = None if cond_mask is None else cond_mask.astype(bool)[:, None, None, :]
        cross_out = attn2(norm_h, norm_cond, rope, None, mask=attn_mask)
        gate = self.param("gate", layers.partitioned(nn.initializers.zeros, ("norm",)), (cfg.n_heads,),
                          layers.to_dtype(cfg.param_dtype))
        cross_out = cross_out * jnp.tanh(gate).astype(cross_out.dtype)[None, None, :, None]
        mixed = (self_out + cross_out).reshape(b, length, cfg.n_heads * cfg.head_dim)
        attn_out = attn2.out(mixed)  # the one shared output projection (attn2.to_out.0)
        h = residual + jnp.tanh(gate_msa)[:, None, :] * _rms(cfg, "norm2")(attn_out)
        ffn_in = _rms(cfg, "ffn_norm1")(h) * (1 + scale_mlp[:, None, :])
        ffn_out = FeedForward(cfg, name="feed_forward")(ffn_in)
        h = h + jnp.tanh(gate_mlp)[:, None, :] * _rms(cfg, "ffn_norm2")(ffn_out)
        h = nn.with_logical_constraint(h.astype(layers.to_dtype(cfg.dtype)), _TOKENS)
        return h, None


class CaptionProjection(nn.Module):
    """PixArtAlphaTextProjection(D_llm -> dim): Linear, GELU(tanh), Linear."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, cond):
        cfg = self.cfg
        x = _dense(cfg, cfg.dim, ("cond", "mlp"), True, "linear_1")(cond)
        x = jax.nn.gelu(x, approximate=True)
        return _dense(cfg, cfg.dim, ("mlp", "embed"), True, "linear_2")(x)


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding(256 -> temb_dim): linear_1, SiLU, linear_2."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, freq):
        cfg = self.cfg
        x = _dense(cfg, cfg.temb_dim, ("time", "time"), True, "linear_1")(freq)
        return _dense(cfg, cfg.temb_dim, ("time", "time"), True, "linear_2")(nn.silu(x))


class PatchEmbed(nn.Module):
    """LuminaPatchEmbed's Linear over flattened patches (features ordered (ph, pw, C); see the converter)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, patches):
        return _dense(self.cfg, self.cfg.dim, ("patch", "embed"), True, "proj")(patches)


class TimeCaptionEmbed(nn.Module):
    """LuminaCombinedTimestepCaptionEmbedding: MLP(sinusoid(t)) + Linear(LayerNorm(masked mean of captions))."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, t, cond, cond_mask):
        cfg = self.cfg
        dt, pd = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        time_embed = TimestepEmbedding(cfg, name="timestep_embedder")(timestep_sinusoid(t).astype(dt))
        if cond_mask is None:
            pooled = jnp.mean(cond.astype(jnp.float32), axis=1)
        else:
            m = cond_mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(cond.astype(jnp.float32) * m, axis=1) / jnp.sum(m, axis=1)
        pooled = layers.LayerNorm(eps=1e-5, dtype=dt, param_dtype=pd, name="caption_embedder_norm")(pooled.astype(dt))
        caption_embed = _dense(cfg, cfg.temb_dim, ("embed", "time"), True, "caption_embedder_linear")(pooled)
        return time_embed + caption_embed


class FinalLayer(nn.Module):
    """LuminaLayerNormContinuous (torch `norm_out`): LayerNorm(no affine, eps 1e-6)·(1 + linear_1(SiLU temb)) -> linear_2."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, h, temb):
        cfg = self.cfg
        scale = _dense(cfg, cfg.dim, ("time", "embed"), True, "linear_1")(nn.silu(temb))
        x = layers.LayerNorm(eps=1e-6, use_scale=False, use_bias=False, dtype=layers.to_dtype(cfg.dtype), name="norm")(h)
        x = x * (1 + scale[:, None, :])
        return _dense(cfg, cfg.patch_size * cfg.patch_size * cfg.out_channels, ("embed", "patch"), True, "linear_2")(x)


class DiT(nn.Module):
    """v = DiT(x_t (B,H,W,C), t (B,) raw timesteps in [0,1000], cond (B,N,latent_embedding_size)) -> (B,H,W,C) fp32."""

    cfg: DiTConfig

    def setup(self):
        cfg = self.cfg
        self.patch_embedder = PatchEmbed(cfg)
        self.caption_projection = CaptionProjection(cfg)
        self.time_caption_embed = TimeCaptionEmbed(cfg)
        self.layers = layers.repeat_blocks(DiTBlock, cfg.n_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat,
                                           remat_policy=cfg.remat_policy, n_broadcast=4)
        self.norm_out = FinalLayer(cfg)

    def embed(self, x, t, cond, cond_mask=None):
        """Patch tokens, temb, projected condition and RoPE table: everything the blocks consume."""
        cfg = self.cfg
        dt = layers.to_dtype(cfg.dtype)
        _, height, width, channels = x.shape
        p = cfg.patch_size
        if height % p or width % p or channels != cfg.in_channels:
            raise ValueError(
                f"DiT input has shape {x.shape}; expected (B, H, W, {cfg.in_channels}) with H, W divisible by {p}"
            )
        if cond.shape[-1] != cfg.latent_embedding_size:
            raise ValueError(f"DiT condition has width {cond.shape[-1]}; expected {cfg.latent_embedding_size}")
        tokens = self.patch_embedder(layers.patchify(x.astype(dt), p))  # (B, L, dim)
        tokens = nn.with_logical_constraint(tokens, _TOKENS)
        cond_proj = self.caption_projection(cond.astype(dt))  # (B, N, dim)
        temb = self.time_caption_embed(t, cond_proj, cond_mask)  # (B, temb_dim)
        cos, sin = rope_table(height // p, width // p, cfg.head_dim)
        return tokens, temb, cond_proj, (jnp.asarray(cos), jnp.asarray(sin))

    def blocks(self, h, temb, cond_proj, cond_mask, rope):
        return layers.run_blocks(self.layers, h, temb, cond_proj, cond_mask, rope)

    def final(self, h, temb, height: int, width: int):
        out = self.norm_out(h, temb)
        return layers.unpatchify(out.astype(jnp.float32), self.cfg.patch_size, height, width)

    def __call__(self, x, t, cond, cond_mask=None):
        h, temb, cond_proj, rope = self.embed(x, t, cond, cond_mask)
        h = self.blocks(h, temb, cond_proj, cond_mask, rope)
        return self.final(h, temb, x.shape[1], x.shape[2])


class MSEHead(nn.Module):
    """The clip_mse generator (BLIP3-o's "CLIP + MSE" variant, used in place of the DiT): per-token
    Linear(D_llm -> dim) -> GELU(tanh) -> Linear(dim -> p·p·C), unpatchified to the target grid.

    Input (B, N, D_llm) with N == (input_size / patch_size)^2 tokens in row-major order; output (B, H, W, C) fp32.
    Params: `linear_1`, `linear_2` (kernel (in, out), logical names like the DiT's caption projection). The paper
    defines the variant; the original release has no code for it.
    """

    cfg: DiTConfig

    @nn.compact
    def __call__(self, cond, cond_mask=None):
        del cond_mask  # tokens map to grid cells one to one: nothing to pool or mask
        cfg = self.cfg
        side = cfg.input_size // cfg.patch_size
        if cond.shape[1] != side * side:
            raise ValueError(
                f"clip_mse head: {cond.shape[1]} query tokens cannot tile a {side}x{side} grid of patches"
            )
        dt, pd = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        x = layers.Dense(cfg.dim, kernel_axes=("cond", "mlp"), dtype=dt, param_dtype=pd, name="linear_1")(cond.astype(dt))
        x = jax.nn.gelu(x, approximate=True)
        out = cfg.patch_size * cfg.patch_size * cfg.in_channels
        x = layers.Dense(out, kernel_axes=("mlp", "patch"), dtype=dt, param_dtype=pd, name="linear_2")(x)
        return layers.unpatchify(x.astype(jnp.float32), cfg.patch_size, cfg.input_size, cfg.input_size)


def init_params(cfg: DiTConfig, rng, batch: int = 1, num_cond_tokens: int = 1):
    """Random params (unboxed) of the right shapes; PyTorch-default-like init, gates zero as the original."""
    model = DiT(cfg)
    x = jnp.zeros((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    cond = jnp.zeros((batch, num_cond_tokens, cfg.latent_embedding_size), jnp.float32)
    return nn.unbox(jax.jit(model.init)(rng, x, jnp.zeros((batch,), jnp.float32), cond)["params"])


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def flops_per_sample(cfg: DiTConfig, num_cond_tokens: int, height: int | None = None, width: int | None = None) -> dict:
    """Analytic forward FLOPs (multiply-add = 2) per sample; backward = 2x forward.

    Counts matmuls and attention score/value products; elementwise ops are ignored (< 1%).
    """
    height = height or cfg.input_size
    width = width or cfg.input_size
    length = (height // cfg.patch_size) * (width // cfg.patch_size)
    d, hd, kv, n = cfg.dim, cfg.head_dim, cfg.kv_heads * cfg.head_dim, num_cond_tokens
    t = cfg.temb_dim
    per_block = (
        2 * length * d * (d + 2 * kv)  # attn1 q, k, v
        + 2 * length * d * d + 2 * n * d * 2 * kv  # attn2 q (image tokens), k, v (cond tokens)
        + 2 * length * d * d  # shared to_out
        + 2 * 2 * length * n * d + 2 * 2 * length * length * d  # attention scores + values, both attentions
        + 3 * 2 * length * d * cfg.ffn_dim  # SwiGLU
        + 2 * t * 4 * d  # adaLN modulation
    )
    p2c = cfg.patch_size ** 2 * cfg.in_channels
    embed = (
        2 * length * p2c * d  # patch embed
        + 2 * n * (cfg.latent_embedding_size * d + d * d)  # caption projection
        + 2 * (TIME_FREQ_CHANNELS * t + t * t + d * t)  # time + caption embedders
    )
    final = 2 * t * d + 2 * length * d * p2c
    forward = cfg.n_layers * per_block + embed + final
    return {"forward": forward, "train_step": 3 * forward}


__all__ = [
    "DiTConfig", "DiT", "DiTBlock", "config_from_hf", "build", "rope_table", "apply_rope", "timestep_sinusoid",
    "MSEHead", "init_params", "count_params", "flops_per_sample",
]


registry.register(registry.Kind(
    name="dit",
    config_from_hf=lambda hf: config_from_hf("dit", hf),
    build=lambda cfg: build("dit", cfg),
    init_args=lambda cfg: ((jnp.zeros((1, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32),
                            jnp.zeros((1,), jnp.float32), jnp.zeros((1, 1, cfg.latent_embedding_size), jnp.float32)),
                           {}, None),
    converter="dit",
    init_group="dit",
))
