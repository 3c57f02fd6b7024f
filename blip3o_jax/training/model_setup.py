"""The model of a training config, without its train step: module, model config, abstract params and shardings.

    ms = model_setup(config, mesh)
    ms.abstract_trainable, ms.abstract_frozen     # {group: ShapeDtypeStructs with shardings}: nothing allocated
    trainable, frozen = ms.init(rng)              # the params a run starts from, directly sharded

The trainer builds its step on this (training/step.py); sampling (`sampling.load_trained`) and target
precomputation (`blip3o_jax/precompute.py`) use it alone, so an inference path never builds an optimizer step to
learn parameter shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax import sharding as shd
from blip3o_jax.models import blip3o as blip3o_lib
from blip3o_jax.models import layers
from blip3o_jax.training import defaults
from blip3o_jax.training import optimizer as opt_lib


def model_config(config) -> blip3o_lib.Blip3oConfig:
    """The model dataclass from `config.model` (a ConfigDict in our nested format).

    `model.query_path="auto"` becomes "prefix_cache" when the backbone is frozen and there is no text loss (the
    prompt runs once without its backward; exact, models/prefix_cache.py), "full" otherwise.
    """
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    frozen = bool(defaults.option(config, "train.freeze_backbone"))
    text_loss = bool(defaults.option(config, "train.text_loss_weight"))
    path = model.get("query_path", "auto")
    if path == "auto":
        model["query_path"] = "prefix_cache" if frozen and not text_loss else "full"
    elif path == "prefix_cache" and not frozen:
        raise ValueError("model.query_path='prefix_cache' needs a frozen backbone (train.freeze_backbone=True): the "
                         "prompt's K/V are constants there; use 'full' or 'auto'")
    return blip3o_lib.config_from_hf("blip3o", model)


def flow_config(config):
    """The flow-matching settings of `config.flow` (training noise, sampler steps, guidance)."""
    from blip3o_jax.diffusion import flow_matching

    return flow_matching.FlowMatchingConfig(**dict(config.get("flow", {})))


def plain_unbox(tree):
    """Drops the logical-axis boxes without sharding constraints (placement comes from explicit shardings)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_inputs(mcfg: blip3o_lib.Blip3oConfig, batch: int = 1, seq_len: int | None = None):
    """Positional inputs of `Blip3o.init`: small zeros that reach every parameter group."""
    L = seq_len or mcfg.n_query + 2
    ids = jnp.zeros((batch, L), jnp.int32)
    query_index = jnp.broadcast_to(jnp.arange(L - mcfg.n_query, L, dtype=jnp.int32), (batch, mcfg.n_query))
    images = jnp.zeros((batch, mcfg.image_size, mcfg.image_size, 3), jnp.uint8)
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(L), (batch, L)), query_index, \
        jnp.ones((batch,), bool), images


def param_dtype(config, trainable: bool):
    """Trainable params: fp32 masters. Frozen params: `config.train.frozen_param_dtype` (bf16 on accelerators)."""
    return layers.to_dtype("float32" if trainable else defaults.option(config, "train.frozen_param_dtype"))


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)



def _param_layout(config, mesh, boxed, trainable_names) -> dict:
    """The setup's parameter fields: the boxed abstract params split into trainable (fp32) and frozen groups, with
    their shardings on `mesh`."""
    boxed_trainable = {k: v for k, v in boxed.items() if k in trainable_names}
    boxed_frozen = {k: v for k, v in boxed.items() if k not in trainable_names}
    with jax.set_mesh(mesh):
        trainable_sh = shd.params_shardings(boxed_trainable, mesh)
        frozen_sh = shd.params_shardings(boxed_frozen, mesh)
    unboxed = plain_unbox(boxed)
    return dict(
        trainable_names=trainable_names, abstract_params_boxed=boxed,
        abstract_trainable=_abstract({k: unboxed[k] for k in trainable_names}, trainable_sh, jnp.float32),
        abstract_frozen=_abstract({k: unboxed[k] for k in boxed_frozen}, frozen_sh, param_dtype(config, False)),
        trainable_shardings=trainable_sh, frozen_shardings=frozen_sh,
    )

def _abstract(tree, shardings, dtype):
    """ShapeDtypeStructs of `tree` with `shardings`; floating leaves take `dtype`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class ModelSetup:
    config: Any
    mesh: Any
    model: blip3o_lib.Blip3o
    model_cfg: blip3o_lib.Blip3oConfig
    trainable_names: tuple[str, ...]
    abstract_params_boxed: dict  # all groups, with logical axis metadata (optimizer shardings, FLOP counts)
    abstract_trainable: dict  # fp32 ShapeDtypeStructs with shardings
    abstract_frozen: dict  # in config.train.frozen_param_dtype, with shardings
    trainable_shardings: dict
    frozen_shardings: dict

    @property
    def abstract_params(self) -> dict:
        """Every group (trainable and frozen), as the model's params tree."""
        return {**self.abstract_frozen, **self.abstract_trainable}

    def init_params(self, rng) -> tuple[dict, dict]:
        """(trainable, frozen): the params a run seeded with `rng` starts from, in their dtypes (a pure function:
        call it under jit). The first half of `split(rng)` initialises the params, the second the train state."""
        init_rng, _ = jax.random.split(rng)
        params = plain_unbox(self.model.init(init_rng, *init_inputs(self.model_cfg))["params"])
        trainable = _cast_floating({k: params[k] for k in self.trainable_names}, param_dtype(self.config, True))
        frozen = _cast_floating({k: v for k, v in params.items() if k not in self.trainable_names},
                                param_dtype(self.config, False))
        return trainable, frozen

    def init(self, rng) -> tuple[dict, dict]:
        """`init_params`, jitted and directly sharded (nothing is materialised on one device)."""
        with jax.set_mesh(self.mesh), shd.axis_rules():
            fn = jax.jit(self.init_params, out_shardings=(self.trainable_shardings, self.frozen_shardings))
            return fn(rng)

    def targets(self, params, batch):
        """The generation target grid of a batch: read from it (precomputed) or computed by the frozen encoder
        from its uint8 images, outside any gradient. `params`: all groups (the module's setup declares
        latent_queries, so it must be present)."""
        if self.model_cfg.target == "precomputed":
            return batch["targets"].astype(jnp.float32)
        return jax.lax.stop_gradient(self.model.apply({"params": params}, batch["gen_image"],
                                                      method=blip3o_lib.Blip3o.targets))

    def split(self, params):
        return opt_lib.split_params(params, bool(defaults.option(self.config, "train.freeze_backbone")))

    def train_flops_per_sample(self) -> dict[str, float]:
        """Analytic training FLOPs per sample of each part (training/metrics.py), at the longest sequence bucket."""
        from blip3o_jax.training import metrics as metrics_lib

        return metrics_lib.train_flops_per_sample(
            self.model_cfg, seq_len=max(int(n) for n in self.config.data.seq_buckets), trainable=self.trainable_names,
            text_loss=bool(defaults.option(self.config, "train.text_loss_weight")))


def model_setup(config, mesh) -> ModelSetup:
    """The module of `config.model`, its abstract params and their shardings on `mesh` (logical axis names of the
    modules -> mesh axes); trainable groups as fp32 masters, frozen ones in `train.frozen_param_dtype`.
    `config.model.kind="sana_decoder"` gives a `SanaDecoderSetup` (the SigLIP2 -> SANA decoder recipe)."""
    if model_kind(config) == "sana_decoder":
        return sana_decoder_setup(config, mesh)
    mcfg = model_config(config)
    model = blip3o_lib.build("blip3o", mcfg)
    boxed = jax.eval_shape(lambda r: model.init(r, *init_inputs(mcfg))["params"], jax.random.key(0))
    trainable_names = opt_lib.trainable_groups(boxed.keys(), bool(defaults.option(config, "train.freeze_backbone")))
    return ModelSetup(config=config, mesh=mesh, model=model, model_cfg=mcfg,
                      **_param_layout(config, mesh, boxed, trainable_names))



# ---------------------------------------------------------------------------------------------------------------
# model.kind = "sana_decoder": the SigLIP2 -> SANA image decoder (the original's Reconstruction branch)

MODEL_KINDS = ("blip3o", "sana_decoder")
SANA_GROUPS = {"encoder": "siglip_vision", "connector": "sana_connector", "transformer": "sana",
               "vae": "autoencoder_dc"}  # param group -> model kind (the folders of a SANA decoder directory)
SANA_TRAINABLE = ("connector", "transformer")  # the SigLIP2 tower and the DC-AE stay frozen, as the original
SANA_TARGETS = ("dc_ae",)  # DC-AE latents computed in the step


def model_kind(config) -> str:
    """`config.model.kind`: "blip3o" (default) or "sana_decoder"."""
    kind = config.model.get("kind", "blip3o") if hasattr(config.model, "get") else "blip3o"
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r}; expected one of {MODEL_KINDS}")
    return kind


@dataclasses.dataclass(frozen=True)
class SanaDecoderConfig:
    """The four parts of the SigLIP2 -> SANA decoder and how the recipe feeds them (one `image_size` crop is both
    the SigLIP input and the DC-AE target, as the original's Resize + CenterCrop of the same image)."""

    encoder: Any  # models.siglip.SiglipVisionConfig, output_layer "penultimate" (hidden_states[-2])
    connector: Any  # models.sana_connector.SanaConnectorConfig
    transformer: Any  # models.sana.SanaConfig
    vae: Any  # models.autoencoder_dc.AutoencoderDCConfig (its scaling_factor / shift_factor scale the latents)
    image_size: int = 512
    target: str = "dc_ae"

    def __post_init__(self):
        enc, conn, sana, dc = self.encoder, self.connector, self.transformer, self.vae
        f = dc.spatial_compression_ratio
        checks = [
            (self.target in SANA_TARGETS, f"model.target={self.target!r}; the SANA decoder recipe supports "
                                          f"{SANA_TARGETS} (DC-AE latents computed in the step)"),
            (enc.image_size == self.image_size, f"model.encoder.image_size={enc.image_size} but model.image_size="
                                                f"{self.image_size}: the same crop feeds SigLIP and the DC-AE"),
            (conn.input_dim == enc.hidden_size, f"model.connector.input_dim={conn.input_dim} does not match the "
                                                f"SigLIP width model.encoder.hidden_size={enc.hidden_size}"),
            (conn.output_dim == sana.caption_channels, f"model.connector.output_dim={conn.output_dim} does not "
                                                       f"match model.transformer.caption_channels="
                                                       f"{sana.caption_channels}"),
            (sana.in_channels == (sana.out_channels or sana.in_channels) == dc.latent_channels,
             f"model.transformer in/out channels {sana.in_channels}/{sana.out_channels} do not match "
             f"model.vae.latent_channels={dc.latent_channels}"),
            (self.image_size % f == 0, f"model.image_size={self.image_size} is not a multiple of the DC-AE's "
                                       f"spatial compression ratio {f}"),
            ((self.image_size // f) % sana.patch_size == 0, f"the latent side {self.image_size // f} is not a "
                                                            f"multiple of model.transformer.patch_size="
                                                            f"{sana.patch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.vae.spatial_compression_ratio
        return side, side, self.vae.latent_channels


def sana_decoder_config(config) -> SanaDecoderConfig:
    """SanaDecoderConfig from `config.model` (`encoder`, `connector`, `transformer`, `vae`: config.json dicts of
    the four kinds, plus our policy fields; `image_size`; `target`); ValueError naming the bad value."""
    from blip3o_jax import models

    m = config.model
    parts = {}
    for group, kind in SANA_GROUPS.items():
        if m.get(group) is None:
            raise ValueError(f"config.model.{group} is missing: the {kind} config of the SANA decoder")
        hf = m[group].to_dict() if hasattr(m[group], "to_dict") else dict(m[group])
        if group == "encoder":
            hf["output_layer"] = "penultimate"  # the original trains on hidden_states[-2]
        try:
            parts[group] = models.config_from_hf(kind, hf)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.model.{group}: {e}") from None
    return SanaDecoderConfig(**parts, image_size=int(m.get("image_size", 512)), target=m.get("target", "dc_ae"))


def _sana_pixels(images_uint8):
    """uint8 -> [-1, 1]: the original's ToDtype(scale=True) + Normalize(0.5, 0.5) (the DC-AE input) and
    SiglipImageProcessor's rescale + normalize (mean = std = 0.5) alike."""
    from blip3o_jax import preprocessing

    return preprocessing.normalize(images_uint8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class SanaDecoderModel(nn.Module):
    """The decoder's four modules as one params tree {encoder, connector, transformer, vae}, with the pieces of
    the train step as methods (`__call__` touches every parameter, for init)."""

    cfg: SanaDecoderConfig

    def setup(self):
        from blip3o_jax import models

        cfg = self.cfg
        self.encoder = models.build("siglip_vision", cfg.encoder)
        self.connector = models.build("sana_connector", cfg.connector)
        self.transformer = models.build("sana", cfg.transformer)
        self.vae = models.build("autoencoder_dc", cfg.vae)

    def latents(self, images_uint8):
        """(B, S, S, 3) uint8 -> (B, S/f, S/f, C) float32: `(encode(x) - shift_factor) * scaling_factor`, as the
        original's `DiffusionDecoder.forward` (DC-AE f32c32: no shift, 0.41407)."""
        dc = self.cfg.vae
        z = self.vae.encode(_sana_pixels(images_uint8)).astype(jnp.float32)
        return (z - (dc.shift_factor or 0.0)) * dc.scaling_factor

    def features(self, images_uint8):
        """(B, S, S, 3) uint8 -> (B, n*n, W) SigLIP hidden_states[-2] (before the connector's pooling)."""
        return self.encoder(_sana_pixels(images_uint8))

    def condition(self, features):
        """(B, n*n, W) -> (B, num_pooled_tokens, caption_channels): pooled, then the trained connector."""
        return self.connector(features)

    def velocity(self, noisy_latents, timesteps, condition):
        return self.transformer(noisy_latents, timesteps, condition)

    def __call__(self, images_uint8):
        pixels = _sana_pixels(images_uint8)
        latents = self.vae.encode(pixels)
        self.vae.decode(latents)
        cond = self.condition(self.encoder(pixels))
        return self.velocity(latents, jnp.zeros((latents.shape[0],), jnp.float32), cond)


@dataclasses.dataclass
class SanaDecoderSetup(ModelSetup):
    """`ModelSetup` of a SANA decoder run: trainable {connector, transformer}, frozen {encoder, vae}."""

    def init_params(self, rng) -> tuple[dict, dict]:
        init_rng, _ = jax.random.split(rng)
        s = self.model_cfg.image_size
        params = plain_unbox(self.model.init(init_rng, jnp.zeros((1, s, s, 3), jnp.uint8))["params"])
        trainable, frozen = self.split(params)
        return (_cast_floating(trainable, param_dtype(self.config, True)),
                _cast_floating(frozen, param_dtype(self.config, False)))

    def split(self, params):
        trainable = {k: v for k, v in params.items() if k in self.trainable_names}
        return trainable, {k: v for k, v in params.items() if k not in self.trainable_names}

    def targets(self, params, batch):
        """The DC-AE latents of the batch's uint8 images, outside any gradient."""
        return jax.lax.stop_gradient(self.model.apply({"params": params}, batch["gen_image"],
                                                      method=SanaDecoderModel.latents))

    def conditions(self, params, images_uint8, null):
        """SigLIP features (B, n*n, W) of the images, with the rows where `null` (B,) bool is set taken from an
        all-black image instead: the original's black-image null condition (`i2i_process_fn` swaps the source
        image for `PIL.Image.new("RGB", size)` before the SigLIP transform), outside any gradient."""
        sources = jnp.where(null[:, None, None, None], jnp.zeros_like(images_uint8), images_uint8)
        return jax.lax.stop_gradient(self.model.apply({"params": params}, sources,
                                                      method=SanaDecoderModel.features))

    def train_flops_per_sample(self) -> dict[str, float]:
        """XLA's FLOP count of one sample, each part lowered on its own with its layers unrolled (a scanned loop
        body would count once): forward + backward (3x forward) of the connector and SANA, forward only of SigLIP
        and the DC-AE encoder."""
        from blip3o_jax import models

        cfg = self.model_cfg
        s = cfg.image_size
        captions = jnp.zeros((1, max(cfg.connector.num_pooled_tokens, 1), cfg.transformer.caption_channels))
        inputs = {  # group -> (example inputs, method)
            "encoder": ((jnp.zeros((1, s, s, 3)),), None),
            "vae": ((jnp.zeros((1, s, s, 3)),), "encode"),
            "connector": ((jnp.zeros((1, cfg.encoder.num_patches, cfg.encoder.hidden_size)),), None),
            "transformer": ((jnp.zeros((1, *cfg.latent_shape)), jnp.zeros((1,)), captions), None),
        }
        out = {}
        for group, kind in SANA_GROUPS.items():
            part_cfg = getattr(cfg, group)
            if hasattr(part_cfg, "scan_layers"):
                part_cfg = dataclasses.replace(part_cfg, scan_layers=False)
            module = models.build(kind, part_cfg)
            args, method = inputs[group]
            params = plain_unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, method=method)))
            fn = jax.jit(lambda p, *a: module.apply(p, *a, method=method))
            cost = fn.lower(params, *args).cost_analysis() or {}
            out[group] = float(cost.get("flops", 0.0)) * (3 if group in self.trainable_names else 1)
        out["total"] = float(sum(out.values()))
        return out


def sana_decoder_setup(config, mesh) -> SanaDecoderSetup:
    """`model_setup` of `config.model.kind="sana_decoder"`."""
    mcfg = sana_decoder_config(config)
    model = SanaDecoderModel(mcfg)
    s = mcfg.image_size
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, s, s, 3), jnp.uint8))["params"], jax.random.key(0))
    trainable_names = tuple(k for k in boxed if k in SANA_TRAINABLE)
    return SanaDecoderSetup(config=config, mesh=mesh, model=model, model_cfg=mcfg,
                            **_param_layout(config, mesh, boxed, trainable_names))


def is_sana_decoder_dir(path: str) -> bool:
    """A SANA decoder folder (encoder/, connector/, transformer/, vae/: pipelines/sana_decoder.py's layout)."""
    import os

    return all(os.path.isdir(os.path.join(path, g)) for g in SANA_GROUPS)


def load_sana_group(ms: SanaDecoderSetup, group: str, path: str) -> dict:
    """The params of one group of a SANA decoder run from `path`: an upstream directory (config.json +
    safetensors, e.g. google/siglip2-so400m-patch16-512 or Sana_1600M_512px_diffusers/transformer) or
    convert_torch_weights.py output, in the run's layer layout and dtypes and on its shardings. A SigLIP tower
    with all its layers loses the last one and post_layernorm (hidden_states[-2] does not depend on them)."""
    from blip3o_jax import pretrained
    from blip3o_jax.pipelines import sana_decoder

    if group not in SANA_GROUPS:
        raise ValueError(f"config.init_from: group {group!r} is not a part of the SANA decoder; expected one of "
                         f"{sorted(SANA_GROUPS)}")
    module, params = pretrained.load_pretrained(path, kind=SANA_GROUPS[group])
    if group == "encoder":
        module, params = sana_decoder.penultimate_encoder(module, params)
    want = ms.abstract_params[group]
    moved = pretrained.relayout(jax.tree.map(np.asarray, params), want)
    have = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(moved).items()}
    for key, leaf in flax.traverse_util.flatten_dict(want).items():
        name = "/".join(key)
        if name not in have or tuple(have[name]) != tuple(leaf.shape):
            got = "missing" if name not in have else f"shape {tuple(have[name])}"
            raise ValueError(f"config.init_from: {path} does not fit config.model.{group}: param {name!r} is {got}, "
                             f"the model wants {tuple(leaf.shape)}")
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), moved, want)


def load_sana_init_from(ms: SanaDecoderSetup, entries) -> dict:
    """{group: params} of `config.init_from` entries [(group or None, path)]: `GROUP=DIR` loads one part; a bare
    DIR must be a whole SANA decoder folder (e.g. the released BLIP3o/SigLIP2_SANA) and loads every part."""
    import os

    loaded = {}
    for group, path in entries:
        if group is not None:
            loaded[group] = load_sana_group(ms, group, path)
        elif is_sana_decoder_dir(path):
            loaded.update({g: load_sana_group(ms, g, os.path.join(path, g)) for g in SANA_GROUPS})
        else:
            raise ValueError(f"config.init_from: {path} is not a SANA decoder folder ({', '.join(SANA_GROUPS)}); "
                             f"name the part it holds: GROUP={path} with GROUP one of {sorted(SANA_GROUPS)}")
    return loaded
