"""The train step: one jitted function with explicit shardings, and everything needed to set it up.

    setup = make_train_step(config, mesh)
    state, frozen = setup.init(rng)                       # or restored from a checkpoint onto setup.state_shardings
    state, metrics = setup.step_fn(state, frozen, batch)  # batch laid out as setup.batch_shardings

`setup.abstract_state`, `setup.abstract_frozen` and `setup.abstract_batch` are the shapes (with shardings) of the
step's arguments, so the step can be lowered and compiled ahead of time (`setup.step_fn.lower(...)`) without
materialising anything.

Inside the step (no host synchronisation):
1. generation targets from the batch's uint8 images with the frozen encoder (outside the gradient), or read
   precomputed from the batch;
2. the loss of each micro-batch (gradient accumulation = a `lax.scan` over micro-batches): flow matching (or MSE) on
   the query states of text-to-image samples, plus next-token cross-entropy on text samples when trained jointly;
3. AdamW update of the trainable params only; a NaN/Inf guard keeps the old state when any gradient or the loss
   is not finite and counts the skipped steps;
4. metrics: loss, loss per σ bucket, gradient/update/parameter norms, learning rate.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blip3o_jax import sharding as shd
from blip3o_jax.models import blip3o as blip3o_lib
from blip3o_jax.models import layers
from blip3o_jax.training import optimizer as opt_lib

# task ids of a batch row (the data pipeline writes them; see blip3o_jax/data)
TASK_T2I, TASK_I2T, TASK_TEXT = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (): optimizer steps taken (skipped non-finite steps included)
    params: Any  # trainable params (fp32 master copies)
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw key; step k uses fold_in(rng, k), so a resumed run draws the same noise
    nonfinite_total: jax.Array  # int32 (): updates skipped because of NaN/Inf
    nonfinite_streak: jax.Array  # int32 (): consecutive skipped updates (the loop stops at a limit)
    ema_params: Any = None  # exponential moving average of `params` (config.train.ema_decay > 0), for sampling


# ---------------------------------------------------------------------------------------------------------------
# config -> model


def model_config(config) -> blip3o_lib.Blip3oConfig:
    """The model dataclass from `config.model` (a ConfigDict in our nested format).

    `model.query_path="auto"` becomes "prefix_cache" when the backbone is frozen and there is no text loss (the
    prompt runs once without its backward; exact, models/prefix_cache.py), "full" otherwise.
    """
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    train = config.get("train", {}) if hasattr(config, "get") else {}
    frozen = bool(train.get("freeze_backbone", True))
    text_loss = bool(train.get("text_loss_weight", 0.0))
    path = model.get("query_path", "auto")
    if path == "auto":
        model["query_path"] = "prefix_cache" if frozen and not text_loss else "full"
    elif path == "prefix_cache" and not frozen:
        raise ValueError("model.query_path='prefix_cache' needs a frozen backbone (train.freeze_backbone=True): the "
                         "prompt's K/V are constants there; use 'full' or 'auto'")
    return blip3o_lib.config_from_hf("blip3o", model)


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the global batch fields the step consumes, at the longest sequence bucket.

    Follows the data pipeline's schema (blip3o_jax/data/transforms.batch_schema); shorter buckets compile their own
    version of the step on first use.
    """
    d, m = config.data, config.model
    B, L = int(d.global_batch_size), max(int(n) for n in d.seq_buckets)
    tasks = {ds.get("task", "t2i") if hasattr(ds, "get") else "t2i" for ds in d.datasets} or {"t2i"}
    spec = {
        "input_ids": ((B, L), jnp.int32),
        "attention_mask": ((B, L), jnp.int32),
        "positions": ((B, L), jnp.int32),
        "task": ((B,), jnp.int32),
        "sample_valid": ((B,), jnp.int32),
    }
    if "t2i" in tasks:
        spec["query_index"] = ((B, int(m.n_query)), jnp.int32)
        if m.target == "precomputed":
            g, c = int(m.dit["input_size"]), int(m.dit["in_channels"])
            # as stored and read (data/targets.py): bfloat16 unless the targets were written in float32
            spec["targets"] = ((B, g, g, c), jnp.float32 if d.get("target_dtype") == "float32" else jnp.bfloat16)
        else:
            s = int(m.image_size)
            spec["gen_image"] = ((B, s, s, 3), jnp.uint8)
    if tasks & {"i2t", "text"}:
        spec["labels"] = ((B, L), jnp.int32)
        spec["loss_mask"] = ((B, L), jnp.int32)
    if "i2t" in tasks and m.get("und_tower_kind"):
        # the data pipeline's understanding inputs: Qwen2.5-VL patches (data/transforms.py batch_schema)
        side = int(d.und_image_size) // 14
        merge = 2
        spec["und_patches"] = ((B, side * side, 3 * 2 * 14 * 14), jnp.float32)
        spec["und_index"] = ((B, side * side // merge**2), jnp.int32)
        spec["mrope_positions"] = ((B, 3, L), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def _batch_shardings(spec, mesh):
    return {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}


def _init_inputs(mcfg: blip3o_lib.Blip3oConfig, batch: int = 1, seq_len: int | None = None):
    L = seq_len or mcfg.n_query + 2
    ids = jnp.zeros((batch, L), jnp.int32)
    query_index = jnp.broadcast_to(jnp.arange(L - mcfg.n_query, L, dtype=jnp.int32), (batch, mcfg.n_query))
    images = jnp.zeros((batch, mcfg.image_size, mcfg.image_size, 3), jnp.uint8)
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(L), (batch, L)), query_index, \
        jnp.ones((batch,), bool), images


# ---------------------------------------------------------------------------------------------------------------
# losses


def sigma_buckets(sigma, per_sample_loss, weight, num_buckets: int):
    """(sum of losses, count) per σ bucket [k/n, (k+1)/n): the flat overall loss hides where the model is learning."""
    bucket = jnp.clip((sigma * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
    onehot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.float32) * weight[:, None]
    return jnp.sum(onehot * per_sample_loss[:, None], axis=0), jnp.sum(onehot, axis=0)


def text_cross_entropy(logits, labels, loss_mask):
    """Next-token CE with the data's pre-shifted labels (labels[:, t] = input_ids[:, t + 1]).

    Returns (sum of token losses, number of tokens)."""
    mask = loss_mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_loss_fn(model: blip3o_lib.Blip3o, mcfg: blip3o_lib.Blip3oConfig, flow_cfg, *, text_loss_weight: float,
                 num_sigma_buckets: int):
    """loss_fn(params, batch, targets, rng) -> (loss, aux) on one (micro-)batch; `params` = all groups merged."""
    from blip3o_jax.diffusion import flow_matching

    compute_logits = bool(text_loss_weight)  # skip the LM head entirely for T2I-only training (reference §7.4)

    def loss_fn(params, batch, targets, rng):
        variables = {"params": params}
        valid = batch["sample_valid"].astype(jnp.float32)  # 0 on padding rows at the end of a finite epoch
        has_gen = "query_index" in batch  # a config without text-to-image data has no generation branch
        is_gen = (batch["task"] == TASK_T2I) & (valid > 0)
        und = {}
        positions = batch["positions"]
        if "und_index" in batch:  # image-to-text rows: understanding-tower tokens in the <|image_pad|> slots
            is_und = (batch["task"] == TASK_I2T) & (valid > 0)
            und = dict(und_inputs=batch["und_patches"] if "und_patches" in batch else batch["und_image"],
                       und_index=batch["und_index"], has_und=is_und)
        if "mrope_positions" in batch and mcfg.backbone.mrope_section is not None:
            positions = jnp.swapaxes(batch["mrope_positions"], 0, 1)  # (3, B, L): Qwen2.5-VL's 3-D positions
        query_states, logits = model.apply(
            variables, batch["input_ids"], batch["attention_mask"], positions,
            batch["query_index"] if has_gen else None, is_gen, compute_logits=compute_logits,
            method=blip3o_lib.Blip3o.encode, **und,
        )
        aux = {}
        if has_gen:
            gen_weight = is_gen.astype(jnp.float32)
            if mcfg.loss == "clip_fm":
                def velocity(dit_params, x_t, t, cond, cond_mask=None):
                    return model.apply({"params": {**params, "dit": dit_params}}, x_t, t, cond, cond_mask,
                                       method=blip3o_lib.Blip3o.velocity)

                _, fm = flow_matching.training_loss(velocity, params["dit"], targets, query_states, rng, flow_cfg)
                per_sample = fm["per_sample_loss"]
                aux["sigma_sum"], aux["sigma_count"] = sigma_buckets(fm["sigma"], per_sample, gen_weight,
                                                                     num_sigma_buckets)
            else:
                prediction = model.apply(variables, query_states, method=blip3o_lib.Blip3o.mse_prediction)
                per_sample = jnp.mean(jnp.square(prediction.astype(jnp.float32) - targets),
                                      axis=tuple(range(1, targets.ndim)))
            # sums, not means: micro-batches combine them exactly; normalised once by the global counts
            aux["gen_loss_sum"] = jnp.sum(per_sample * gen_weight)
            aux["gen_count"] = jnp.sum(gen_weight)
        if compute_logits:
            aux["text_loss_sum"], aux["text_tokens"] = text_cross_entropy(logits, batch["labels"], batch["loss_mask"])
        return aux

    return loss_fn


def _normalised_loss(aux, totals, text_loss_weight):
    """Loss of a micro-batch normalised by the *global-batch* counts, so summing micro-batch gradients is exact."""
    loss = jnp.zeros((), jnp.float32)
    if "gen_loss_sum" in aux:
        loss = aux["gen_loss_sum"] / jnp.maximum(totals["gen_count"], 1.0)
    if "text_loss_sum" in aux:
        loss = loss + text_loss_weight * aux["text_loss_sum"] / jnp.maximum(totals["text_tokens"], 1.0)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# set-up


@dataclasses.dataclass
class TrainSetup:
    config: Any
    mesh: Any
    model: blip3o_lib.Blip3o
    model_cfg: blip3o_lib.Blip3oConfig
    tx: optax.GradientTransformation
    schedule: Callable
    trainable_names: tuple[str, ...]
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    abstract_frozen: dict
    abstract_batch: dict
    state_shardings: TrainState
    frozen_shardings: dict
    batch_shardings: dict
    step_fn: Callable  # jitted (state, frozen, batch) -> (state, metrics); state donated
    init: Callable  # rng -> (state, frozen), sharded
    targets_fn: Callable  # jitted (all params, batch) -> target grid; for tests/tools
    loss_fn: Callable  # (params, batch, targets, rng) -> aux sums (un-jitted)
    abstract_params_boxed: dict  # all groups, with logical axis metadata (for FLOP counts and converters)

    def split(self, params):
        return opt_lib.split_params(params, self.config.train.freeze_backbone)


def plain_unbox(tree):
    """Drops the logical-axis boxes without sharding constraints (placement comes from explicit shardings)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _dtype_policy(config, tree, trainable: bool):
    """Trainable params: fp32 masters. Frozen params: `config.train.frozen_param_dtype` (bf16 on accelerators)."""
    dtype = layers.to_dtype("float32" if trainable else config.train.get("frozen_param_dtype", "float32"))
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(config, mesh) -> TrainSetup:
    from blip3o_jax.diffusion import flow_matching

    mcfg = model_config(config)
    model = blip3o_lib.build("blip3o", mcfg)
    tcfg = config.train
    tx, schedule = opt_lib.make_optimizer(tcfg)
    flow_cfg = flow_matching.FlowMatchingConfig(**dict(config.get("flow", {})))
    text_loss_weight = float(tcfg.get("text_loss_weight", 0.0))
    num_buckets = int(config.get("log", {}).get("sigma_buckets", 5))
    accum = int(tcfg.get("grad_accum_steps", 1))
    loss_fn = make_loss_fn(model, mcfg, flow_cfg, text_loss_weight=text_loss_weight, num_sigma_buckets=num_buckets)

    # --- abstract params and their shardings (logical names from the modules -> mesh axes)
    init_args = _init_inputs(mcfg)
    boxed = jax.eval_shape(lambda r: model.init(r, *init_args)["params"], jax.random.key(0))
    trainable_names = opt_lib.trainable_groups(boxed.keys(), tcfg.freeze_backbone)
    boxed_trainable = {k: v for k, v in boxed.items() if k in trainable_names}
    boxed_frozen = {k: v for k, v in boxed.items() if k not in trainable_names}
    with jax.set_mesh(mesh):
        trainable_sh = shd.params_shardings(boxed_trainable, mesh)
        frozen_sh = shd.params_shardings(boxed_frozen, mesh)
        # optimizer state mirrors the params: derive its shardings from the boxed tree (as maxtext does)
        boxed_opt = jax.eval_shape(tx.init, boxed_trainable)
        opt_sh = shd.params_shardings(boxed_opt, mesh)
    replicated = NamedSharding(mesh, P())
    ema_decay = float(tcfg.get("ema_decay", 0.0))
    state_sh = TrainState(step=replicated, params=trainable_sh, opt_state=opt_sh, rng=replicated,
                          nonfinite_total=replicated, nonfinite_streak=replicated,
                          ema_params=trainable_sh if ema_decay else None)
    spec = batch_spec(config)
    batch_sh = _batch_shardings(spec, mesh)

    unboxed = plain_unbox(boxed)

    def _abs(tree, shardings, dtype_fn=lambda d: d):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype_fn(x.dtype), sharding=s), tree, shardings)

    frozen_dtype = layers.to_dtype(tcfg.get("frozen_param_dtype", "float32"))
    abstract_frozen = _abs({k: unboxed[k] for k in boxed_frozen}, frozen_sh,
                           lambda d: frozen_dtype if jnp.issubdtype(d, jnp.floating) else d)
    abstract_trainable = _abs({k: unboxed[k] for k in trainable_names}, trainable_sh,
                              lambda d: jnp.float32 if jnp.issubdtype(d, jnp.floating) else d)
    abstract_opt = _abs(plain_unbox(boxed_opt), opt_sh)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=replicated)  # noqa: E731
    abstract_state = TrainState(step=scalar(jnp.int32), params=abstract_trainable, opt_state=abstract_opt,
                                rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                                nonfinite_total=scalar(jnp.int32), nonfinite_streak=scalar(jnp.int32),
                                ema_params=abstract_trainable if ema_decay else None)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}

    # --- init (directly sharded: nothing is materialised on one device)
    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = plain_unbox(model.init(init_rng, *init_args)["params"])
        trainable = _dtype_policy(config, {k: params[k] for k in trainable_names}, True)
        frozen = _dtype_policy(config, {k: v for k, v in params.items() if k not in trainable_names}, False)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                           rng=jax.random.key_data(state_rng), nonfinite_total=jnp.zeros((), jnp.int32),
                           nonfinite_streak=jnp.zeros((), jnp.int32),
                           ema_params=jax.tree.map(jnp.copy, trainable) if ema_decay else None)
        return state, frozen

    # --- targets: frozen encoder, no gradient (the step never differentiates through this)
    def targets_fn(params, batch):
        """params: all groups (the module's setup declares latent_queries, so it must be present)."""
        if mcfg.target == "precomputed":
            return batch["targets"].astype(jnp.float32)
        return jax.lax.stop_gradient(model.apply({"params": params}, batch["gen_image"],
                                                 method=blip3o_lib.Blip3o.targets))

    # --- the step
    def train_step(state: TrainState, frozen, batch):
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        has_gen = "query_index" in batch
        targets = targets_fn(opt_lib.merge_params(state.params, frozen), batch) if has_gen else None
        is_gen = ((batch["task"] == TASK_T2I) & (batch["sample_valid"] > 0)).astype(jnp.float32)
        totals = {"gen_count": jnp.sum(is_gen) if has_gen else jnp.zeros((), jnp.float32)}
        if text_loss_weight:
            totals["text_tokens"] = jnp.sum(batch["loss_mask"].astype(jnp.float32))

        def micro_loss(trainable, micro_batch, micro_targets, rng):
            aux = loss_fn(opt_lib.merge_params(trainable, frozen), micro_batch, micro_targets, rng)
            return _normalised_loss(aux, totals, text_loss_weight), aux

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, targets, step_rng)
        else:
            split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731
            micro = jax.tree.map(split, (batch, targets))
            rngs = jax.random.split(step_rng, accum)

            def body(carry, xs):
                (mb, mt), r = xs
                (l, a), g = grad_fn(state.params, mb, mt, r)
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda: grad_fn(state.params, first[0], first[1], rngs[0]))
            zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
            (loss, aux, grads), _ = jax.lax.scan(body, zero, (micro, rngs))

        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        # skip the update when the loss, the gradients or the update itself (overflow) is not finite
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=state.rng,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            ema_params=None if state.ema_params is None else keep(
                jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_params),
                state.ema_params),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(new_state.params),
            "lr": schedule(state.step),
            "gen_samples": totals["gen_count"],
            "nonfinite_total": new_state.nonfinite_total,
            "nonfinite_streak": new_state.nonfinite_streak,
        }
        if has_gen:
            metrics["gen_loss"] = aux["gen_loss_sum"] / jnp.maximum(totals["gen_count"], 1.0)
        if text_loss_weight:
            metrics["text_loss"] = aux["text_loss_sum"] / jnp.maximum(totals["text_tokens"], 1.0)
        if "sigma_sum" in aux:
            metrics["sigma_sum"], metrics["sigma_count"] = aux["sigma_sum"], aux["sigma_count"]
        return new_state, metrics

    with jax.set_mesh(mesh):
        step_fn = jax.jit(
            train_step,
            in_shardings=(state_sh, frozen_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
        )
        init_fn = jax.jit(init, out_shardings=(state_sh, frozen_sh))
        targets_jit = jax.jit(targets_fn)

    def run_init(rng):
        with jax.set_mesh(mesh), shd.axis_rules():
            return init_fn(rng)

    def run_step(state, frozen, batch):
        with jax.set_mesh(mesh), shd.axis_rules():
            return step_fn(state, frozen, batch)

    run_step.lower = lambda *a: _lower(step_fn, mesh, *a)  # AOT: setup.step_fn.lower(abstract args).compile()

    return TrainSetup(
        config=config, mesh=mesh, model=model, model_cfg=mcfg, tx=tx, schedule=schedule,
        trainable_names=trainable_names, abstract_state=abstract_state, abstract_frozen=abstract_frozen,
        abstract_batch=abstract_batch, state_shardings=state_sh, frozen_shardings=frozen_sh,
        batch_shardings=batch_sh, step_fn=run_step, init=run_init, targets_fn=targets_jit, loss_fn=loss_fn,
        abstract_params_boxed=boxed,
    )


def _lower(fn, mesh, *args):
    with jax.set_mesh(mesh), shd.axis_rules():
        return fn.lower(*args)
