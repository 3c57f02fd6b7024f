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
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from blip3o_jax import sharding as shd
from blip3o_jax.cli import UserError
from blip3o_jax.models import registry
from blip3o_jax.training import checkpoint as ckpt_lib
from blip3o_jax.training import defaults
from blip3o_jax.training import metrics as metrics_lib
from blip3o_jax.training import step as step_lib

log = logging.getLogger(__name__)


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
    accum = int(defaults.option(config, "train.grad_accum_steps"))
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


def load_init_from(spec: str, setup) -> dict:
    """{group: params} from `config.init_from`: comma-separated `[group=]DIR` entries of converted checkpoints
    (`convert_torch_weights.py` output or a BLIP3-o checkpoint converted with kind blip3o). The group defaults to
    what the checkpoint's kind initialises (a Qwen model -> backbone, EVA-CLIP -> gen_encoder, a DiT -> dit,
    BLIP3-o -> every group it holds). `setup`: a training/model_setup.ModelSetup or a train step's setup."""
    from blip3o_jax import pretrained

    abstract = setup.abstract_params
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
        except (ValueError, KeyError, TypeError) as e:  # Orbax: the stored tree's structure or shapes differ
            raise UserError(f"config.init_from: {path} (kind {kind}) does not fit the model's {group!r}: {e}") from e
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# state: restore or initialise


def cast_like(tree, abstract):
    """`tree` in the dtypes of `abstract` (loaded weights -> the run's param dtypes)."""
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
            _, frozen = setup.model_setup.init(rng)
            frozen = _apply_init_from(config, setup, None, frozen)[1]
        log.info("resumed from step %d", latest)
        return state, frozen, int(latest)
    state, frozen = setup.init(rng)
    state, frozen = _apply_init_from(config, setup, state, frozen)
    if setup.abstract_frozen and defaults.option(config, "checkpoint.save_frozen"):
        ckpt_lib.save_params(frozen_dir, frozen)
    return state, frozen, 0


def _apply_init_from(config, setup, state, frozen):
    spec = defaults.option(config, "init_from")
    if not spec:
        return state, frozen
    loaded = load_init_from(spec, setup)
    frozen = dict(frozen)
    for group, params in loaded.items():
        if group in frozen:
            frozen[group] = cast_like(params, setup.abstract_frozen[group])
        elif state is not None:
            params = cast_like(params, setup.abstract_state.params[group])
            new_params = {**state.params, group: params}
            # fresh optimizer moments for the loaded weights
            opt_init = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)
            state = state.replace(params=new_params, opt_state=opt_init(new_params))
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


@dataclasses.dataclass
class _Reporter:
    """Reads each step's metrics on the host (one step late, so the host never stalls the device), sums them over
    a log window, writes the log lines and moves the progress bar."""

    writer: metrics_lib.MetricWriter
    data_iter: Any
    bar: Any  # tqdm or None
    total_steps: int
    log_every: int
    max_bad: int  # consecutive non-finite steps that stop the run
    num_buckets: int
    batch_size: int
    flops_per_step: float
    peak: float | None
    window: _Window = dataclasses.field(default_factory=_Window)
    last_logged: dict = dataclasses.field(default_factory=dict)
    streak: int = 0  # consecutive non-finite steps, as last read

    def consume(self, step: int, device_metrics) -> str | None:
        """Takes in the metrics of `step`; returns why the run must stop, if it must."""
        m = jax.device_get(device_metrics)
        self.window.add(m)
        self.streak = int(m["nonfinite_streak"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)
        stop = self.streak >= self.max_bad
        if step % self.log_every == 0 or step == self.total_steps or stop:
            summary = _summarise(self.window, m, batch_size=self.batch_size, flops_per_step=self.flops_per_step,
                                 peak=self.peak, num_buckets=self.num_buckets)
            summary.update({k: v for k, v in self.data_iter.metrics().items() if k.startswith("data/bad")})
            self.writer.write(step, summary)
            self.last_logged = {"step": step, **summary}
            self.window = _Window()
        if stop:
            return f"{self.max_bad} consecutive steps with a non-finite loss, gradient or update (up to step {step})"
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()


def _reporter(config, setup: step_lib.TrainSetup, workdir: str, data_iter, start: int, precomputed) -> _Reporter:
    """The run's metric writer and progress bar; writes config.json and the run's opening lines."""
    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(defaults.option(config, "log.tensorboard")))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(ckpt_lib.config_to_json(config), f, indent=2)
    peak, peak_how = metrics_lib.device_peak_flops()
    total_steps = int(config.train.total_steps)
    flops = metrics_lib.train_flops_per_sample(
        setup.model_cfg, seq_len=max(int(n) for n in config.data.seq_buckets), trainable=setup.trainable_names,
        text_loss=bool(defaults.option(config, "train.text_loss_weight")))
    if precomputed.use:
        writer.write_text(f"precomputed targets {precomputed.shape} from companion shards ({precomputed.reason})")
    writer.write_text(f"training {total_steps} steps from step {start} on {jax.device_count()} devices, mesh "
                      f"{dict(setup.mesh.shape)}; trainable: {', '.join(setup.trainable_names)}; "
                      f"{flops['total'] / 1e9:.3g} GFLOPs/sample (at the longest sequence bucket); peak: {peak_how}")
    bar = None
    if defaults.option(config, "log.progress_bar") and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=2.0)
    B = int(config.data.global_batch_size)
    return _Reporter(writer=writer, data_iter=data_iter, bar=bar, total_steps=total_steps,
                     log_every=int(defaults.option(config, "log.every")),
                     max_bad=int(defaults.option(config, "train.max_consecutive_nonfinite")),
                     num_buckets=int(defaults.option(config, "log.sigma_buckets")), batch_size=B,
                     flops_per_step=flops["total"] * B, peak=peak)


@dataclasses.dataclass
class _Run:
    """What the step loop drives: the step, the data, the checkpoints, the stop signals and the reporter."""

    setup: step_lib.TrainSetup
    data_iter: Any
    checkpointer: ckpt_lib.Checkpointer
    watcher: ckpt_lib.PreemptionWatcher
    reporter: _Reporter
    config_json: dict
    total_steps: int
    max_seconds: float  # wall-clock budget of this invocation (e.g. a scheduler's time limit); 0: none

    def next_batch(self) -> dict:
        """The next batch as global arrays: the fields the step consumes (the pipeline also yields bookkeeping)."""
        from blip3o_jax.data import pipeline as data_lib

        host_batch = next(self.data_iter)
        fields = self.setup.batch_shardings
        return data_lib.make_global_batch({k: v for k, v in host_batch.items() if k in fields}, self.setup.mesh)

    def save_if_finite(self, step: int, state) -> None:
        # a checkpoint is written only while the steps are finite, so the last one kept is a good one
        if self.reporter.streak == 0:
            self.checkpointer.save(step, state, data_iterator=self.data_iter, config=self.config_json)

    def stop_requested(self, step: int, state, t_loop: float) -> str | None:
        """"preempted" (SIGTERM on any process) or "out_of_time", after saving this step; else None."""
        preempted, out_of_time = self.watcher.requested(
            step, self.max_seconds > 0 and time.perf_counter() - t_loop > self.max_seconds)
        if not (preempted or out_of_time):
            return None
        if self.checkpointer.latest_step() != step:
            self.save_if_finite(step, state)
        return "out_of_time" if out_of_time else "preempted"


def _step_loop(run: _Run, state, frozen, step: int) -> tuple[int, str | None]:
    """Steps until `total_steps` or a stop; returns (last step taken, why it stopped early or None).

    Each step is dispatched asynchronously; the previous step's metrics are read after it (a one-step lag).
    """
    pending = None  # (step number after the update, device metrics) of the previous step
    stop_reason = None
    t_loop = time.perf_counter()
    while step < run.total_steps:
        state, device_metrics = run.setup.step_fn(state, frozen, run.next_batch())
        step += 1
        if pending is not None:
            stop_reason = run.reporter.consume(*pending)
        pending = (step, device_metrics)
        if stop_reason:
            break
        if run.checkpointer.should_save(step) or step == run.total_steps:
            # read this step's metrics now (a sync, but only when saving): save only a finite state
            stop_reason, pending = run.reporter.consume(*pending), None
            if stop_reason:
                break
            run.save_if_finite(step, state)
        stop_reason = run.stop_requested(step, state, t_loop)
        if stop_reason:
            break
    if pending is not None and stop_reason in (None, "preempted", "out_of_time"):
        stop_reason = run.reporter.consume(*pending) or stop_reason  # the last step's metrics (one-step lag)
    return step, stop_reason


def _prepare(config, workdir: str):
    """(config with precomputed targets resolved, their resolution, workdir, mesh), or a UserError."""
    shd.initialize_distributed()
    check_config(config)
    from blip3o_jax.data import targets as targets_lib

    try:  # precomputed targets (blip3o-precompute): no image decode, no encoder in the step
        config, precomputed = targets_lib.resolve(config)
    except ValueError as e:
        raise UserError(str(e)) from None
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    os.makedirs(workdir, exist_ok=True)
    try:
        mesh = shd.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise UserError(f"config.mesh: {e}") from None
    return config, precomputed, workdir, mesh


def _data_iterator(config, setup: step_lib.TrainSetup):
    from blip3o_jax.data import pipeline as data_lib

    data = data_lib.build(config.data)
    vocab = len(data.tokenizer)
    if vocab > setup.model_cfg.backbone.vocab_size:
        raise UserError(f"the tokenizer {config.data.tokenizer} has {vocab} tokens but the backbone's vocab_size is "
                        f"{setup.model_cfg.backbone.vocab_size}")
    return data.iterator()


def _report_stop(reporter: _Reporter, checkpointer: ckpt_lib.Checkpointer, step: int, stop_reason: str | None,
                 max_seconds: float) -> None:
    if stop_reason == "preempted":
        reporter.writer.write_text(f"stopped by SIGTERM after step {step}; checkpoint saved, rerun the command to "
                                   "resume")
    elif stop_reason == "out_of_time":
        reporter.writer.write_text(f"stopped after step {step}: config.train.max_seconds={max_seconds:g} reached; "
                                   "checkpoint saved, rerun the command to continue")
    elif stop_reason:
        raise TrainingStopped(f"stopping: {stop_reason}; the last good checkpoint "
                              f"(step {checkpointer.latest_step()}) is kept in {checkpointer.directory}")


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    config, precomputed, workdir, mesh = _prepare(config, workdir)
    setup = step_lib.make_train_step(config, mesh)
    data_iter = _data_iterator(config, setup)
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=int(config.checkpoint.every),
                                         keep=int(defaults.option(config, "checkpoint.keep")),
                                         async_save=bool(defaults.option(config, "checkpoint.async_save")))
    state, frozen, start = initial_state(config, setup, workdir, checkpointer, data_iter)
    if data_iter.step != start:  # checkpoints without a data item: batches are a pure function of the step
        data_iter.set_state({**data_iter.get_state(), "step": start})
    reporter = _reporter(config, setup, workdir, data_iter, start, precomputed)
    max_seconds = float(defaults.option(config, "train.max_seconds") or 0)
    run = _Run(setup=setup, data_iter=data_iter, checkpointer=checkpointer, watcher=ckpt_lib.PreemptionWatcher(),
               reporter=reporter, config_json=ckpt_lib.config_to_json(config),
               total_steps=int(config.train.total_steps), max_seconds=max_seconds)
    try:
        step, stop_reason = _step_loop(run, state, frozen, start)
    finally:
        checkpointer.close()
        run.watcher.restore_handlers()
        reporter.close()
        data_iter.close()
    _report_stop(reporter, checkpointer, step, stop_reason, max_seconds)
    return reporter.last_logged


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
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events (rerun with "
                        "the same one to resume).")
    cli.run(_main, module=__name__, doc=__doc__)


if __name__ == "__main__":
    main()
