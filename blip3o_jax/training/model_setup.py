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

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def model_setup(config, mesh) -> ModelSetup:
    """The module of `config.model`, its abstract params and their shardings on `mesh` (logical axis names of the
    modules -> mesh axes); trainable groups as fp32 masters, frozen ones in `train.frozen_param_dtype`."""
    mcfg = model_config(config)
    model = blip3o_lib.build("blip3o", mcfg)
    boxed = jax.eval_shape(lambda r: model.init(r, *init_inputs(mcfg))["params"], jax.random.key(0))
    trainable_names = opt_lib.trainable_groups(boxed.keys(), bool(defaults.option(config, "train.freeze_backbone")))
    boxed_trainable = {k: v for k, v in boxed.items() if k in trainable_names}
    boxed_frozen = {k: v for k, v in boxed.items() if k not in trainable_names}
    with jax.set_mesh(mesh):
        trainable_sh = shd.params_shardings(boxed_trainable, mesh)
        frozen_sh = shd.params_shardings(boxed_frozen, mesh)
    unboxed = plain_unbox(boxed)
    return ModelSetup(
        config=config, mesh=mesh, model=model, model_cfg=mcfg, trainable_names=trainable_names,
        abstract_params_boxed=boxed,
        abstract_trainable=_abstract({k: unboxed[k] for k in trainable_names}, trainable_sh, jnp.float32),
        abstract_frozen=_abstract({k: unboxed[k] for k in boxed_frozen}, frozen_sh, param_dtype(config, False)),
        trainable_shardings=trainable_sh, frozen_shardings=frozen_sh,
    )

