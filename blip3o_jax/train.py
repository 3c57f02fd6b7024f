"""Trains BLIP3-o: `python -m blip3o_jax.train --config configs/NAME.py --workdir DIR [--config.x=y ...]`.

The same command runs on a laptop CPU, one GPU, or every host of a TPU slice (each host runs it; JAX's
multi-controller runtime connects them, see `sharding.initialize_distributed`). Rerunning the command with the same
workdir resumes from the latest checkpoint; SIGTERM (preemption) saves one and exits cleanly.

The loop, in order: build the mesh and the jitted step (`training/step.py`), the data pipeline (`blip3o_jax/data`),
restore or initialise the state, then for each step: next batch -> global arrays -> step (dispatched
asynchronously) -> read the *previous* step's metrics (a one-step lag, so the host never stalls the device) ->
log / checkpoint / stop on preemption or on repeated non-finite steps.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax import sharding as shd
from blip3o_jax.cli import UserError
from blip3o_jax.models import registry
from blip3o_jax.training import checkpoint as ckpt_lib
from blip3o_jax.training import metrics as metrics_lib
from blip3o_jax.training import optimizer as opt_lib
from blip3o_jax.training import step as step_lib

log = logging.getLogger(__name__)

# batch fields the step consumes (the pipeline also yields bookkeeping fields such as record_id)
STEP_FIELDS = ("input_ids", "attention_mask", "positions", "task", "sample_valid", "query_index", "gen_image",
               "targets", "labels", "loss_mask", "und_patches", "und_index", "mrope_positions")



class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (non-finite steps); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------------
# config checks


def check_config(config) -> None:
    """Cross-section consistency, reported as one actionable sentence."""
    m, d = config.model, config.data
    if int(d.n_query) != int(m.n_query):
        raise UserError(f"config.data.n_query={d.n_query} but config.model.n_query={m.n_query}; they must agree")
    if m.target != "precomputed" and int(d.gen_image_size) != int(m.image_size):
        raise UserError(f"config.data.gen_image_size={d.gen_image_size} but config.model.image_size={m.image_size}")
    if not d.datasets:
        raise UserError("config.data.datasets is empty: pass --config.data.datasets=... or use a config that sets it")
    und_kind = m.get("und_tower_kind")
    i2t = [ds.get("name", i) for i, ds in enumerate(d.datasets) if ds.get("task") == "i2t"]
    if i2t and und_kind not in (None, "qwen2_5_vl_vision"):
        # the pipeline builds understanding inputs as Qwen2.5-VL patches + 3-D positions (data/transforms.py); a
        # SigLIP tower would silently get none of its images
        raise UserError(f"config.data.datasets {i2t} are image-to-text rows, but the data pipeline delivers "
                        f"understanding images only for a Qwen2.5-VL tower (config.model.und_tower_kind is "
                        f"{und_kind!r}); train those rows with und_tower_kind='qwen2_5_vl_vision' or drop them")
    if int(d.global_batch_size) % jax.device_count() and jax.device_count() % int(d.global_batch_size):
        raise UserError(f"config.data.global_batch_size={d.global_batch_size} does not divide over "
                        f"{jax.device_count()} devices")
    accum = int(config.train.get("grad_accum_steps", 1))
    if int(d.global_batch_size) % accum:
        raise UserError(f"config.data.global_batch_size={d.global_batch_size} is not divisible by "
                        f"config.train.grad_accum_steps={accum}")


# ---------------------------------------------------------------------------------------------------------------
# init_from: converted weights


def _parse_init_from(spec: str) -> list[tuple[str | None, str]]:
    out = []
    for item in [s.strip() for s in str(spec or "").split(",") if s.strip()]:
        group, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        out.append((group or None, path))
    return out


def load_init_from(spec: str, setup: step_lib.TrainSetup) -> dict:
    """{group: params} from `config.init_from`: comma-separated `[group=]DIR` entries of converted checkpoints
    (`convert_torch_weights.py` output or a BLIP3-o checkpoint converted with kind blip3o). The group defaults to
    what the checkpoint's kind initialises (a Qwen model -> backbone, EVA-CLIP -> gen_encoder, a DiT -> dit,
    BLIP3-o -> every group it holds)."""
    from blip3o_jax import pretrained

    abstract = {**setup.abstract_frozen, **setup.abstract_state.params}
    loaded = {}
    for group, path in _parse_init_from(spec):
        if not os.path.isdir(path):
            raise UserError(f"config.init_from: {path} is not a directory")
        kind, _ = pretrained.resolve(path)
        if group is None and kind == "blip3o":
            target = {k: v for k, v in abstract.items()}
            params = ckpt_lib.restore_params(os.path.join(path, pretrained.PARAMS_DIR), target)
            loaded.update(params)
            continue
        group = group or registry.get(kind).init_group
        if group is None or group not in abstract:
            raise UserError(f"config.init_from: cannot tell which part of the model {path} (kind {kind}) "
                            f"initialises; write GROUP={path} with GROUP one of {sorted(abstract)}")
        try:
            loaded[group] = pretrained.restore_params(path, abstract[group])
        except Exception as e:  # noqa: BLE001  (shape/structure mismatch from Orbax)
            raise UserError(f"config.init_from: {path} (kind {kind}) does not fit the model's {group!r}: {e}") from e
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# state: restore or initialise


def _cast_like(tree, abstract):
    return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x, tree, abstract)


def initial_state(config, setup: step_lib.TrainSetup, workdir: str, checkpointer: ckpt_lib.Checkpointer,
                  data_iterator=None):
    """(state, frozen params, start step): from the latest checkpoint of `workdir` if any, else fresh."""
    frozen_dir = os.path.join(os.path.abspath(workdir), "frozen")
    latest = checkpointer.latest_step()
    rng = jax.random.key(int(config.seed))
    if latest is not None:
        state = checkpointer.restore(latest, setup.abstract_state, data_iterator=data_iterator)
        if setup.abstract_frozen and os.path.isdir(frozen_dir):
            frozen = ckpt_lib.restore_params(frozen_dir, setup.abstract_frozen)
        else:  # frozen weights are a pure function of the seed and init_from
            _, frozen = setup.init(rng)
            frozen = _apply_init_from(config, setup, None, frozen)[1]
        log.info("resumed from step %d", latest)
        return state, frozen, int(latest)
    state, frozen = setup.init(rng)
    state, frozen = _apply_init_from(config, setup, state, frozen)
    if setup.abstract_frozen and config.get("checkpoint", {}).get("save_frozen", True):
        ckpt_lib.save_params(frozen_dir, frozen)
    return state, frozen, 0


def _apply_init_from(config, setup, state, frozen):
    spec = config.get("init_from", "")
    if not spec:
        return state, frozen
    loaded = load_init_from(spec, setup)
    frozen = dict(frozen)
    for group, params in loaded.items():
        if group in frozen:
            frozen[group] = _cast_like(params, setup.abstract_frozen[group])
        elif state is not None:
            params = _cast_like(params, setup.abstract_state.params[group])
            new_params = {**state.params, group: params}
            # fresh optimizer moments for the loaded weights
            state = state.replace(params=new_params, opt_state=jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(new_params))
    return state, frozen


# ---------------------------------------------------------------------------------------------------------------
# the loop


@dataclasses.dataclass
class _Window:
    """Host-side sums of the metrics since the last log line."""

    steps: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, m: dict) -> None:
        self.steps += 1
        for k, v in m.items():
            self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)


def _summarise(window: _Window, last: dict, *, batch_size: int, flops_per_step: float, peak: float | None,
               num_buckets: int) -> dict:
    n = max(window.steps, 1)
    dt = (time.perf_counter() - window.t0) / n
    out = {}
    for k in ("loss", "gen_loss", "text_loss", "grad_norm", "update_norm"):
        if k in window.sums:
            out[k] = float(window.sums[k] / n)
    out["param_norm"] = float(last["param_norm"])
    out["lr"] = float(last["lr"])
    if "sigma_sum" in window.sums:
        sums, counts = window.sums["sigma_sum"], window.sums["sigma_count"]
        for b in range(num_buckets):
            lo, hi = b / num_buckets, (b + 1) / num_buckets
            out[f"loss_sigma_{lo:.1f}_{hi:.1f}"] = float(sums[b] / counts[b]) if counts[b] else float("nan")
    out["step_time_s"] = dt
    out["samples_per_s"] = batch_size / dt
    out["flops_per_s"] = flops_per_step / dt
    if peak:
        out["mfu"] = flops_per_step / dt / peak
    out["nonfinite_total"] = int(last["nonfinite_total"])
    return out


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    shd.initialize_distributed()
    check_config(config)
    from blip3o_jax.data import targets as targets_lib

    try:  # precomputed targets (tools/precompute_targets.py): no image decode, no encoder in the step
        config, precomputed = targets_lib.resolve(config)
    except ValueError as e:
        raise UserError(str(e)) from None
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    os.makedirs(workdir, exist_ok=True)
    try:
        mesh = shd.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise UserError(f"config.mesh: {e}") from None
    setup = step_lib.make_train_step(config, mesh)
    total_steps = int(config.train.total_steps)

    from blip3o_jax.data import pipeline as data_lib

    data = data_lib.build(config.data)
    vocab = len(data.tokenizer)
    if vocab > setup.model_cfg.backbone.vocab_size:
        raise UserError(f"the tokenizer {config.data.tokenizer} has {vocab} tokens but the backbone's vocab_size is "
                        f"{setup.model_cfg.backbone.vocab_size}")
    data_iter = data.iterator()
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=int(config.checkpoint.every),
                                         keep=int(config.checkpoint.get("keep", 2)),
                                         async_save=bool(config.checkpoint.get("async_save", True)))
    state, frozen, start = initial_state(config, setup, workdir, checkpointer, data_iter)
    if data_iter.step != start:  # checkpoints without a data item: batches are a pure function of the step
        data_iter.set_state({**data_iter.get_state(), "step": start})

    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.log.get("tensorboard", True)))
    config_json = ckpt_lib.config_to_json(config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
    peak, peak_how = metrics_lib.device_peak_flops()
    B = int(config.data.global_batch_size)
    flops = metrics_lib.train_flops_per_sample(setup.model_cfg, seq_len=max(int(n) for n in config.data.seq_buckets),
                                               trainable=setup.trainable_names,
                                               text_loss=bool(config.train.get("text_loss_weight", 0.0)))
    if precomputed.use:
        writer.write_text(f"precomputed targets {precomputed.shape} from companion shards ({precomputed.reason})")
    writer.write_text(f"training {total_steps} steps from step {start} on {jax.device_count()} devices, mesh "
                      f"{dict(mesh.shape)}; trainable: {', '.join(setup.trainable_names)}; "
                      f"{flops['total'] / 1e9:.3g} GFLOPs/sample (at the longest sequence bucket); peak: {peak_how}")
    log_every = int(config.log.get("every", 50))
    num_buckets = int(config.log.get("sigma_buckets", 5))
    max_bad = int(config.train.get("max_consecutive_nonfinite", 10))
    watcher = ckpt_lib.PreemptionWatcher()
    bar = None
    if config.log.get("progress_bar", True) and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=2.0)

    window = _Window()
    pending = None  # (step number after the update, device metrics) of the previous step
    last_logged: dict = {}
    streak = 0  # consecutive non-finite steps, as last read
    # a wall-clock budget for this invocation (e.g. a scheduler's time limit): save and stop cleanly when it is spent
    max_seconds = float(config.train.get("max_seconds", 0) or 0)
    t_loop = time.perf_counter()
    step = start
    stop_reason = None

    def consume(pending_step, device_metrics):
        nonlocal window, last_logged, streak
        m = jax.device_get(device_metrics)
        window.add(m)
        streak = int(m["nonfinite_streak"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)
        stop = streak >= max_bad
        if pending_step % log_every == 0 or pending_step == total_steps or stop:
            summary = _summarise(window, m, batch_size=B, flops_per_step=flops["total"] * B, peak=peak,
                                 num_buckets=num_buckets)
            summary.update({k: v for k, v in data_iter.metrics().items() if k.startswith("data/bad")})
            writer.write(pending_step, summary)
            last_logged = {"step": pending_step, **summary}
            window = _Window()
        if stop:
            return f"{max_bad} consecutive steps with a non-finite loss, gradient or update (up to step {pending_step})"
        return None

    try:
        while step < total_steps:
            host_batch = next(data_iter)
            batch = data_lib.make_global_batch({k: v for k, v in host_batch.items() if k in STEP_FIELDS}, mesh)
            state, device_metrics = setup.step_fn(state, frozen, batch)
            step += 1
            if pending is not None:
                stop_reason = consume(*pending)
            pending = (step, device_metrics)
            if stop_reason:
                break
            if checkpointer.should_save(step) or step == total_steps:
                # read this step's metrics now (a sync, but only when saving): a checkpoint is written only while
                # the steps are finite, so the last one kept is a good one
                stop_reason, pending = consume(*pending), None
                if stop_reason:
                    break
                if streak == 0:
                    checkpointer.save(step, state, data_iterator=data_iter, config=config_json)
            preempted, out_of_time = watcher.requested(
                step, max_seconds > 0 and time.perf_counter() - t_loop > max_seconds)
            if preempted or out_of_time:
                if checkpointer.latest_step() != step and streak == 0:
                    checkpointer.save(step, state, data_iterator=data_iter, config=config_json)
                stop_reason = "out_of_time" if out_of_time else "preempted"
                break
        if pending is not None and stop_reason in (None, "preempted", "out_of_time"):
            stop_reason = consume(*pending) or stop_reason  # the last step's metrics (one-step lag)
    finally:
        checkpointer.close()
        watcher.restore_handlers()
        if bar is not None:
            bar.close()
        writer.flush()
        writer.close()
        data_iter.close()
    if stop_reason == "preempted":
        writer.write_text(f"stopped by SIGTERM after step {step}; checkpoint saved, rerun the command to resume")
    elif stop_reason == "out_of_time":
        writer.write_text(f"stopped after step {step}: config.train.max_seconds={max_seconds:g} reached; checkpoint "
                          "saved, rerun the command to continue")
    elif stop_reason:
        raise TrainingStopped(f"stopping: {stop_reason}; the last good checkpoint "
                              f"(step {checkpointer.latest_step()}) is kept in {checkpointer.directory}")
    return last_logged


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _main(argv):
    from absl import flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; use --config, --workdir and --config.x=y")
    flags_ = flags.FLAGS
    if flags_.config is None:
        raise UserError("--config is required, e.g. --config configs/tiny.py (see docs/training.md)")
    if not flags_.workdir:
        raise UserError("--workdir is required")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        train(flags_.config, flags_.workdir)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def main():
    from absl import flags

    from blip3o_jax import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
    cli.run(_main)


if __name__ == "__main__":
    main()
