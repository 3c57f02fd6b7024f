"""The train step: one jitted function with explicit shardings, and everything needed to set it up.

    setup = make_train_step(config, mesh)
    state, frozen = setup.init(rng)                       # or restored from a checkpoint onto setup.state_shardings
    state, metrics = setup.step_fn(state, frozen, batch)  # batch laid out as setup.batch_shardings

`setup.abstract_state`, `setup.abstract_frozen` and `setup.abstract_batch` are the shapes (with shardings) of the
step's arguments, so the step can be lowered and compiled ahead of time (`setup.step_fn.lower(...)`) without
materialising anything. The model's part (module, params, shardings) is `setup.model_setup`
(training/model_setup.py), which inference uses on its own; the state layout is training/state.py.

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

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blip3o_jax import sharding as shd
from blip3o_jax.data import transforms
from blip3o_jax.models import blip3o as blip3o_lib
from blip3o_jax.training import defaults
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import optimizer as opt_lib
from blip3o_jax.training import state as state_lib
from blip3o_jax.training.state import TrainState

# task ids of a batch row (the data pipeline writes them: data/transforms.py)
TASK_T2I, TASK_I2T, TASK_TEXT = (transforms.TASKS[t] for t in ("t2i", "i2t", "text"))


# ---------------------------------------------------------------------------------------------------------------
# the batch


def batch_spec(config, mcfg: blip3o_lib.Blip3oConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the global batch fields the step consumes, at the longest sequence bucket.

    Derived from the data pipeline's schema (blip3o_jax/data/transforms.py `batch_schema`), with the model's query
    count, image size, target grid and understanding-tower patch geometry; shorter buckets compile their own
    version of the step on first use.
    """
    d = config.data
    tasks = {ds.get("task", "t2i") if hasattr(ds, "get") else "t2i" for ds in d.datasets} or {"t2i"}
    fields = dict(n_query=int(mcfg.n_query), gen_image_size=int(mcfg.image_size),
                  target_shape=tuple(mcfg.target_shape) if mcfg.target == "precomputed" else None)
    if mcfg.und_tower_kind == "qwen2_5_vl_vision":
        tower = mcfg.und_tower
        fields.update(und_patch_size=int(tower.patch_size), und_temporal_patch_size=int(tower.temporal_patch_size),
                      und_merge_size=int(tower.spatial_merge_size))
    tcfg = transforms.TransformConfig.from_data_config(d, **fields)
    schema = transforms.step_schema(tcfg, tasks, int(d.global_batch_size), seq_len=tcfg.max_seq_len,
                                    understanding=mcfg.und_tower_kind is not None)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in schema.items()}


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
    token_losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                   jnp.maximum(labels, 0))
    return jnp.sum(token_losses * mask), jnp.sum(mask)


def make_loss_fn(model: blip3o_lib.Blip3o, mcfg: blip3o_lib.Blip3oConfig, flow_cfg, *, text_loss_weight: float,
                 num_sigma_buckets: int):
    """loss_fn(params, batch, targets, rng) -> (loss, aux) on one (micro-)batch; `params` = all groups merged."""
    from blip3o_jax.diffusion import flow_matching, losses

    compute_logits = bool(text_loss_weight)  # skip the LM head entirely for T2I-only training

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
                per_sample = losses.per_sample_mse(prediction, targets)
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
# the step


def _gradients(grad_fn, params, batch, targets, rng, accum: int):
    """((loss, aux), grads) of the whole batch: one call, or a `lax.scan` over `accum` micro-batches whose losses,
    aux sums and gradients add up (each micro-batch loss is normalised by the global-batch counts)."""
    if accum == 1:
        return grad_fn(params, batch, targets, rng)
    split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731
    micro = jax.tree.map(split, (batch, targets))
    rngs = jax.random.split(rng, accum)

    def body(carry, xs):
        (mb, mt), r = xs
        (l, a), g = grad_fn(params, mb, mt, r)
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first[0], first[1], rngs[0]))
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, aux, grads), _ = jax.lax.scan(body, zero, (micro, rngs))
    return (loss, aux), grads


def _apply_update(state: TrainState, grads, loss, tx, ema_decay: float):
    """(new state, update norm, grad norm): AdamW on the trainable params; the old state is kept (and the skip
    counted) when the loss, the gradients or the update itself (overflow) is not finite."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
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
    return new_state, optax.tree.norm(updates), grad_norm


def make_step_fn(targets_fn, loss_fn, tx, schedule, *, text_loss_weight: float, accum: int, ema_decay: float):
    """The pure train step (state, frozen params, batch) -> (new state, metrics) (see the module docstring)."""

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
        (loss, aux), grads = _gradients(grad_fn, state.params, batch, targets, step_rng, accum)
        new_state, update_norm, grad_norm = _apply_update(state, grads, loss, tx, ema_decay)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
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

    return train_step


# ---------------------------------------------------------------------------------------------------------------
# set-up


@dataclasses.dataclass
class TrainSetup:
    config: Any
    mesh: Any
    model_setup: ms_lib.ModelSetup  # module, model config, abstract params and their shardings
    tx: optax.GradientTransformation
    schedule: Callable
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    abstract_batch: dict
    state_shardings: TrainState
    batch_shardings: dict
    step_fn: Callable  # jitted (state, frozen, batch) -> (state, metrics); state donated
    init: Callable  # rng -> (state, frozen), sharded
    targets_fn: Callable  # jitted (all params, batch) -> target grid; for tests/tools
    loss_fn: Callable  # (params, batch, targets, rng) -> aux sums (un-jitted)

    # the model's part, as `setup.<name>`
    model = property(lambda self: self.model_setup.model)
    model_cfg = property(lambda self: self.model_setup.model_cfg)
    trainable_names = property(lambda self: self.model_setup.trainable_names)
    abstract_frozen = property(lambda self: self.model_setup.abstract_frozen)
    frozen_shardings = property(lambda self: self.model_setup.frozen_shardings)
    abstract_params_boxed = property(lambda self: self.model_setup.abstract_params_boxed)
    abstract_params = property(lambda self: self.model_setup.abstract_params)

    def split(self, params):
        return self.model_setup.split(params)


def _jit_step(ms: ms_lib.ModelSetup, train_step, init, state_sh, batch_sh):
    """(step, init) jitted with explicit shardings, run under the mesh and the logical axis rules; the step also
    lowers ahead of time (`step.lower(abstract args).compile()`)."""
    mesh = ms.mesh
    with jax.set_mesh(mesh):
        step_fn = jax.jit(train_step, in_shardings=(state_sh, ms.frozen_shardings, batch_sh),
                          out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
        init_fn = jax.jit(init, out_shardings=(state_sh, ms.frozen_shardings))

    def run_init(rng):
        with jax.set_mesh(mesh), shd.axis_rules():
            return init_fn(rng)

    def run_step(state, frozen, batch):
        with jax.set_mesh(mesh), shd.axis_rules():
            return step_fn(state, frozen, batch)

    def lower(*args):
        with jax.set_mesh(mesh), shd.axis_rules():
            return step_fn.lower(*args)

    run_step.lower = lower
    return run_step, run_init


def make_train_step(config, mesh) -> TrainSetup:
    """The jitted train step of `config` on `mesh`, with its state layout and initialiser (module docstring)."""
    ms = ms_lib.model_setup(config, mesh)
    if isinstance(ms, ms_lib.SanaDecoderSetup):
        return make_sana_train_step(config, ms)
    tx, schedule = opt_lib.make_optimizer(config.train)
    text_loss_weight = float(defaults.option(config, "train.text_loss_weight"))
    ema_decay = float(defaults.option(config, "train.ema_decay"))
    loss_fn = make_loss_fn(ms.model, ms.model_cfg, ms_lib.flow_config(config), text_loss_weight=text_loss_weight,
                           num_sigma_buckets=int(defaults.option(config, "log.sigma_buckets")))
    abstract_state, state_sh = state_lib.layout(ms, tx, ema=bool(ema_decay))
    spec = batch_spec(config, ms.model_cfg)
    batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}

    def init(rng):  # (state, frozen), directly sharded: nothing is materialised on one device
        trainable, frozen = ms.init_params(rng)
        _, state_rng = jax.random.split(rng)
        return state_lib.fresh(trainable, tx, state_rng, ema=bool(ema_decay)), frozen

    train_step = make_step_fn(ms.targets, loss_fn, tx, schedule, text_loss_weight=text_loss_weight,
                              accum=int(defaults.option(config, "train.grad_accum_steps")), ema_decay=ema_decay)
    step_fn, init_fn = _jit_step(ms, train_step, init, state_sh, batch_sh)
    return TrainSetup(
        config=config, mesh=mesh, model_setup=ms, tx=tx, schedule=schedule, abstract_state=abstract_state,
        abstract_batch=abstract_batch, state_shardings=state_sh, batch_shardings=batch_sh, step_fn=step_fn,
        init=init_fn, targets_fn=jax.jit(ms.targets), loss_fn=loss_fn,
    )


# ---------------------------------------------------------------------------------------------------------------
# model.kind = "sana_decoder": the SigLIP2 -> SANA decoder's recipe (the original's Reconstruction branch,
# `train_image_reconstruction.py` `DiffusionDecoder.forward` and `i2i_process_fn`)
#
# Per sample: the target crop's DC-AE latents x0 = (encode(image) - shift) * scaling_factor; with probability
# `flow.cond_drop_prob` (0.1) the SigLIP input is an all-black image instead of the image (the null condition CFG
# samples with); σ uniform over the 1000-entry table of diffusers' FlowMatchEulerDiscreteScheduler (weighting
# "uniform"; SANA's scheduler config loaded into that class has shift 1); x_t = (1 - σ) x0 + σ ε; SANA sees
# timestep 1000·σ (float) and the connector's tokens; loss = mean over elements of (v - (ε - x0))², mean over the
# batch. SigLIP and the DC-AE run outside the gradient; the connector and SANA are trained.


def sana_batch_spec(config, mcfg) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch fields the SANA decoder step consumes: the uint8 crop (B, S, S, 3) and the row validity."""
    d = config.data
    tcfg = transforms.TransformConfig.from_data_config(d, gen_image_size=int(mcfg.image_size))
    schema = transforms.step_schema(tcfg, {"t2i"}, int(d.global_batch_size), seq_len=tcfg.max_seq_len,
                                    understanding=False)
    return {k: jax.ShapeDtypeStruct(*schema[k]) for k in ("gen_image", "sample_valid")}


def sana_step_rngs(state_rng, step):
    """(null-condition key, loss key) of a step: both from fold_in(state rng, step), so a resumed run draws the
    same null rows, timesteps and noise."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)
    return tuple(jax.random.split(step_rng))


def sana_null_mask(null_rng, batch: int, prob: float):
    """(B,) bool: the rows whose SigLIP input is the black image (the original: `torch.rand(...) <= 0.1`)."""
    return jax.random.bernoulli(null_rng, prob, (batch,))


def make_sana_loss_fn(model, flow_cfg, *, num_sigma_buckets: int):
    """loss_fn(params, batch, targets, rng) -> aux sums; targets = {"latents": x0, "features": SigLIP features}."""
    from blip3o_jax.diffusion import flow_matching

    def loss_fn(params, batch, targets, rng):
        x0 = targets["latents"].astype(jnp.float32)  # (B, h, w, C)
        valid = (batch["sample_valid"] > 0).astype(jnp.float32)
        t_rng, noise_rng = jax.random.split(rng)
        sigma, timestep = flow_matching.sample_timesteps(t_rng, x0.shape[0], flow_cfg)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        s = sigma[:, None, None, None]
        noisy = (1.0 - s) * x0 + s * noise
        variables = {"params": params}
        condition = model.apply(variables, targets["features"], method=ms_lib.SanaDecoderModel.condition)
        velocity = model.apply(variables, noisy, timestep, condition, method=ms_lib.SanaDecoderModel.velocity)
        err = jnp.square(velocity.astype(jnp.float32) - (noise - x0))
        per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
        sigma_sum, sigma_count = sigma_buckets(sigma, per_sample, valid, num_sigma_buckets)
        return {"loss_sum": jnp.sum(per_sample * valid), "sigma_sum": sigma_sum, "sigma_count": sigma_count}

    return loss_fn


def make_sana_step_fn(ms, loss_fn, tx, schedule, *, null_prob: float, accum: int, ema_decay: float):
    """The pure SANA decoder train step (state, frozen params, batch) -> (new state, metrics)."""

    def train_step(state: TrainState, frozen, batch):
        null_rng, loss_rng = sana_step_rngs(state.rng, state.step)
        valid = batch["sample_valid"] > 0
        null = sana_null_mask(null_rng, valid.shape[0], null_prob)
        params = opt_lib.merge_params(state.params, frozen)
        targets = {"latents": ms.targets(params, batch),
                   "features": ms.conditions(params, batch["gen_image"], null)}
        count = jnp.sum(valid.astype(jnp.float32))

        def micro_loss(trainable, micro_batch, micro_targets, rng):
            aux = loss_fn(opt_lib.merge_params(trainable, frozen), micro_batch, micro_targets, rng)
            return aux["loss_sum"] / jnp.maximum(count, 1.0), aux

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        (loss, aux), grads = _gradients(grad_fn, state.params, batch, targets, loss_rng, accum)
        new_state, update_norm, grad_norm = _apply_update(state, grads, loss, tx, ema_decay)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "param_norm": optax.tree.norm(new_state.params),
            "lr": schedule(state.step),
            "gen_samples": count,
            "null_samples": jnp.sum((null & valid).astype(jnp.float32)),
            "nonfinite_total": new_state.nonfinite_total,
            "nonfinite_streak": new_state.nonfinite_streak,
            "sigma_sum": aux["sigma_sum"],
            "sigma_count": aux["sigma_count"],
        }
        return new_state, metrics

    return train_step


def make_sana_train_step(config, ms) -> TrainSetup:
    """`make_train_step` of a SANA decoder run (`ms`: training/model_setup.py `SanaDecoderSetup`)."""
    tx, schedule = opt_lib.make_optimizer(config.train)
    ema_decay = float(defaults.option(config, "train.ema_decay"))
    flow_cfg = ms_lib.flow_config(config)
    loss_fn = make_sana_loss_fn(ms.model, flow_cfg, num_sigma_buckets=int(defaults.option(config, "log.sigma_buckets")))
    abstract_state, state_sh = state_lib.layout(ms, tx, ema=bool(ema_decay))
    spec = sana_batch_spec(config, ms.model_cfg)
    mesh = ms.mesh
    batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}

    def init(rng):
        trainable, frozen = ms.init_params(rng)
        _, state_rng = jax.random.split(rng)
        return state_lib.fresh(trainable, tx, state_rng, ema=bool(ema_decay)), frozen

    train_step = make_sana_step_fn(ms, loss_fn, tx, schedule, null_prob=float(flow_cfg.cond_drop_prob),
                                   accum=int(defaults.option(config, "train.grad_accum_steps")), ema_decay=ema_decay)
    step_fn, init_fn = _jit_step(ms, train_step, init, state_sh, batch_sh)
    return TrainSetup(
        config=config, mesh=mesh, model_setup=ms, tx=tx, schedule=schedule, abstract_state=abstract_state,
        abstract_batch=abstract_batch, state_shardings=state_sh, batch_shardings=batch_sh, step_fn=step_fn,
        init=init_fn, targets_fn=jax.jit(ms.targets), loss_fn=loss_fn,
    )
