"""BLIP3-o: a Qwen backbone, learnable latent queries, and a DiT that generates image features from them.

Text-to-image: the prompt's token embeddings with `n_query` latent-query embeddings placed at
the query slots go through the (frozen) backbone; the final-norm hidden states *at* the query slots (no shift) are
the DiT's condition. The DiT predicts the flow-matching velocity of the target grid:
- `eva_clip`: 8x8x1792 EVA-CLIP-E/14+ features of the 448 px image (the release), computed by the frozen
  `gen_encoder` in a no-grad function of the train step;
- `vae`: the latents of a frozen KL autoencoder (`gen_encoder` of kind `autoencoder_kl`): the mode of its
  posterior, normalised as diffusers pipelines feed latents to their denoiser (the original README's "VAE + flow
  matching" variant); the DiT patchifies the (S/f, S/f, latent_channels) grid;
- `precomputed`: an encoder's grid read from the data (no encoder in the step);
- `pixels`: the image itself in [-1, 1], which the DiT patchifies (tiny CPU configs: the demo turns samples into
  pixels without a second decoder).
Each in-step target is computed by one module (`TARGET_MODULES`) whose `targets(uint8 images)` owns the
normalisation, the encoder and the pooling; `Blip3o.targets` only dispatches to it.

Groups of parameters (top-level keys; trainable ones per `training/optimizer.py`): `backbone`, `latent_queries`,
`dit`, `mse_head` (clip_mse loss), `gen_encoder` (frozen target encoder), `visual` + `mm_projector` (understanding
tower, optional).

Static shapes throughout: the data gives per-sample `query_index` (B, n_query) slot positions; queries are written
with a scatter whose out-of-range indices are dropped (samples without a generation target keep their tokens) and
read back with `take_along_axis`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import autoencoder_kl, eva_clip, layers, prefix_cache, registry
from blip3o_jax.models import dit as dit_lib
from blip3o_jax.models import qwen as qwen_lib
from blip3o_jax.models import qwen2_5_vl_vision as qv


class PixelTargets(nn.Module):
    """target='pixels': the generation image itself in [-1, 1]; no parameters."""

    def targets(self, images):
        return images.astype(jnp.float32) / 127.5 - 1.0

    def target_shape(self, image_size: int) -> tuple[int, int, int]:
        return (image_size, image_size, 3)


class VAELatentTargets(autoencoder_kl.AutoencoderKL):
    """target='vae': an `AutoencoderKL` (the same parameters) whose `targets` are the latents a diffusers pipeline
    denoises: the encoder's mean of the image in [-1, 1] (the posterior's mode, so the targets are deterministic
    and can be precomputed), normalised as the pipelines do before denoising: (mean - latents_mean) *
    scaling_factor / latents_std when the config has per-channel statistics (`StableDiffusionXLImg2ImgPipeline.
    prepare_latents`), else (mean - shift_factor) * scaling_factor (SD3 / Flux; no shift when unset)."""

    def targets(self, images):
        cfg = self.cfg
        mean, _ = self.encode(images.astype(jnp.float32) / 127.5 - 1.0)  # (B, S/f, S/f, latent_channels) fp32
        if self.is_initializing():  # declare the decoder too: the group is the whole VAE, as it is converted
            self.decode(mean)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            stat = lambda v: jnp.asarray(v, jnp.float32).reshape(-1)  # noqa: E731  (per latent channel)
            return (mean - stat(cfg.latents_mean)) * cfg.scaling_factor / stat(cfg.latents_std)
        return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def target_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.cfg.downsample_factor
        if image_size % f:
            raise ValueError(f"autoencoder_kl: the generation image ({image_size} px) is not a multiple of the VAE's "
                             f"downsampling factor {f}")
        return (image_size // f, image_size // f, self.cfg.latent_channels)


# The targets computed in the step from the uint8 generation image: target -> (the `gen_encoder_kind` it needs, or
# None; the module that computes it, built from the `gen_encoder` config). The module's `targets(images (B, S, S, 3)
# uint8) -> (B, g, g, C) fp32` owns its normalisation and pooling; `target_shape(S) -> (g, g, C)` answers from the
# config alone. A new target kind is one entry here.
TARGET_MODULES = {
    "eva_clip": ("eva_clip", eva_clip.EvaVisionTransformer),
    "vae": ("autoencoder_kl", VAELatentTargets),
    "pixels": (None, lambda _: PixelTargets()),
}
ENCODER_TARGETS = tuple(t for t, (kind, _) in TARGET_MODULES.items() if kind is not None)  # what can be precomputed
TARGETS = (*TARGET_MODULES, "precomputed")
BACKBONE_KINDS = ("qwen2", "qwen2_5_vl_text", "qwen3")
LOSSES = ("clip_fm", "clip_mse")
# how the backbone computes the query states: "full" (the whole sequence with the queries in place, differentiable
# everywhere), "prefix_cache" (the prompt once without gradient into a KV cache, then only the queries; exact for a
# frozen backbone, models/prefix_cache.py) or "auto" (the training step picks prefix_cache for a frozen backbone
# without a text loss, training/step.model_config; "full" anywhere else)
QUERY_PATHS = ("full", "prefix_cache", "auto")
UND_TOWERS = (None, "qwen2_5_vl_vision", "siglip_vision")


@dataclasses.dataclass(frozen=True)
class Blip3oConfig:
    backbone_kind: str = "qwen2_5_vl_text"
    backbone: qwen_lib.QwenConfig = dataclasses.field(default_factory=qwen_lib.QwenConfig)
    dit: dit_lib.DiTConfig = dataclasses.field(default_factory=dit_lib.DiTConfig)
    n_query: int = 64  # latent queries
    query_init_std: float = 1.0  # torch.randn as the original (keep for checkpoint compatibility)
    target: str = "eva_clip"  # eva_clip | vae | precomputed | pixels
    gen_encoder_kind: str | None = "eva_clip"  # the kind TARGET_MODULES names for the target
    gen_encoder: Any = None  # the encoder's config dataclass (models/eva_clip.py, models/autoencoder_kl.py)
    image_size: int = 448  # side of the generation image the data delivers
    target_grid: int = 8  # side of the DiT's input grid: 8 (pooled EVA features), S/f (VAE), image_size (pixels)
    target_channels: int = 1792  # channels of the DiT's input grid
    loss: str = "clip_fm"  # clip_fm (flow matching, the release) | clip_mse (regress the grid directly)
    query_path: str = "full"  # full | prefix_cache | auto (see QUERY_PATHS)
    # understanding tower (optional; image-to-text training): the Qwen2.5-VL ViT (its merger already outputs the
    # LLM width) or SigLIP + a trainable mlp2x_gelu projector (Qwen3-SigLIP2 branch)
    und_tower_kind: str | None = None  # None | qwen2_5_vl_vision | siglip_vision
    und_tower: Any = None
    und_image_size: int = 448

    def __post_init__(self):
        if self.backbone_kind not in BACKBONE_KINDS:
            raise ValueError(f"Blip3oConfig.backbone_kind={self.backbone_kind!r}; expected one of {BACKBONE_KINDS}")
        if self.target not in TARGETS:
            raise ValueError(f"Blip3oConfig.target={self.target!r}; expected one of {TARGETS}")
        if self.loss not in LOSSES:
            raise ValueError(f"Blip3oConfig.loss={self.loss!r}; expected one of {LOSSES}")
        if self.query_path not in QUERY_PATHS:
            raise ValueError(f"Blip3oConfig.query_path={self.query_path!r}; expected one of {QUERY_PATHS}")
        if self.dit.latent_embedding_size != self.backbone.hidden_size:
            raise ValueError(
                f"the DiT's latent_embedding_size {self.dit.latent_embedding_size} must equal the backbone width "
                f"{self.backbone.hidden_size} (the query states enter the DiT's caption projection directly)"
            )
        if self.dit.in_channels != self.target_channels or self.dit.input_size != self.target_grid:
            raise ValueError(
                f"the DiT expects ({self.dit.input_size}, {self.dit.input_size}, {self.dit.in_channels}) inputs but "
                f"the target grid is ({self.target_grid}, {self.target_grid}, {self.target_channels})"
            )
        if self.target in TARGET_MODULES:
            kind = TARGET_MODULES[self.target][0]
            if kind is not None and self.gen_encoder_kind != kind:
                raise ValueError(f"target={self.target!r} is computed by a gen_encoder of kind {kind!r}, but "
                                 f"gen_encoder_kind={self.gen_encoder_kind!r}")
            if kind is not None and self.gen_encoder is None:
                raise ValueError(f"target={self.target!r} needs a gen_encoder config")
            shape = target_module(self).target_shape(self.image_size)
            if tuple(shape) != self.target_shape:
                raise ValueError(f"target={self.target!r} makes {tuple(shape)} grids of the {self.image_size} px "
                                 f"image, but target_grid/target_channels (the DiT's input) are {self.target_shape}")
        if self.und_tower_kind not in UND_TOWERS:
            raise ValueError(f"Blip3oConfig.und_tower_kind={self.und_tower_kind!r}; expected one of {UND_TOWERS}")
        if self.und_tower_kind is not None and self.und_tower is None:
            raise ValueError(f"und_tower_kind={self.und_tower_kind!r} needs an und_tower config")

    @property
    def target_shape(self) -> tuple[int, int, int]:
        return (self.target_grid, self.target_grid, self.target_channels)


def target_module(cfg: Blip3oConfig) -> nn.Module:
    """The module that computes `cfg.target` from the generation image (an unbound module, see TARGET_MODULES)."""
    if cfg.target not in TARGET_MODULES:
        raise ValueError(f"target {cfg.target!r} comes precomputed from the data, not from images")
    return TARGET_MODULES[cfg.target][1](cfg.gen_encoder)


def config_from_hf(kind: str, hf: dict) -> Blip3oConfig:
    """Blip3oConfig from either our nested dict (`{"backbone_kind", "backbone": {...}, "dit": {...}, ...}`, as the
    training configs write it) or a released BLIP3-o `config.json` (a Qwen2.5-VL config plus BLIP3-o fields)."""
    if kind != "blip3o":
        raise ValueError(f"models/blip3o.py builds kind 'blip3o', not {kind!r}")
    hf = dict(hf)
    if "backbone" in hf:  # ours
        backbone_kind = hf.get("backbone_kind", "qwen2_5_vl_text")
        backbone = qwen_lib.config_from_hf(backbone_kind, {"model_type": backbone_kind, **dict(hf["backbone"])})
        backbone = dataclasses.replace(backbone, **{k: v for k, v in dict(hf["backbone"]).items()
                                                    if k in _POLICY_FIELDS})
        dit_cfg = dict(hf["dit"])
        dit_cfg.setdefault("latent_embedding_size", backbone.hidden_size)
        dit = dit_lib.config_from_hf("dit", dit_cfg)
        # the encoder kind defaults to the one the target needs (eva_clip for the release)
        needed_kind = TARGET_MODULES.get(hf.get("target", "eva_clip"), (None,))[0]
        gen_kind = hf.get("gen_encoder_kind") or needed_kind or "eva_clip"
        gen_encoder = None
        if needed_kind is not None and hf.get("gen_encoder") is not None:
            gen_encoder = registry.get(gen_kind).config_from_hf(dict(hf["gen_encoder"]))
        und_tower = None
        if hf.get("und_tower_kind"):
            und_tower = registry.get(hf["und_tower_kind"]).config_from_hf(dict(hf["und_tower"]))
        fields = {f.name for f in dataclasses.fields(Blip3oConfig)} - {"backbone", "dit", "gen_encoder", "und_tower"}
        rest = {k: v for k, v in hf.items() if k in fields}
        rest["gen_encoder_kind"] = gen_kind
        rest.setdefault("target_channels", dit.in_channels)
        rest.setdefault("target_grid", dit.input_size)
        return Blip3oConfig(backbone=backbone, dit=dit, gen_encoder=gen_encoder, und_tower=und_tower, **rest)
    # a released checkpoint's config.json
    backbone_kind = "qwen2_5_vl_text" if hf.get("model_type", "").startswith("qwen2_5_vl") or "vision_config" in hf \
        else hf.get("model_type", "qwen2_5_vl_text")
    if backbone_kind.startswith("blip3o"):
        backbone_kind = "qwen2_5_vl_text"
    backbone = qwen_lib.config_from_hf(backbone_kind, hf)
    dit = dit_lib.DiTConfig(latent_embedding_size=backbone.hidden_size)
    return Blip3oConfig(
        backbone_kind=backbone_kind, backbone=backbone, dit=dit, n_query=int(hf.get("n_query", 64)),
        target="eva_clip", gen_encoder=eva_clip.config_from_hf("eva_clip", {}),
    )


# ours (not HF) fields of QwenConfig that a training config may set next to the HF ones
_POLICY_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "remat_policy", "attention_impl")


def build(kind: str, cfg: Blip3oConfig) -> "Blip3o":
    if kind != "blip3o":
        raise ValueError(f"models/blip3o.py builds kind 'blip3o', not {kind!r}")
    return Blip3o(cfg)


def scatter_queries(embeds, queries, query_index, has_queries):
    """embeds (B,L,D) with rows `query_index` (B,nq) replaced by `queries` (B,nq,D) where `has_queries` (B,)."""
    B, L, _ = embeds.shape
    # out-of-range slots are dropped: samples without a generation target keep all their token embeddings
    index = jnp.where(has_queries[:, None], query_index, L)
    return embeds.at[jnp.arange(B)[:, None], index].set(queries.astype(embeds.dtype), mode="drop")


def gather_queries(hidden, query_index):
    """hidden (B,L,D) at positions `query_index` (B,nq) -> (B,nq,D)."""
    return jnp.take_along_axis(hidden, query_index[..., None].astype(jnp.int32), axis=1)


class MLPProjector(nn.Module):
    """mlp2x_gelu (the Qwen3-SigLIP2 `mm_projector`): Linear(C -> D) -> GELU -> Linear(D -> D), `linear_1/2`."""

    features: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=layers.to_dtype(self.dtype), param_dtype=layers.to_dtype(self.param_dtype))
        x = layers.Dense(self.features, kernel_axes=("patch", "embed"), name="linear_1", **kw)(x)
        x = layers.gelu_exact(x)
        return layers.Dense(self.features, kernel_axes=("mlp", "embed"), name="linear_2", **kw)(x)


class Blip3o(nn.Module):
    cfg: Blip3oConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = qwen_lib.build(cfg.backbone_kind, cfg.backbone)
        self.latent_queries = self.param(
            "latent_queries",
            layers.partitioned(nn.initializers.normal(cfg.query_init_std), (None, None, "embed")),
            (1, cfg.n_query, cfg.backbone.hidden_size),
            layers.to_dtype(cfg.backbone.param_dtype),
        )
        if cfg.loss == "clip_fm":
            self.dit = dit_lib.build("dit", cfg.dit)
        else:  # clip_mse: a per-token projection head replaces the DiT
            self.mse_head = dit_lib.MSEHead(cfg.dit)
        if cfg.target in TARGET_MODULES:
            self.gen_encoder = target_module(cfg)
        if cfg.und_tower_kind is not None:
            self.visual = registry.get(cfg.und_tower_kind).build(cfg.und_tower)
            if cfg.und_tower_kind == "siglip_vision":
                self.mm_projector = MLPProjector(cfg.backbone.hidden_size, cfg.backbone.dtype, cfg.backbone.param_dtype)

    # -- understanding + conditioning ---------------------------------------------------------------------------

    def query_embeddings(self, batch_size: int):
        return jnp.broadcast_to(self.latent_queries, (batch_size, *self.latent_queries.shape[1:]))

    def encode(self, input_ids, attention_mask, positions, query_index, has_queries, *, compute_logits: bool = False,
               und_inputs=None, und_index=None, has_und=None):
        """Backbone pass over prompts with the latent queries in place (`query_index` None: text only).

        und_inputs: understanding images of the rows with `has_und` (B,): Qwen2.5-VL patches (B, N, 1176), or
        uint8 images (B, S, S, 3) for SigLIP; their tokens replace the embeddings at `und_index` (B, n_und), the
        `<|image_pad|>` slots. Returns (query_states (B, n_query, D) after the final norm, fp32 logits or None).
        """
        B = input_ids.shape[0]
        if self.cfg.query_path == "prefix_cache" and query_index is not None and und_inputs is None:
            if compute_logits:
                raise ValueError("query_path='prefix_cache' gives the query states only; a text loss needs the "
                                 "logits of every position: use query_path='full' (or 'auto')")
            # rows without a generation target (has_queries False) get query states too; the loss weights them 0
            return prefix_cache.encode_queries(self, input_ids, attention_mask, positions, query_index), None
        embeds = self.backbone.embed(input_ids)
        if und_inputs is not None:
            embeds = scatter_queries(embeds, self.understanding_tokens(und_inputs), und_index, has_und)
        if query_index is not None:
            embeds = scatter_queries(embeds, self.query_embeddings(B), query_index, has_queries)
        hidden, logits, _ = self.backbone.forward(
            inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, compute_logits=compute_logits
        )
        return (None if query_index is None else gather_queries(hidden, query_index)), logits

    def understanding_tokens(self, und_inputs):
        """(B, n_und, D) LLM-width tokens of the understanding images. The tower is frozen (never a trainable
        group, see training/optimizer.py); the SigLIP projector trains in joint mode."""
        cfg = self.cfg
        if cfg.und_tower_kind == "qwen2_5_vl_vision":
            B, N, P = und_inputs.shape
            side = cfg.und_image_size // cfg.und_tower.patch_size
            # every row holds one still image of the same grid: the (static) window layout is built on the host
            layout = qv.vision_layout(np.tile([[1, side, side]], (B, 1)), cfg.und_tower)
            tokens = self.visual(und_inputs.reshape(B * N, P), layout)  # (B * N / merge², D), images in order
            return tokens.reshape(B, -1, tokens.shape[-1])
        if cfg.und_tower_kind == "siglip_vision":
            return self.mm_projector(self.visual.encode_uint8(und_inputs))  # last_hidden_state -> mlp2x_gelu
        raise ValueError("this model has no understanding tower (model.und_tower_kind is None)")

    # -- generation ----------------------------------------------------------------------------------------------

    def velocity(self, x_t, t, cond, cond_mask=None):
        """The DiT: x_t (B, g, g, C), raw timesteps t (B,) in [0, 1000], cond (B, n_query, D) -> (B, g, g, C) fp32."""
        return self.dit(x_t, t, cond, cond_mask)

    def mse_prediction(self, query_states):
        """clip_mse: the target grid regressed directly from the query states."""
        return self.mse_head(query_states)

    def targets(self, images):
        """Generation targets (B, g, g, C) fp32 from uint8 images (B, S, S, 3), computed by the target's module
        (TARGET_MODULES); the train step takes them without gradient."""
        if self.cfg.target not in TARGET_MODULES:
            raise ValueError(f"target {self.cfg.target!r} comes precomputed from the data, not from images")
        return self.gen_encoder.targets(images)

    def __call__(self, input_ids, attention_mask, positions, query_index, has_queries, images):
        """Touches every submodule once (for `init`); returns the velocity of a dummy noisy target."""
        query_states, _ = self.encode(input_ids, attention_mask, positions, query_index, has_queries)
        g, c = self.cfg.target_grid, self.cfg.target_channels
        if self.cfg.loss == "clip_fm":
            x_t = jnp.zeros((input_ids.shape[0], g, g, c), jnp.float32)
            out = self.velocity(x_t, jnp.zeros((input_ids.shape[0],), jnp.float32), query_states)
        else:
            out = self.mse_prediction(query_states)
        if self.cfg.target in TARGET_MODULES:
            out = out + self.targets(images)
        if self.cfg.und_tower_kind is not None:
            tokens = self.understanding_tokens(self.dummy_und_inputs(1))
            out = out + jnp.mean(tokens).astype(out.dtype)
        return out

    def dummy_und_inputs(self, batch: int):
        """Zero understanding inputs of the shape the data delivers (for `init` and shape inference)."""
        cfg = self.cfg
        if cfg.und_tower_kind == "qwen2_5_vl_vision":
            n = (cfg.und_image_size // cfg.und_tower.patch_size) ** 2
            return jnp.zeros((batch, n, cfg.und_tower.patch_dim), jnp.float32)
        return jnp.zeros((batch, cfg.und_image_size, cfg.und_image_size, 3), jnp.uint8)


registry.register(registry.Kind(
    name="blip3o",
    config_from_hf=lambda hf: config_from_hf("blip3o", hf),
    build=lambda cfg: build("blip3o", cfg),
    init_args=None,  # a composite: its converter checks each part against that part's kind
    converter="blip3o",
))
