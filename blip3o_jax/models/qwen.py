"""Qwen decoder-only language models: Qwen2, the Qwen2.5-VL text model (M-RoPE) and Qwen3 (q/k RMSNorm).

One module covers the three families BLIP3-o builds on (Qwen2.5-VL-3B/7B text models; the Qwen3-SigLIP2 branch: any
Qwen3). Parameter names mirror transformers (`embed_tokens`, `layers/self_attn/q_proj`, `mlp/gate_proj`,
`input_layernorm`, `norm`, `lm_head`) so that `convert/qwen.py` is a table of renames and transposes.

Shapes: B batch, L new tokens, T cache slots, D hidden, H query heads, K key/value heads, Dh head_dim.

The KV cache is a plain pytree (see `init_cache`): each `forward(cache=...)` writes the chunk's keys/values at slots
[index, index + L) for the whole batch and attends to every slot that is valid and not in the future. The same
mechanism serves token-by-token decoding and prompt-prefix caching during training (a prompt is run once, then
the 64 latent queries are appended), so it is differentiable with respect to the new chunk's `inputs_embeds`.
"""
from __future__ import annotations

import dataclasses
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry

KINDS = ("qwen2", "qwen2_5_vl_text", "qwen3")


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = True  # q/k/v bias (Qwen2, Qwen2.5-VL); Qwen3 has none
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = True
    mrope_section: tuple[int, ...] | None = None  # Qwen2.5-VL: (t, h, w) split of head_dim/2 frequencies
    max_position_embeddings: int = 32768
    o_proj_bias: bool = False  # only a Qwen3 config with attention_bias=True has it (transformers' Qwen3Attention)
    initializer_range: float = 0.02
    # ours: dtype policy, layer stacking, rematerialisation, attention kernel
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "xla"  # "xla" (portable) | "cudnn" (GPU flash attention)
    # "in_out" (Flax's (in, out) kernels) | "out_in" (torch's (out, in) `weight`s, and a tied head read as such):
    # the decode layout `generation.unrolled` gives a CPU program (layers.matmul_out_in)
    kernel_layout: str = "in_out"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.kernel_layout not in layers.KERNEL_LAYOUTS:
            raise ValueError(f"kernel_layout {self.kernel_layout!r}: expected one of {layers.KERNEL_LAYOUTS}")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(
                    f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim/2 = {self.head_dim // 2}"
                )

    @property
    def num_params(self) -> int:
        D, H, K, Dh, F, V = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                             self.intermediate_size, self.vocab_size)
        attn = D * H * Dh * 2 + D * K * Dh * 2 + (H + 2 * K) * Dh * self.attention_bias + D * self.o_proj_bias
        per_layer = attn + 3 * D * F + 2 * D + 2 * Dh * self.qk_norm
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + D


def _rope_params(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope dict) from a transformers 5.x (`rope_parameters`) or 4.x (`rope_theta`, `rope_scaling`)
    config."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0 if "mrope_section" in rope else 10_000.0))
    return float(theta), rope


def config_from_hf(kind: str, hf: dict) -> QwenConfig:
    """QwenConfig from a transformers config dict of `kind` ("qwen2", "qwen2_5_vl_text" or "qwen3").

    For "qwen2_5_vl_text" a full Qwen2.5-VL config is accepted too: its `text_config` is read (in transformers 4.x
    checkpoints the text fields sit at the top level), `tie_word_embeddings` from the top level.
    """
    if kind not in KINDS:
        raise ValueError(f"qwen.config_from_hf: unknown kind {kind!r}; expected one of {KINDS}")
    hf = dict(hf)
    if kind == "qwen2_5_vl_text" and hf.get("model_type") == "qwen2_5_vl":
        outer = hf
        hf = dict(outer.get("text_config") or outer)
        for key in ("tie_word_embeddings", "rope_scaling", "rope_parameters", "rope_theta"):
            if key in outer and key not in hf:
                hf[key] = outer[key]
        if outer.get("tie_word_embeddings"):
            hf["tie_word_embeddings"] = True
    theta, rope = _rope_params(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope", None):
        raise ValueError(f"qwen.config_from_hf: rope type {rope_type!r} is not supported (only default RoPE / M-RoPE)")
    if hf.get("use_sliding_window"):
        raise ValueError("qwen.config_from_hf: use_sliding_window=True is not supported (no released Qwen model uses it)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"qwen.config_from_hf: hidden_act {hf['hidden_act']!r} is not supported (expected silu)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    common = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    if kind == "qwen2":
        # transformers' Qwen2Attention: q/k/v bias always, o_proj never; head_dim if given, else hidden/heads
        return QwenConfig(**common, head_dim=int(hf.get("head_dim") or hidden // heads), attention_bias=True)
    if kind == "qwen2_5_vl_text":
        # Qwen2_5_VLAttention always uses hidden/heads (it ignores any head_dim field)
        section = rope.get("mrope_section", (16, 24, 24))
        return QwenConfig(**common, head_dim=hidden // heads, attention_bias=True, mrope_section=tuple(section))
    bias = bool(hf.get("attention_bias", False))
    return QwenConfig(
        **common, head_dim=int(hf.get("head_dim") or hidden // heads), attention_bias=bias, o_proj_bias=bias, qk_norm=True
    )


def from_config_dict(model_cfg) -> tuple[str, QwenConfig]:
    """(kind, QwenConfig) from a `configs/qwen_*.py` model entry: `kind`, `hf` (transformers fields), `policy` (ours).

    The policy is kept apart from the transformers fields on purpose: a HF config.json has its own `dtype` key (the
    storage dtype), which must not silently become our compute dtype.
    """
    get = model_cfg.get if hasattr(model_cfg, "get") else model_cfg.__getitem__
    kind = get("kind")
    hf = get("hf")
    hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    policy = get("policy") or {}
    policy = policy.to_dict() if hasattr(policy, "to_dict") else dict(policy)
    return kind, dataclasses.replace(config_from_hf(kind, hf), **policy)


def config_to_hf(kind: str, cfg: QwenConfig) -> dict:
    """A transformers config dict (model_type `kind`) for our config: builds reference models in tests/tools."""
    hf = dict(
        model_type=kind,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
        initializer_range=cfg.initializer_range,
        use_sliding_window=False,
    )
    if kind == "qwen2_5_vl_text":
        hf["rope_parameters"] = {"rope_type": "default", "type": "mrope", "rope_theta": cfg.rope_theta,
                                 "mrope_section": list(cfg.mrope_section)}
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if kind == "qwen3":
        hf["head_dim"] = cfg.head_dim
        hf["attention_bias"] = cfg.attention_bias
    return hf


# ----------------------------------------------------------------------------------------------------------------
# positions, RoPE, masks


def default_positions(attention_mask):
    """HF generate's positions: cumsum(mask) - 1, clipped at 0, so left padding starts real tokens at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_cos_sin(positions, cfg: QwenConfig):
    """cos, sin of shape (B, L, Dh) in fp32, laid out for `rotate_half` (transformers' convention).

    positions: (B, L), or (3, B, L) (temporal, height, width) for M-RoPE, where frequency j of the Dh/2 takes its
    angle from the section of `mrope_section` it falls in (as `Qwen2_5_VLRotaryEmbedding.recomposition_frequencies`).
    A (B, L) input to an M-RoPE model is used for all three rows, as transformers does for text.
    """
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    positions = positions.astype(jnp.float32)
    if cfg.mrope_section is None:
        if positions.ndim != 2:
            raise ValueError(f"positions must be (B, L) for a model without M-RoPE, got shape {positions.shape}")
        freqs = positions[..., None] * inv_freq  # (B, L, Dh/2)
    else:
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        if positions.ndim != 3 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be (B, L) or (3, B, L), got shape {positions.shape}")
        freqs3 = positions[..., None] * inv_freq  # (3, B, L, Dh/2)
        section_of = np.repeat(np.arange(3), cfg.mrope_section)  # which of t/h/w each frequency reads
        freqs = jnp.where(section_of == 0, freqs3[0], jnp.where(section_of == 1, freqs3[1], freqs3[2]))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: (B, L, heads, Dh); cos/sin: (B, L, Dh). Rotation in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def heads_major_cache(cfg: QwenConfig) -> bool:
    """Whether `init_cache` lays each layer's k/v out heads-major, k (B, K, Dh, T), v (B, K, T, Dh): unrolled
    layers in a CPU program, where attention's batched matmuls then read the cache as it is instead of transposing
    all of it every step."""
    return not cfg.scan_layers and layers.target_platform() == "cpu"


def init_cache(cfg: QwenConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: k/v (n_layers, B, T, K, Dh), mask (B, T) of valid key slots, index of the next slot.

    With `scan_layers=False` k/v are tuples of one buffer per layer, so that a decode step writes its token into
    each in place and attends to it as is (slicing a layer out of a stacked cache and stacking the layers back
    would copy the whole cache every step); in a CPU program k's buffers are (B, K, Dh, T) and v's (B, K, T, Dh)
    (`heads_major_cache`). Build it for the config of the module that runs it."""
    n, K, Dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if cfg.scan_layers:
        k, v = (jnp.zeros((n, batch, max_len, K, Dh), dtype) for _ in range(2))
    else:
        k_shape, v_shape = (((batch, K, Dh, max_len), (batch, K, max_len, Dh)) if heads_major_cache(cfg)
                            else ((batch, max_len, K, Dh),) * 2)
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(n)) for shape in (k_shape, v_shape))
    return {"k": k, "v": v, "mask": jnp.zeros((batch, max_len), jnp.bool_), "index": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------------------------------------------
# modules


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


class QwenAttention(nn.Module):
    cfg: QwenConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        cfg = self.cfg
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        B, L, _ = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = functools.partial(
            layers.Dense, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), kernel_layout=cfg.kernel_layout,
        )
        q = dense(H * Dh, use_bias=cfg.attention_bias, kernel_axes=("embed", "heads"), name="q_proj")(x)
        k = dense(K * Dh, use_bias=cfg.attention_bias, kernel_axes=("embed", "kv_heads"), name="k_proj")(x)
        v = dense(K * Dh, use_bias=cfg.attention_bias, kernel_axes=("embed", "kv_heads"), name="v_proj")(x)
        q, k, v = q.reshape(B, L, H, Dh), k.reshape(B, L, K, Dh), v.reshape(B, L, K, Dh)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            norm = functools.partial(layers.RMSNorm, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        new_cache = None
        if kv_cache is not None and heads_major_cache(cfg):
            # k (B, K, Dh, T), v (B, K, T, Dh): the operands of attention's two batched matmuls as they are (the
            # transposes back cancel layers.attention's own on a CPU)
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype),
                                                   (0, 0, 0, cache_index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                                   (0, 0, cache_index, 0))
            new_cache = (k_cache, v_cache)
            k, v = k_cache.transpose(0, 3, 1, 2).astype(dtype), v_cache.transpose(0, 2, 1, 3).astype(dtype)
        elif kv_cache is not None:
            k_cache, v_cache = kv_cache  # (B, T, K, Dh) each
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k_cache, v_cache)
            k, v = k_cache.astype(dtype), v_cache.astype(dtype)
        k = _constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        v = _constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        # the decoder is causal: a key-padding-only mask (what `forward` gives the Pallas kernel without a cache)
        # comes with the causality as a flag, which the kernel applies per tile instead of reading a dense bias
        is_causal = kv_cache is None and mask is not None and mask.shape[-2] == 1 and L > 1
        out = layers.attention(q, k, v, mask=mask, is_causal=is_causal, scale=Dh**-0.5,
                               implementation=cfg.attention_impl)
        out = dense(cfg.hidden_size, use_bias=cfg.o_proj_bias, kernel_axes=("heads", "embed"), name="o_proj")(
            out.reshape(B, L, H * Dh)
        )
        return out, new_cache


class QwenMLP(nn.Module):
    cfg: QwenConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = functools.partial(
            layers.Dense, use_bias=False, dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype),
            kernel_init=nn.initializers.normal(cfg.initializer_range), kernel_layout=cfg.kernel_layout,
        )
        gate = dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="gate_proj")(x)
        up = dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="up_proj")(x)
        hidden = _constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), name="down_proj")(hidden)


class QwenDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, updated (k, v) cache or None)."""

    cfg: QwenConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_cache, cache_index):
        cfg = self.cfg
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        norm = functools.partial(layers.RMSNorm, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        attn_out, kv_cache = QwenAttention(cfg, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, mask, kv_cache, cache_index
        )
        x = x + attn_out
        x = x + QwenMLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, kv_cache


# per-layer args of QwenDecoderLayer after x: cos, sin, mask shared; the (k, v) cache sliced per layer; cache_index
_LAYER_IN_AXES = (nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast)


class QwenForCausalLM(nn.Module):
    cfg: QwenConfig

    def setup(self):
        cfg = self.cfg
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
        )
        self.layers = layers.repeat_blocks(
            QwenDecoderLayer, cfg.num_hidden_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat,
            remat_policy=cfg.remat_policy, in_axes=_LAYER_IN_AXES)
        self.norm = layers.RMSNorm(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Dense(
                cfg.vocab_size, use_bias=False, kernel_axes=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                kernel_init=nn.initializers.normal(cfg.initializer_range), kernel_layout=cfg.kernel_layout,
            )

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Logits (B, L, vocab) in fp32."""
        _, logits, _ = self.forward(input_ids, attention_mask=attention_mask, positions=positions)
        return logits

    def embed(self, input_ids):
        """Token embeddings (B, L, D) in the compute dtype."""
        return self.embed_tokens(input_ids)

    def lm_logits(self, hidden):
        """fp32 logits of final-norm hidden states (tied: against the input embedding)."""
        if self.cfg.tie_word_embeddings and self.cfg.kernel_layout == "out_in":
            # the (vocab, hidden) embedding is the head's weight in torch's layout already
            dtype = layers.to_dtype(self.cfg.dtype)
            logits = layers.matmul_out_in(hidden.reshape(-1, hidden.shape[-1]).astype(dtype),
                                          self.embed_tokens.embedding.astype(dtype))
            logits = logits.reshape(*hidden.shape[:-1], -1)
        elif self.cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return _constrain(logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                compute_logits=True, rope=None):
        """Runs the decoder on a chunk of L tokens (or embeddings).

        attention_mask: (B, L) 1 = real token, 0 = padding (masked as key; causal always).
        positions: (B, L) or (3, B, L) (M-RoPE); default cumsum(mask) - 1 over the valid keys seen so far
          (the prompt alone without a cache; cache slots plus the chunk with one).
        cache: from `init_cache`; the chunk is written at slots [index, index + L) and attends to every valid slot
          up to its own. Returns (hidden (B, L, D) after the final norm, fp32 logits or None, updated cache or None).
        rope: (cos, sin) of the chunk's positions, each (B, L, Dh) as `rope_cos_sin` gives them, instead of computing
          them from `positions` here (a decode loop computes every step's once, before the loop: XLA fuses cos/sin
          into each of their consumers, i.e. evaluates them per layer and per head).
        """
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward: pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(layers.to_dtype(cfg.dtype))
        B, L, _ = x.shape
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        chunk_valid = jnp.ones((B, L), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        if cache is None:
            key_valid = chunk_valid
            causal = jnp.tril(jnp.ones((L, L), jnp.bool_))
            cache_index = None
        else:
            cache_index = cache["index"]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], chunk_valid, (0, cache_index))
            T = key_valid.shape[1]
            causal = jnp.arange(T)[None, :] <= cache_index + jnp.arange(L)[:, None]  # (L, T) by slot
        mask = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, L, T)
        if cache is None and cfg.attention_impl == "pallas":  # causality as the kernel's flag (QwenAttention)
            mask = key_valid[:, None, None, :]  # (B, 1, 1, L)
        if rope is not None:
            cos, sin = rope
        else:
            if positions is None:
                positions = default_positions(key_valid)
                if cache is not None:
                    positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, L, axis=1)
            cos, sin = rope_cos_sin(positions, cfg)

        kv = None if cache is None else (cache["k"], cache["v"])  # stacked, or one buffer per layer (init_cache)
        if kv is not None and isinstance(self.layers, (list, tuple)):  # one cache buffer per layer (init_cache)
            if not isinstance(kv[0], (list, tuple)) or len(kv[0]) != len(self.layers):
                raise ValueError("forward: a cache from init_cache of a config with the same scan_layers "
                                 f"({cfg.scan_layers}) is needed")
            ks, vs = [], []
            for layer, k_i, v_i in zip(self.layers, *kv):
                x, (k_i, v_i) = layer(x, cos, sin, mask, (k_i, v_i), cache_index)
                ks.append(k_i)
                vs.append(v_i)
            kv = (tuple(ks), tuple(vs))
        else:
            x, kv = layers.run_blocks(self.layers, x, cos, sin, mask, kv, cache_index, in_axes=_LAYER_IN_AXES,
                                      with_outputs=True)
        hidden = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "mask": key_valid, "index": cache_index + L}
        logits = self.lm_logits(hidden) if compute_logits else None
        return hidden, logits, new_cache


def build(kind: str, cfg: QwenConfig) -> QwenForCausalLM:
    if kind not in KINDS:
        raise ValueError(f"qwen.build: unknown kind {kind!r}; expected one of {KINDS}")
    if (kind == "qwen2_5_vl_text") != (cfg.mrope_section is not None):
        raise ValueError(f"qwen.build: kind {kind!r} and mrope_section {cfg.mrope_section} disagree")
    return QwenForCausalLM(cfg)


def count_flops(cfg: QwenConfig, batch: int, new_tokens: int, context: int, logits_tokens: int | None = None) -> float:
    """Analytic forward FLOPs (2 per multiply-add) for `new_tokens` per row attending to `context` keys."""
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    per_token = 2 * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F)
    attn = 2 * 2 * H * Dh * context  # q.k and p.v
    tokens = batch * new_tokens
    head = 2 * D * cfg.vocab_size * (tokens if logits_tokens is None else logits_tokens)
    return cfg.num_hidden_layers * tokens * (per_token + attn) + head



for _kind, _model_type in (("qwen2", "qwen2"), ("qwen2_5_vl_text", "qwen2_5_vl_text"), ("qwen3", "qwen3")):
    registry.register(registry.Kind(
        name=_kind,
        config_from_hf=functools.partial(config_from_hf, _kind),
        build=functools.partial(build, _kind),
        init_args=lambda cfg: ((jnp.zeros((1, 1), jnp.int32),), {}, None),
        converter="qwen",
        model_types=(_model_type,),
        init_group="backbone",
    ))
