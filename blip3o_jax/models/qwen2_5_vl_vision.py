"""Qwen2.5-VL vision tower (the understanding ViT, `model.visual`).

Same inputs and outputs as transformers' `Qwen2_5_VisionTransformerPretrainedModel`: flattened patches
(N, C·T·P·P) in the image processor's order plus `grid_thw` (n_images, 3) -> merged tokens
(N / merge², out_hidden_size) in the same order as transformers returns them.

Everything that depends on the image sizes (the window permutation, the windows, the per-image segments of the
full-attention blocks, the 2-D RoPE positions) is computed on the host in NumPy by `vision_layout(grid_thw, cfg)`
and passed to the jitted forward as integer arrays, so shapes inside jit are static: one compilation per
(number of tokens, number of windows), which `vision_layout(..., num_tokens=, num_windows=)` can pad to buckets.

Window attention runs on (windows, tokens per window) blocks gathered from the window-ordered sequence, so its
cost is O(N · window) instead of O(N²); the full-attention blocks (`fullatt_block_indexes`) attend within each
image frame through a segment mask. Both share one scanned block; a per-layer flag picks the branch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels: 112 / 14 / 2 = 4x4 merged units (8x8 patches) per window
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # hard-coded in transformers (blocks and merger)
    tokens_per_second: int = 2  # video only; kept so the full model's config round-trips
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # None/"xla" | "cudnn"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merged units along each side of a window (transformers' `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def tokens_per_window(self) -> int:
        return self.window_units**2 * self.merge_unit


def config_from_hf(kind: str, hf: Mapping[str, Any]) -> Qwen2_5_VLVisionConfig:
    """From a `Qwen2_5_VLVisionConfig` dict, or a full `qwen2_5_vl` config dict (its `vision_config`)."""
    if kind != "qwen2_5_vl_vision":
        raise ValueError(f"qwen2_5_vl_vision.config_from_hf: unknown kind {kind!r}")
    hf = dict(hf)
    if "vision_config" in hf:
        hf = dict(hf["vision_config"])
    rope = hf.get("rope_parameters") or {}
    fullatt = hf.get("fullatt_block_indexes", Qwen2_5_VLVisionConfig.fullatt_block_indexes)
    cfg = Qwen2_5_VLVisionConfig(
        depth=int(hf.get("depth", hf.get("num_hidden_layers", 32))),
        hidden_size=int(hf.get("hidden_size", 1280)),
        intermediate_size=int(hf.get("intermediate_size", 3420)),
        num_heads=int(hf.get("num_heads", hf.get("num_attention_heads", 16))),
        # original Qwen2.5-VL config.json files spell it `in_chans`
        in_channels=int(hf.get("in_channels", hf.get("in_chans", 3))),
        patch_size=int(hf.get("patch_size", hf.get("spatial_patch_size", 14))),
        temporal_patch_size=int(hf.get("temporal_patch_size", 2)),
        spatial_merge_size=int(hf.get("spatial_merge_size", 2)),
        window_size=int(hf.get("window_size", 112)),
        out_hidden_size=int(hf.get("out_hidden_size", 3584)),
        fullatt_block_indexes=tuple(int(i) for i in fullatt),
        hidden_act=str(hf.get("hidden_act", "silu")),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tokens_per_second=int(hf.get("tokens_per_second", 2)),
    )
    validate(cfg)
    return cfg


def validate(cfg: Qwen2_5_VLVisionConfig) -> None:
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
        raise ValueError(
            f"qwen2_5_vl_vision: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a head_dim "
            "divisible by 4 (2-D RoPE splits half of it between rows and columns)"
        )
    if cfg.window_units < 1:
        raise ValueError(
            f"qwen2_5_vl_vision: window_size {cfg.window_size} px is smaller than one merged unit "
            f"({cfg.spatial_merge_size * cfg.patch_size} px)"
        )
    bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
    if bad:
        raise ValueError(f"qwen2_5_vl_vision: fullatt_block_indexes {bad} are outside 0..{cfg.depth - 1}")


# ----------------------------------------------------------------------------------------------------------------
# Host-side layout: everything that depends on grid_thw, as NumPy arrays (static shapes inside jit).


def _window_index(grid_thw: np.ndarray, cfg: Qwen2_5_VLVisionConfig) -> tuple[np.ndarray, list[int]]:
    """transformers' `get_vision_window_index`: merged-unit permutation into window order and the number of
    merged units in each non-empty window (in order)."""
    m, ws = cfg.spatial_merge_size, cfg.window_units
    window_index, window_units, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        # as upstream: pad = ws - n % ws (a full extra window row when n % ws == 0; it stays empty)
        pad_h, pad_w = ws - lh % ws, ws - lw % ws
        nwh, nww = (lh + pad_h) // ws, (lw + pad_w) // ws
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nwh, ws, nww, ws).transpose(0, 1, 3, 2, 4).reshape(t, nwh * nww, ws * ws)
        counts = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        window_units.extend(int(c) for c in counts if c > 0)  # empty windows vanish (unique_consecutive upstream)
        offset += t * lh * lw
    return np.concatenate(window_index).astype(np.int64), window_units


def _rope_positions(grid_thw: np.ndarray, m: int) -> np.ndarray:
    """transformers' `get_vision_position_ids`: (N, 2) (row, col) of every patch, in merge-block order."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out, 0)


def check_grid(grid_thw, cfg: Qwen2_5_VLVisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape (n_images, 3), got {grid.shape}")
    m = cfg.spatial_merge_size
    for t, h, w in grid.tolist():
        if t < 1 or h < m or w < m or h % m or w % m:
            raise ValueError(
                f"grid_thw row {(t, h, w)}: t must be >= 1 and h, w positive multiples of spatial_merge_size {m}"
            )
    return grid


def num_patches(grid_thw) -> int:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return int(np.prod(grid, axis=-1).sum())


def vision_layout(
    grid_thw,
    cfg: Qwen2_5_VLVisionConfig,
    *,
    num_tokens: int | None = None,
    num_windows: int | None = None,
) -> dict[str, np.ndarray]:
    """Index arrays that drive the jitted tower for one `grid_thw` (several images are packed, as upstream).

    `num_tokens` / `num_windows` pad to a bucket so that differently sized images share one compilation: padded
    patch rows (zeros) are appended after the real ones, sit in their own windows and segment, and their merged
    outputs come last (drop them). Returns int32/bool arrays:
      token_order   (N,)    original patch row feeding each window-order slot
      positions     (N, 2)  (row, col) RoPE positions in window order
      segments      (N,)    frame id of each window-order token (full-attention blocks attend within it)
      window_tokens (W, S)  window-order slot in each window position (windows of up to S tokens)
      window_valid  (W, S)  which window positions hold a token
      window_slot   (N,)    flat (W*S) position of each window-order token
      merged_order  (N/u,)  window-order merged unit giving each output row (the inverse window permutation)
    """
    grid = check_grid(grid_thw, cfg)
    unit, per_window = cfg.merge_unit, cfg.tokens_per_window
    n_real = num_patches(grid)
    unit_index, window_units = _window_index(grid, cfg)
    n_tokens = n_real if num_tokens is None else int(num_tokens)
    if n_tokens < n_real or n_tokens % unit:
        raise ValueError(
            f"num_tokens {num_tokens} must be >= the {n_real} patches of grid_thw {grid.tolist()} and a multiple "
            f"of {unit} (spatial_merge_size²)"
        )
    n_pad = n_tokens - n_real
    # pad tokens fill whole merged units in windows of their own (never mixed with real tokens)
    pad_units = n_pad // unit
    window_lengths = [u * unit for u in window_units]
    window_lengths += [per_window] * (pad_units * unit // per_window)
    if (pad_units * unit) % per_window:
        window_lengths.append((pad_units * unit) % per_window)
    n_windows = len(window_lengths) if num_windows is None else int(num_windows)
    if n_windows < len(window_lengths):
        raise ValueError(
            f"num_windows {num_windows} is smaller than the {len(window_lengths)} windows that grid_thw "
            f"{grid.tolist()} (with {n_pad} padding tokens) needs"
        )

    n_units_real = n_real // unit
    unit_order = np.concatenate([unit_index, np.arange(n_units_real, n_units_real + pad_units)])
    token_order = (unit_order[:, None] * unit + np.arange(unit)).reshape(-1)

    positions = np.zeros((n_tokens, 2), np.int64)
    positions[:n_real] = _rope_positions(grid, cfg.spatial_merge_size)
    positions = positions[token_order]

    frames = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    segments = np.concatenate([frames, np.full(n_pad, -1)])[token_order]

    window_tokens = np.zeros((n_windows, per_window), np.int64)
    window_valid = np.zeros((n_windows, per_window), bool)
    window_slot = np.zeros(n_tokens, np.int64)
    start = 0
    for wi, length in enumerate(window_lengths):
        window_tokens[wi, :length] = np.arange(start, start + length)
        window_valid[wi, :length] = True
        window_slot[start:start + length] = wi * per_window + np.arange(length)
        start += length
    assert start == n_tokens

    return {
        "token_order": token_order.astype(np.int32),
        "positions": positions.astype(np.int32),
        "segments": segments.astype(np.int32),
        "window_tokens": window_tokens.astype(np.int32),
        "window_valid": window_valid,
        "window_slot": window_slot.astype(np.int32),
        "merged_order": np.argsort(unit_order, kind="stable").astype(np.int32),
    }


# ----------------------------------------------------------------------------------------------------------------
# Modules

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": layers.gelu_exact,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def rope_tables(positions, cfg: Qwen2_5_VLVisionConfig):
    """cos, sin (N, head_dim) in fp32 from (N, 2) (row, col) positions, as Qwen2_5_VLVisionRotaryEmbedding:
    head_dim/4 frequencies theta^(-2k/(head_dim/2)); angles [rows | cols] then the whole half repeated twice."""
    spatial_dim = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim/4)
    freqs = freqs.reshape(freqs.shape[0], -1)  # (N, head_dim/2) = [row freqs | col freqs]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x (N, H, D); rotation in fp32, result in x's dtype (apply_rotary_pos_emb_vision)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, None, :] + rotate_half(x32) * sin[:, None, :]
    return out.astype(x.dtype)


class VisionAttention(nn.Module):
    cfg: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x, is_full, cos, sin, layout):
        cfg = self.cfg
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        n = x.shape[0]
        qkv = layers.Dense(3 * cfg.hidden_size, kernel_axes=("embed", "heads"), dtype=dtype,
                           param_dtype=param_dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, cfg.num_heads, cfg.head_dim), 1, 0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = lambda q_, k_, v_, mask: layers.attention(  # noqa: E731
            q_, k_, v_, mask=mask, scale=cfg.head_dim**-0.5, implementation=cfg.attention_implementation)

        def full(q, k, v):
            # blocks in fullatt_block_indexes: every token sees its own image frame (cu_seqlens upstream)
            seg = layout["segments"]
            mask = (seg[:, None] == seg[None, :])[None, None]
            return attend(q[None], k[None], v[None], mask)[0]

        def windowed(q, k, v):
            # (W, S, H, D) blocks gathered from the window-ordered sequence (cu_window_seqlens upstream)
            idx, valid = layout["window_tokens"], layout["window_valid"]
            w, s = idx.shape
            gather = lambda t: jnp.take(t, idx.reshape(-1), axis=0).reshape(w, s, *t.shape[1:])  # noqa: E731
            # valid queries see the valid keys of their window; empty slots see everything (never all-masked)
            mask = (valid[:, None, :] | ~valid[:, :, None])[:, None]
            out = attend(gather(q), gather(k), gather(v), mask)
            return jnp.take(out.reshape(w * s, *out.shape[2:]), layout["window_slot"], axis=0)

        out = jax.lax.cond(is_full, full, windowed, q, k, v)
        out = out.reshape(n, cfg.hidden_size)
        return layers.Dense(cfg.hidden_size, kernel_axes=("heads", "embed"), dtype=dtype,
                            param_dtype=param_dtype, name="proj")(out)


class VisionMLP(nn.Module):
    cfg: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))
        act = ACTIVATIONS[cfg.hidden_act]
        gate = layers.Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = layers.Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="up_proj", **kw)(x)
        return layers.Dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), name="down_proj", **kw)(act(gate) * up)


class VisionBlock(nn.Module):
    """Pre-norm block: x += attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (Qwen2_5_VLVisionBlock)."""

    cfg: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x, is_full, cos, sin, layout):
        cfg = self.cfg
        kw = dict(eps=cfg.norm_eps, dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))
        x = x + VisionAttention(cfg, name="attn")(layers.RMSNorm(name="norm1", **kw)(x), is_full, cos, sin, layout)
        x = x + VisionMLP(cfg, name="mlp")(layers.RMSNorm(name="norm2", **kw)(x))
        return x, None


class PatchMerger(nn.Module):
    """RMSNorm -> concat merge² neighbours -> Linear -> GELU(exact) -> Linear (Qwen2_5_VLPatchMerger)."""

    cfg: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(dtype=layers.to_dtype(cfg.dtype), param_dtype=layers.to_dtype(cfg.param_dtype))
        width = cfg.hidden_size * cfg.merge_unit
        x = layers.RMSNorm(eps=cfg.norm_eps, name="ln_q", **kw)(x).reshape(-1, width)
        x = layers.Dense(width, kernel_axes=("embed", "mlp"), name="mlp_0", **kw)(x)
        x = layers.gelu_exact(x)
        return layers.Dense(cfg.out_hidden_size, kernel_axes=("mlp", "embed"), name="mlp_2", **kw)(x)


class Qwen2_5_VisionTransformer(nn.Module):
    """patches (N, patch_dim) + layout (from `vision_layout`) -> merged tokens (N / merge², out_hidden_size)."""

    cfg: Qwen2_5_VLVisionConfig

    @nn.compact
    def __call__(self, patches, layout):
        cfg = self.cfg
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        layout = {k: jnp.asarray(v) for k, v in layout.items()}
        # window order first: the patch embedding (Conv3d with kernel = stride = patch, i.e. a matmul) is per
        # token, so permuting its input equals permuting its output as upstream does
        x = jnp.take(patches, layout["token_order"], axis=0)
        x = layers.Dense(cfg.hidden_size, use_bias=False, kernel_axes=("patch", "embed"), dtype=dtype,
                         param_dtype=param_dtype, name="patch_embed")(x)
        cos, sin = rope_tables(layout["positions"], cfg)

        # one scanned block for both kinds: a per-layer flag (sliced by the scan) picks full or window attention
        in_axes = (0, nn.broadcast, nn.broadcast, nn.broadcast)
        blocks = layers.repeat_blocks(VisionBlock, cfg.depth, cfg, scan=True, remat=cfg.remat,
                                      remat_policy=cfg.remat_policy, in_axes=in_axes, name="blocks")
        is_full = np.isin(np.arange(cfg.depth), np.asarray(cfg.fullatt_block_indexes, np.int64))
        x = layers.run_blocks(blocks, x, jnp.asarray(is_full), cos, sin, layout, in_axes=in_axes)

        merged = PatchMerger(cfg, name="merger")(x)  # (N / merge², out) in window order
        return jnp.take(merged, layout["merged_order"], axis=0)


def build(kind: str, cfg: Qwen2_5_VLVisionConfig) -> nn.Module:
    if kind != "qwen2_5_vl_vision":
        raise ValueError(f"qwen2_5_vl_vision.build: unknown kind {kind!r}")
    validate(cfg)
    return Qwen2_5_VisionTransformer(cfg)


def init_args(cfg: Qwen2_5_VLVisionConfig, grid_thw=((1, 4, 4),)):
    """Example (patches, layout) for `module.init` / `abstract_shapes` (param shapes do not depend on them)."""
    layout = vision_layout(grid_thw, cfg)
    patches = jnp.zeros((num_patches(grid_thw), cfg.patch_dim), jnp.float32)
    return patches, layout


def encode(module: nn.Module, params, patches, grid_thw, *, num_tokens: int | None = None,
           num_windows: int | None = None, jit_fn=None):
    """Host convenience: merged tokens (n_merged, out_hidden_size) for patches + grid_thw, padding removed.

    `jit_fn(params, patches, layout)`: the caller's compiled `module.apply` (reused across calls); default: one
    jitted per call (`apply_fn(module)`).
    """
    cfg = module.cfg
    grid = check_grid(grid_thw, cfg)
    n_real = num_patches(grid)
    patches = np.asarray(patches) if not isinstance(patches, jax.Array) else patches
    if patches.shape != (n_real, cfg.patch_dim):
        raise ValueError(
            f"patches have shape {tuple(patches.shape)} but grid_thw {grid.tolist()} needs ({n_real}, {cfg.patch_dim})"
        )
    layout = vision_layout(grid, cfg, num_tokens=num_tokens, num_windows=num_windows)
    n_tokens = layout["token_order"].shape[0]
    if n_tokens > n_real:
        patches = jnp.concatenate([jnp.asarray(patches), jnp.zeros((n_tokens - n_real, cfg.patch_dim), patches.dtype)])
    fn = jit_fn or apply_fn(module)
    return fn(params, patches, layout)[: n_real // cfg.merge_unit]


def apply_fn(module: nn.Module):
    """`jax.jit` of `module.apply` as (params, patches, layout) -> merged tokens: keep it to reuse its compilations."""
    return jax.jit(lambda p, x, lay: module.apply({"params": p}, x, lay))


registry.register(registry.Kind(
    name="qwen2_5_vl_vision",
    config_from_hf=lambda hf: config_from_hf("qwen2_5_vl_vision", hf),
    build=lambda cfg: build("qwen2_5_vl_vision", cfg),
    init_args=lambda cfg: (init_args(cfg), {}, None),
    converter="qwen2_5_vl_vision",
    model_types=("qwen2_5_vl_vision",),
    init_group="visual",
))
