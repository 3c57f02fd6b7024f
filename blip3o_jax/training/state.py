"""The train state (what a checkpoint holds) and its layout: shapes, dtypes and shardings, derived without a step.

    abstract_state, state_shardings = layout(ms, tx, ema=True)   # ms: training/model_setup.ModelSetup
    state = fresh(trainable_params, tx, state_rng, ema=True)
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blip3o_jax import sharding as shd
from blip3o_jax.training import model_setup as ms_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (): optimizer steps taken (skipped non-finite steps included)
    params: Any  # trainable params (fp32 master copies)
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw key; step k uses fold_in(rng, k), so a resumed run draws the same noise
    nonfinite_total: jax.Array  # int32 (): updates skipped because of NaN/Inf
    nonfinite_streak: jax.Array  # int32 (): consecutive skipped updates (the loop stops at a limit)
    ema_params: Any = None  # exponential moving average of `params` (config.train.ema_decay > 0), for sampling


def layout(ms: ms_lib.ModelSetup, tx: optax.GradientTransformation, *, ema: bool) -> tuple[TrainState, TrainState]:
    """(abstract state: ShapeDtypeStructs with shardings, state shardings) of a run of `ms` with optimizer `tx`."""
    mesh = ms.mesh
    boxed_trainable = {k: v for k, v in ms.abstract_params_boxed.items() if k in ms.trainable_names}
    with jax.set_mesh(mesh):
        # optimizer state mirrors the params: derive its shardings from the boxed tree (as maxtext does)
        boxed_opt = jax.eval_shape(tx.init, boxed_trainable)
        opt_sh = shd.params_shardings(boxed_opt, mesh)
    replicated = NamedSharding(mesh, P())
    trainable_sh = ms.trainable_shardings
    shardings = TrainState(step=replicated, params=trainable_sh, opt_state=opt_sh, rng=replicated,
                           nonfinite_total=replicated, nonfinite_streak=replicated,
                           ema_params=trainable_sh if ema else None)
    abstract_opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                ms_lib.plain_unbox(boxed_opt), opt_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    abstract = TrainState(step=scalar, params=ms.abstract_trainable, opt_state=abstract_opt,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                          nonfinite_total=scalar, nonfinite_streak=scalar,
                          ema_params=ms.abstract_trainable if ema else None)
    return abstract, shardings


def fresh(trainable, tx: optax.GradientTransformation, state_rng, *, ema: bool) -> TrainState:
    """The state at step 0 around initial trainable params (a pure function: call it under jit)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(state_rng), nonfinite_total=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32),
                      ema_params=jax.tree.map(jnp.copy, trainable) if ema else None)
