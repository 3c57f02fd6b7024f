"""SigLIP vision tower (transformers' `SiglipVisionModel`), with a selectable output layer.

BLIP3-o uses `google/siglip2-so400m-patch16-512` (the
fixed-resolution SigLIP2 checkpoints have the SigLIP architecture): 512 px, patch 16 -> 32x32 = 1024 tokens of
width 1152, 27 pre-norm layers, tanh-GELU MLP 4304, LayerNorm eps 1e-6.
- `output_layer="last"`: `last_hidden_state` after `post_layernorm` (Qwen3-SigLIP2 understanding tower).
- `output_layer="penultimate"`: `hidden_states[-2]`, the output of the second-to-last encoder layer without the
  post-LayerNorm (SigLIP2 + SANA encoder). Only the layers that feed the output are built and run: the last
  layer, post_layernorm and the attention-pooling head are not parameters of this module (the converter names
  them as knowingly skipped).
The pooling head (`pooler_output`) is used by neither variant and is not implemented.

`__call__` takes channels-last images normalised with `SIGLIP_MEAN`/`SIGLIP_STD` (0.5, as SigLIP's processor);
`encode_uint8` takes uint8 images and normalises them itself.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from blip3o_jax.models import layers, registry
from blip3o_jax.models.layers import Dense, LayerNorm, partitioned, to_dtype

# SiglipImageProcessor's image_mean / image_std
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

OUTPUT_LAYERS = ("last", "penultimate")
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": layers.gelu_exact,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """Defaults = siglip2-so400m-patch16-512's vision_config."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27  # as in the checkpoint; "penultimate" runs num_hidden_layers - 1 of them
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    output_layer: str = "last"
    # execution policy
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    def __post_init__(self):
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"siglip_vision: output_layer must be one of {OUTPUT_LAYERS}, got {self.output_layer!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"siglip_vision: hidden_act {self.hidden_act!r} not supported; expected one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"siglip_vision: hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"siglip_vision: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.output_layer == "penultimate" and self.num_hidden_layers < 2:
            raise ValueError("siglip_vision: output_layer='penultimate' needs at least 2 layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_run(self) -> int:
        """Layers whose output reaches the selected output: hidden_states[-2] is the output of layer N-2 (0-based)."""
        return self.num_hidden_layers - (1 if self.output_layer == "penultimate" else 0)


_FIELDS = {f.name for f in dataclasses.fields(SiglipVisionConfig)}


def config_from_hf(kind: str, hf_config: dict) -> SiglipVisionConfig:
    """From a SiglipVisionConfig dict, or a full SiglipConfig dict (its `vision_config` is used).

    Our own execution fields (output_layer, scan_layers, remat, ...) may be passed in the same dict; `dtype` there
    is transformers' torch dtype and is ignored: set ours with `dataclasses.replace(cfg, dtype=...)`.
    """
    if kind != "siglip_vision":
        raise ValueError(f"siglip.config_from_hf: unexpected kind {kind!r}")
    ours = {k: v for k, v in hf_config.items() if k in ("output_layer", "scan_layers", "remat",
                                                          "remat_policy", "attention_impl")}
    cfg = dict(hf_config.get("vision_config") or hf_config)
    if isinstance(cfg.get("image_size"), (list, tuple)):
        h, w = cfg["image_size"]
        if h != w:
            raise ValueError(f"siglip_vision: only square images are supported, got image_size {cfg['image_size']}")
        cfg["image_size"] = h
    if isinstance(cfg.get("patch_size"), (list, tuple)):
        cfg["patch_size"] = cfg["patch_size"][0]
    cfg.pop("dtype", None)  # transformers' torch dtype is not our compute-dtype policy
    cfg.update(ours)
    return SiglipVisionConfig(**{k: v for k, v in cfg.items() if k in _FIELDS})


def build(kind: str, cfg: SiglipVisionConfig) -> nn.Module:
    if kind != "siglip_vision":
        raise ValueError(f"siglip.build: unexpected kind {kind!r}")
    return SiglipVisionTransformer(cfg)


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


class SiglipAttention(nn.Module):
    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, x):  # (B, L, C)
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        b, l, _ = x.shape

        def proj(name):
            y = Dense(cfg.hidden_size, kernel_axes=("embed", "heads"), dtype=dtype, param_dtype=pdtype, name=name)(x)
            y = y.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
            return _constrain(y, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        out = layers.attention(q, k, v, scale=cfg.head_dim**-0.5, implementation=cfg.attention_impl)
        out = out.reshape(b, l, cfg.hidden_size)
        return Dense(cfg.hidden_size, kernel_axes=("heads", "embed"), dtype=dtype, param_dtype=pdtype, name="out_proj")(out)


class SiglipMLP(nn.Module):
    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h = Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), dtype=dtype, param_dtype=pdtype, name="fc1")(x)
        h = _constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return Dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), dtype=dtype, param_dtype=pdtype, name="fc2")(h)


class SiglipEncoderLayer(nn.Module):
    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h = LayerNorm(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="layer_norm1")(x)
        x = x + SiglipAttention(cfg, name="self_attn")(h)
        h = LayerNorm(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="layer_norm2")(x)
        x = x + SiglipMLP(cfg, name="mlp")(h)
        return _constrain(x, ("activation_batch", "activation_length", "activation_embed")), None


class SiglipVisionEmbeddings(nn.Module):
    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, images):  # (B, H, W, C)
        cfg = self.cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        # Conv2d(kernel = stride = patch, "valid") as a matmul over (ph, pw, c)-flattened patches, row-major tokens
        patches = layers.patchify(images, cfg.patch_size)
        x = Dense(cfg.hidden_size, kernel_axes=("patch", "embed"), dtype=dtype, param_dtype=pdtype,
                  name="patch_embedding")(patches)
        pos = self.param("position_embedding", partitioned(nn.initializers.normal(1.0), (None, "embed")),
                         (cfg.num_patches, cfg.hidden_size), pdtype)
        return x + pos.astype(dtype)[None]


class SiglipEncoder(nn.Module):
    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        stack = layers.repeat_blocks(SiglipEncoderLayer, cfg.num_layers_run, cfg, scan=cfg.scan_layers,
                                     remat=cfg.remat, remat_policy=cfg.remat_policy, name="layers")
        return layers.run_blocks(stack, x)


class SiglipVisionTransformer(nn.Module):
    """images (B, H, W, 3) normalized -> (B, grid*grid, hidden): the configured output layer."""

    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"siglip_vision: expected images of shape (B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}) "
                f"(channels-last, normalized), got {tuple(images.shape)}"
            )
        x = SiglipVisionEmbeddings(cfg, name="embeddings")(images.astype(to_dtype(cfg.dtype)))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = SiglipEncoder(cfg, name="encoder")(x)
        if cfg.output_layer == "last":
            x = LayerNorm(eps=cfg.layer_norm_eps, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                          name="post_layernorm")(x)
        return x

    def encode_uint8(self, images):
        """The configured output layer of uint8 images (B, H, W, 3), normalised here with SigLIP's mean/std."""
        return self(layers.normalize_images(images, SIGLIP_MEAN, SIGLIP_STD))


registry.register(registry.Kind(
    name="siglip_vision",
    config_from_hf=lambda hf: config_from_hf("siglip_vision", hf),
    build=lambda cfg: build("siglip_vision", cfg),
    init_args=lambda cfg: ((jax.numpy.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels)),), {}, None),
    converter="siglip",
    # a full SiglipModel checkpoint (e.g. google/siglip2-so400m-patch16-512): its vision half
    model_types=("siglip_vision_model", "siglip"),
    init_group="visual",
))
