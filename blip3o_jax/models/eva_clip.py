"""EVA-CLIP-E/14-plus vision tower: the frozen encoder whose pooled features are BLIP3-o's generation target.

The original is `EVAVisionTransformer` in BLIP3o's
`blip3o/model/multimodal_encoder/eva_clip/eva_vit.py` (adapted from BAAI's EVA-CLIP): a plain ViT with a CLS
token, learned absolute position embedding, one fused qkv Linear with bias, exact-erf GELU MLP and
**post-norm** blocks (`x += LN(attn(x)); x += LN(mlp(x))`), LayerNorm eps 1e-6, no RoPE, no layer scale, no final
norm and no head. BLIP3-o takes the last block's tokens without CLS, (B, 1024, 1792) at 448 px, and average-pools
them 4x4 to the 8x8x1792 grid the DiT generates (`pool_grid`).

`__call__` takes channels-last images normalised with the CLIP mean/std (`CLIP_MEAN`, `CLIP_STD`, the original's
`OPENAI_DATASET_MEAN/STD`); `targets` takes the uint8 generation image and does all of it: normalise, tower, pool.
Parameter names mirror the torch module tree (`patch_embed/proj`, `blocks/attn/qkv`, `blocks/mlp/fc1`, ...) so
the converter in `convert/eva_clip.py` is renames and transposes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers, registry
from blip3o_jax.models.layers import Dense, LayerNorm, partitioned, to_dtype

# OpenAI CLIP's image normalisation, used by EVA-CLIP's processor (and Qwen2.5-VL's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class EvaClipConfig:
    """Defaults = BLIP3o's `eva-clip-E-14-plus.json` vision_cfg (448 px, 64 blocks of width 1792)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112  # -> 16 heads
    mlp_ratio: float = 8.571428571428571  # int(1792 * ratio) = 15360, as the original computes it
    qkv_bias: bool = True
    postnorm: bool = True
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    pool_stride: int = 4  # gen_pooling "early_pool2d_4": 32x32 tokens -> 8x8
    # execution policy
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    def __post_init__(self):
        if self.width % self.head_width:
            raise ValueError(f"eva_clip: width {self.width} is not a multiple of head_width {self.head_width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"eva_clip: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)  # the original: `mlp_hidden_dim = int(dim * mlp_ratio)`

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


_FIELDS = {f.name for f in dataclasses.fields(EvaClipConfig)}


def config_from_hf(kind: str, hf_config: dict) -> EvaClipConfig:
    """Accepts an EVA-CLIP model json (`{"vision_cfg": {...}}`), its `vision_cfg`, or our own field names.

    Unknown EVA-CLIP fields that do not change the vision forward pass (eva_model_name, xattn, drop_path_rate,
    fusedLN, embed_dim, text_cfg) are ignored; fields that would change it and that we do not implement (rope,
    subln, naiveswiglu, layer scale) raise.
    """
    if kind != "eva_clip":
        raise ValueError(f"eva_clip.config_from_hf: unexpected kind {kind!r}")
    cfg = dict(hf_config.get("vision_cfg", hf_config))
    for unsupported in ("rope", "subln", "naiveswiglu", "intp_freq"):
        if cfg.get(unsupported):
            raise ValueError(f"eva_clip: vision_cfg.{unsupported}=True is not implemented (BLIP3o's EVA-CLIP-E does not use it)")
    if cfg.get("ls_init_value"):
        raise ValueError("eva_clip: layer scale (vision_cfg.ls_init_value) is not implemented")
    if isinstance(cfg.get("image_size"), (list, tuple)):
        h, w = cfg["image_size"]
        if h != w:
            raise ValueError(f"eva_clip: only square images are supported, got image_size {cfg['image_size']}")
        cfg["image_size"] = h
    return EvaClipConfig(**{k: v for k, v in cfg.items() if k in _FIELDS})


def build(kind: str, cfg: EvaClipConfig) -> nn.Module:
    if kind != "eva_clip":
        raise ValueError(f"eva_clip.build: unexpected kind {kind!r}")
    return EvaVisionTransformer(cfg)


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention; scale head_width**-0.5 (xformers path of the original)."""

    cfg: EvaClipConfig

    @nn.compact
    def __call__(self, x):  # (B, L, width)
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        all_head_dim = cfg.num_heads * cfg.head_width
        # torch's qkv.weight is (3*H*D, width); stored here as (width, 3, H*D) so that the `heads` axis can be
        # sharded over `tensor` without splitting the q/k/v boundary.
        qkv = QKV(all_head_dim, cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name="qkv")(x)  # (B, L, 3, H*D)
        b, l = x.shape[:2]
        qkv = qkv.reshape(b, l, 3, cfg.num_heads, cfg.head_width)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, D)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = _constrain(k, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        v = _constrain(v, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        out = layers.attention(q, k, v, scale=cfg.head_width**-0.5, implementation=cfg.attention_impl)
        out = out.reshape(b, l, all_head_dim)
        return Dense(cfg.width, kernel_axes=("heads", "embed"), dtype=dtype, param_dtype=pdtype, name="proj")(out)


class QKV(nn.Module):
    """One Linear producing q, k, v: kernel (in, 3, H*D), bias (3, H*D)."""

    features: int  # H*D
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", partitioned(layers.torch_linear_init(), ("embed", None, "heads")),
            (x.shape[-1], 3, self.features), self.param_dtype,
        )
        y = jnp.einsum("bld,dtf->bltf", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, (None, "heads")), (3, self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Mlp(nn.Module):
    cfg: EvaClipConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h = Dense(cfg.mlp_dim, kernel_axes=("embed", "mlp"), dtype=dtype, param_dtype=pdtype, name="fc1")(x)
        h = _constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = layers.gelu_exact(h)  # torch nn.GELU() default: exact erf
        return Dense(cfg.width, kernel_axes=("mlp", "embed"), dtype=dtype, param_dtype=pdtype, name="fc2")(h)


class Block(nn.Module):
    cfg: EvaClipConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype = to_dtype(cfg.dtype)
        pdtype = to_dtype(cfg.param_dtype)
        norm1 = LayerNorm(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="norm1")
        norm2 = LayerNorm(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="norm2")
        attn = Attention(cfg, name="attn")
        mlp = Mlp(cfg, name="mlp")
        if cfg.postnorm:  # eva-clip-E-14-plus: the norm sits on the residual branch's output
            x = x + norm1(attn(x))
            x = x + norm2(mlp(x))
        else:
            x = x + attn(norm1(x))
            x = x + mlp(norm2(x))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) as a matmul over flattened (ph, pw, c) patches of a channels-last image."""

    cfg: EvaClipConfig

    @nn.compact
    def __call__(self, images):  # (B, H, W, C)
        cfg = self.cfg
        patches = layers.patchify(images, cfg.patch_size)  # (B, N, p*p*C), row-major (h, w) token order
        return Dense(cfg.width, kernel_axes=("patch", "embed"), dtype=to_dtype(cfg.dtype),
                     param_dtype=to_dtype(cfg.param_dtype), name="proj")(patches)


class EvaVisionTransformer(nn.Module):
    """images (B, H, W, 3) normalized -> (B, grid*grid, width): the last block's patch tokens, CLS dropped."""

    cfg: EvaClipConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"eva_clip: expected images of shape (B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}) "
                f"(channels-last, normalized), got {tuple(images.shape)}"
            )
        x = PatchEmbed(cfg, name="patch_embed")(images.astype(dtype))  # (B, N, width)
        b = x.shape[0]
        cls_token = self.param("cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                               (1, 1, cfg.width), pdtype)
        pos_embed = self.param("pos_embed", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                               (1, cfg.num_patches + 1, cfg.width), pdtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dtype), (b, 1, cfg.width)), x], axis=1)
        x = x + pos_embed.astype(dtype)
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        blocks = layers.repeat_blocks(Block, cfg.layers, cfg, scan=cfg.scan_layers, remat=cfg.remat,
                                      remat_policy=cfg.remat_policy, name="blocks")
        x = layers.run_blocks(blocks, x)
        return x[:, 1:, :]  # EVAEncoderWrapper: `[:, 1:, :]`, no final norm

    def targets(self, images):
        """BLIP3-o's generation targets of uint8 images (B, S, S, 3): CLIP-normalised, through the tower, the patch
        tokens average-pooled `pool_stride` x `pool_stride` (gen_pooling "early_pool2d_4") -> (B, g, g, width) fp32."""
        features = self(layers.normalize_images(images, CLIP_MEAN, CLIP_STD))  # (B, grid², width)
        return pool_grid(features, self.cfg.pool_stride).astype(jnp.float32)

    def target_shape(self, image_size: int) -> tuple[int, int, int]:
        """(g, g, C) of `targets` for `image_size` px images, from the config alone."""
        cfg = self.cfg
        if image_size != cfg.image_size:
            raise ValueError(f"eva_clip: the generation image is {image_size} px but the tower's image_size is "
                             f"{cfg.image_size}")
        side = cfg.grid_size // cfg.pool_stride
        if side == 0:
            raise ValueError(f"eva_clip: pool_stride {cfg.pool_stride} is larger than the {cfg.grid_size}x"
                             f"{cfg.grid_size} token grid")
        return (side, side, cfg.width)


def pool_grid(features, stride: int = 4, grid_size: int | None = None):
    """(B, N, C) row-major tokens of a square grid -> (B, grid//stride, grid//stride, C) 2-D average pool.

    As the original `pool_img` (F.avg_pool2d, kernel = stride, no padding: a remainder is dropped), but
    channels-last: element [b, i, j] averages tokens (i*stride + u) * grid + (j*stride + v). Works on NumPy and
    JAX arrays; the mean is accumulated in fp32.
    """
    xp = jnp if isinstance(features, jax.Array) else np
    b, n, c = features.shape
    if grid_size is None:
        grid_size = int(round(n**0.5))
    if grid_size * grid_size != n:
        raise ValueError(f"pool_grid: {n} tokens do not form a square grid (pass grid_size)")
    out = grid_size // stride
    if out == 0:
        raise ValueError(f"pool_grid: stride {stride} is larger than the {grid_size}x{grid_size} grid")
    x = features.reshape(b, grid_size, grid_size, c)[:, : out * stride, : out * stride]
    x = x.reshape(b, out, stride, out, stride, c).astype(xp.float32)
    return x.mean(axis=(2, 4)).astype(features.dtype)


registry.register(registry.Kind(
    name="eva_clip",
    config_from_hf=lambda hf: config_from_hf("eva_clip", hf),
    build=lambda cfg: build("eva_clip", cfg),
    init_args=lambda cfg: ((jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),), {}, None),
    converter="eva_clip",
    init_group="gen_encoder",
))
