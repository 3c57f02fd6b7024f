"""Trains BLIP3-o: `python -m blip3o_jax.train --config configs/NAME.py --workdir DIR [--config.x=y ...]`.

The same command runs on a laptop CPU, one GPU, or every host of a TPU slice (each host runs it; JAX's
multi-controller runtime connects them, see `sharding.initialize_distributed`). Rerunning the command with the same
workdir resumes from the latest checkpoint (or `--config.checkpoint.restore_step=N`); SIGTERM (preemption) and
Ctrl-C save one and exit cleanly (a second Ctrl-C aborts without saving). One run at a time per workdir (a lock).

The loop, in order: build the mesh and the jitted step (`training/step.py`), the data pipeline (`blip3o_jax/data`),
restore or initialise the state, then for each step: next batch -> global arrays -> step (dispatched
asynchronously) -> read the *previous* step's metrics (a one-step lag, so the host never stalls the device) ->
log (clu metrics over the window) / samples / profile / checkpoint / stop on preemption or on repeated non-finite
steps.
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
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import step as step_lib
from blip3o_jax.training import workdir as wd

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (non-finite steps); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------------
# config checks


def check_config(config) -> None:
    """Values and cross-section consistency, reported as one actionable sentence (before anything is written)."""
    m, d = config.model, config.data
    _check_numbers(config)
    try:
        sana = ms_lib.model_kind(config) == "sana_decoder"
    except ValueError as e:
        raise UserError(str(e)) from None
    if sana:
        _check_sana(config)
    elif int(d.n_query) != int(m.n_query):
        raise UserError(f"config.data.n_query={d.n_query} but config.model.n_query={m.n_query}; they must agree")
    if m.get("target") != "precomputed" and int(d.gen_image_size) != int(m.image_size):
        raise UserError(f"config.data.gen_image_size={d.gen_image_size} but config.model.image_size={m.image_size}")
    if not d.datasets:
        # list-valued overrides (--config.data.datasets=[...]) are not supported by ml_collections' flags
        raise UserError("config.data.datasets is empty: give the shards as the config's argument, e.g. "
                        "--config configs/blip3o_8b.py:'/data/shards/*.tar' (configs/tiny.py:DATA_DIR), or set "
                        "c.data.datasets in your config file (docs/training.md)")
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


def _check_sana(config) -> None:
    """The SANA decoder recipe's model and flow sections (model.kind="sana_decoder")."""
    try:
        ms_lib.sana_decoder_config(config)
    except ValueError as e:
        raise UserError(str(e)) from None
    p = (config.get("flow") or {}).get("cond_drop_prob", 0.1)
    if not 0.0 <= float(p) <= 1.0:
        raise UserError(f"config.flow.cond_drop_prob={p}: the probability of the black-image null condition must "
                        "be between 0 and 1 (the original: 0.1)")
    try:
        ms_lib.flow_config(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.flow: {e}") from None
    tasks = sorted({ds.get("task", "t2i") for ds in config.data.datasets} - {"t2i"})
    if tasks:
        raise UserError(f"config.data.datasets has {tasks} rows; the SANA decoder trains on images (task 't2i' rows, "
                        "whose captions it ignores)")
    if config.data.get("precomputed_targets", "auto") in (True, "true", "always"):
        raise UserError("config.data.precomputed_targets=True: the SANA decoder recipe computes its DC-AE latents in "
                        "the step (it needs the image for SigLIP anyway); set it to 'never'")


def _check_numbers(config) -> None:
    t, d = config.train, config.data

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(what)

    keep = defaults.option(config, "checkpoint.keep")
    need(keep is None or int(keep) >= 1, f"config.checkpoint.keep={keep}: keep at least 1 checkpoint (None keeps "
         "all); 0 or less would delete every checkpoint of the run, older ones included")
    every = (config.get("checkpoint") or {}).get("every", 1)
    need(int(every) >= 1, f"config.checkpoint.every={every}: must be >= 1 (a checkpoint every that many steps)")
    restore = defaults.option(config, "checkpoint.restore_step")
    need(restore is None or int(restore) >= 0, f"config.checkpoint.restore_step={restore}: must be a saved step >= 0")
    lr = t.get("lr")
    need(lr is not None and float(lr) > 0, f"config.train.lr={lr}: must be > 0")
    total = int(t.total_steps)
    need(total >= 1, f"config.train.total_steps={t.total_steps}: must be >= 1")
    warmup = int(defaults.value(t, "train", "warmup_steps"))
    # a warm-up longer than the run is clamped to it (training/optimizer.py; a short demo of a long config)
    need(warmup >= 0, f"config.train.warmup_steps={warmup}: must be >= 0")
    ratio = float(defaults.value(t, "train", "warmup_ratio"))
    need(0.0 <= ratio <= 1.0, f"config.train.warmup_ratio={ratio}: must be between 0 and 1")
    need(int(d.global_batch_size) >= 1, f"config.data.global_batch_size={d.global_batch_size}: must be >= 1")
    need(int(defaults.option(config, "log.every")) >= 1, f"config.log.every={defaults.option(config, 'log.every')}: "
         "must be >= 1")
    sample_every = int(defaults.option(config, "log.sample_every"))
    need(sample_every >= 0, f"config.log.sample_every={sample_every}: must be >= 0 (0: no samples)")
    need(not sample_every or len(defaults.option(config, "log.sample_prompts")) >= 1,
         "config.log.sample_prompts is empty while config.log.sample_every > 0")
    p_start = int(defaults.option(config, "profile.start_step"))
    p_num = int(defaults.option(config, "profile.num_steps"))
    need(p_start >= 0 and p_num >= 1, f"config.profile.start_step={p_start}, num_steps={p_num}: start_step must be "
         ">= 0 (0: no profile) and num_steps >= 1")


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
    ms = getattr(setup, "model_setup", setup)
    if isinstance(ms, ms_lib.SanaDecoderSetup):  # upstream or converted parts, or a whole SANA decoder folder
        from blip3o_jax import pretrained
        from blip3o_jax.convert.common import ConversionError

        entries = [(g, pretrained.local_path(p, what="config.init_from checkpoint")) for g, p in _parse_init_from(spec)]
        try:
            return ms_lib.load_sana_init_from(ms, entries)
        except (ValueError, ConversionError) as e:
            raise UserError(str(e)) from None
    loaded = {}
    for group, path in _parse_init_from(spec):
        path = pretrained.local_path(path, what="config.init_from checkpoint")
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
            # a converted checkpoint with stacked layers fits an unrolled model and the other way round
            loaded[group] = pretrained.restore_params_as(path, abstract[group])
        except (ValueError, KeyError, TypeError) as e:  # the stored tree's structure or shapes differ
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
    frozen_dir = wd.join(workdir if wd.is_remote(workdir) else os.path.abspath(workdir), "frozen")
    latest = _resume_step(config, checkpointer)
    rng = jax.random.key(int(config.seed))
    if latest is not None:
        state = _restore(config, setup, checkpointer, latest, data_iterator)
        if setup.abstract_frozen and wd.exists(frozen_dir):
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


def _resume_step(config, checkpointer: ckpt_lib.Checkpointer) -> int | None:
    """The step to resume from: `config.checkpoint.restore_step` if set (newer checkpoints are moved to
    checkpoints_set_aside/, kept but out of the run's way), else the latest; None for a fresh run."""
    restore = defaults.option(config, "checkpoint.restore_step")
    if restore is None:
        return checkpointer.latest_step()
    steps = checkpointer.all_steps()
    if int(restore) not in steps:
        raise UserError(f"config.checkpoint.restore_step={restore}: no such checkpoint in {checkpointer.directory} "
                        f"(saved steps: {steps or 'none'})")
    moved = checkpointer.set_aside_after(int(restore))
    if moved:
        log.warning("config.checkpoint.restore_step=%d: checkpoints %s moved to checkpoints_set_aside/ (drop the "
                    "option once the run continues, or later progress is set aside again)", int(restore), moved)
    return int(restore)


def _restore(config, setup, checkpointer: ckpt_lib.Checkpointer, step: int, data_iterator):
    """The train state of checkpoint `step`, or a one-line UserError saying what is wrong with it and what to do."""
    others = [s for s in checkpointer.all_steps() if s != step]
    fallback = (f"the other saved steps are {others}: resume from one with --config.checkpoint.restore_step=N "
                "(newer checkpoints are moved to checkpoints_set_aside/)" if others else
                "no other checkpoint is saved: move the checkpoints folder away to start over")
    try:
        stored = checkpointer.read_config(step)
    except Exception:  # noqa: BLE001  (an unreadable config item: the state restore below reports the damage)
        stored = None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        current = ckpt_lib.config_to_json(config)["model"]
        changed = _changed_keys(stored["model"], current, "config.model")
        if changed:
            raise UserError(f"checkpoint step {step} in {checkpointer.directory} was saved with a different model "
                            f"config ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ): resume "
                            f"with the config it was trained with, or use a new --workdir")
    try:
        return checkpointer.restore(step, setup.abstract_state, data_iterator=data_iterator)
    except Exception as e:  # noqa: BLE001  (Orbax/tensorstore report a damaged checkpoint with many error types)
        raise UserError(f"checkpoint step {step} in {checkpointer.directory} cannot be read "
                        f"({type(e).__name__}: {_first_line(e)}); {fallback}") from e


def _changed_keys(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [prefix]


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + " ..."


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
class _Reporter:
    """Reads each step's metrics on the host (one step late, so the host never stalls the device), merges them over
    a log window (clu.metrics: averages and last values, training/metrics.py), writes the log lines and moves the
    progress bar."""

    writer: metrics_lib.MetricWriter
    data_iter: Any
    bar: Any  # tqdm or None
    total_steps: int
    log_every: int
    max_bad: int  # consecutive non-finite steps that stop the run
    batch_size: int
    flops_per_step: float
    peak: float | None
    window: Any = None  # clu Collection of the steps since the last log line
    window_steps: int = 0
    window_t0: float = dataclasses.field(default_factory=time.perf_counter)
    last_logged: dict = dataclasses.field(default_factory=dict)
    streak: int = 0  # consecutive non-finite steps, as last read

    def consume(self, step: int, device_metrics) -> str | None:
        """Takes in the metrics of `step`; returns why the run must stop, if it must."""
        m = jax.device_get(device_metrics)
        one = metrics_lib.step_collection(m)
        self.window = one if self.window is None else self.window.merge(one)
        self.window_steps += 1
        self.streak = int(m["nonfinite_streak"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)
        stop = self.streak >= self.max_bad
        if step % self.log_every == 0 or step == self.total_steps or stop:
            summary = self._summary()
            summary.update({k: v for k, v in self.data_iter.metrics().items() if k.startswith("data/bad")})
            self.writer.write_scalars(step, summary)
            self.last_logged = {"step": step, **summary}
            self.window, self.window_steps, self.window_t0 = None, 0, time.perf_counter()
        if stop:
            return f"{self.max_bad} consecutive steps with a non-finite loss, gradient or update (up to step {step})"
        return None

    def _summary(self) -> dict:
        out = metrics_lib.window_summary(self.window)
        dt = (time.perf_counter() - self.window_t0) / max(self.window_steps, 1)
        out["step_time_s"] = dt
        out["samples_per_s"] = self.batch_size / dt
        out["flops_per_s"] = self.flops_per_step / dt
        if self.peak:
            out["mfu"] = self.flops_per_step / dt / self.peak
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()


def _reporter(config, setup: step_lib.TrainSetup, workdir: str, data_iter, start: int, precomputed) -> _Reporter:
    """The run's metric writer and progress bar; writes config.json and the run's opening lines."""
    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(defaults.option(config, "log.tensorboard")))
    if jax.process_index() == 0:
        wd.write_text(wd.join(workdir, "config.json"), json.dumps(ckpt_lib.config_to_json(config), indent=2))
    peak, peak_how = metrics_lib.device_peak_flops()
    total_steps = int(config.train.total_steps)
    flops = setup.model_setup.train_flops_per_sample()
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
                     max_bad=int(defaults.option(config, "train.max_consecutive_nonfinite")), batch_size=B,
                     flops_per_step=flops["total"] * B, peak=peak)


def _log_parameter_overview(workdir: str, state, frozen) -> str:
    """clu's parameter table (shapes, sizes, shardings) of the trainable and the frozen groups: logged and written
    to workdir/parameter_overview.txt (process 0). Sharding stats only: no device reads at start-up."""
    from clu import parameter_overview

    parts = []
    for name, tree in (("trainable", state.params), ("frozen", frozen)):
        if tree:
            table = parameter_overview.get_parameter_overview(tree, include_stats="sharding")
            parts.append(f"{name} parameters:\n{table}")
    text = "\n\n".join(parts)
    if jax.process_index() == 0:
        log.info("parameter overview:\n%s", text)
        wd.write_text(wd.join(workdir, "parameter_overview.txt"), text + "\n")
    return text


@dataclasses.dataclass
class _Profile:
    """A jax.profiler trace (via clu.profiler) of steps [start, start + num_steps) in workdir/profile, viewable in
    TensorBoard's profile plugin or Perfetto. start 0: off."""

    logdir: str
    start: int
    num_steps: int
    active: bool = False

    def before(self, next_step: int) -> None:
        if self.start and next_step == self.start and not self.active:
            from clu import profiler

            profiler.start(self.logdir)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.start + self.num_steps - 1:
            self.stop(state)

    def stop(self, state=None) -> None:
        if self.active:
            from clu import profiler

            if state is not None:
                jax.block_until_ready(state)  # the traced steps' device work is inside the trace
            profiler.stop()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.start, self.start + self.num_steps - 1, self.logdir)


class _Samples:
    """Every `config.log.sample_every` steps: the current weights (the EMA when kept) sample the fixed prompts
    `config.log.sample_prompts` with fixed noise; the grid goes to workdir/samples/step_<n>.png and TensorBoard.
    One extra jit (compiled at the first sample), then flow.num_inference_steps forwards per prompt; the loop waits
    for it, so keep the interval large. Pixel targets, and VAE latents decoded by the run's own (frozen) VAE; EVA-CLIP
    features need the separate SDXL decoder to become images, so they are not drawn."""

    def __init__(self, config, setup: step_lib.TrainSetup, tokenizer, workdir: str, writer: metrics_lib.MetricWriter):
        self.every = int(defaults.option(config, "log.sample_every"))
        self.prompts = [str(p) for p in defaults.option(config, "log.sample_prompts")]
        self.setup, self.config, self.tokenizer, self.workdir, self.writer = setup, config, tokenizer, workdir, writer
        self._sampler = None
        self._rng = jax.random.key(int(config.seed) + 1)  # fixed: every grid uses the same noise
        if self.every and setup.model_cfg.target not in ("pixels", "vae"):
            writer.write_text(f"config.log.sample_every={self.every}: samples are drawn for pixel and VAE targets only "
                              f"(this model's target is {setup.model_cfg.target!r}); no samples")
            self.every = 0

    def __call__(self, step: int, state, frozen) -> None:
        if not self.every or step % self.every:
            return
        from jax.sharding import NamedSharding, PartitionSpec as P

        from blip3o_jax import sampling
        from blip3o_jax.training import optimizer as opt_lib

        if self._sampler is None:
            self._sampler = sampling.Sampler(self.setup.model, self.config, self.tokenizer)
            self._gather = jax.jit(lambda x: x, out_shardings=NamedSharding(self.setup.mesh, P()))
            vae_cfg = self.setup.model_cfg.gen_encoder
            self._decode = (jax.jit(lambda p, z: _vae_to_pixels(vae_cfg, p, z))
                            if self.setup.model_cfg.target == "vae" else None)
        trainable = state.params if state.ema_params is None else state.ema_params
        params = opt_lib.merge_params(trainable, frozen)
        grids = self._sampler(params, self.prompts, self._rng)
        if self._decode is not None:
            grids = self._decode(params["gen_encoder"], grids)
        pixels = np.asarray(jax.device_get(self._gather(grids)), np.float32)  # (P, S, S, 3) in [-1, 1]
        images = np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
        if jax.process_index() != 0:
            return
        import io

        grid = sampling.image_grid(images, self.prompts, columns=min(len(self.prompts), 8))
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        samples_dir = wd.join(self.workdir, "samples")
        wd.makedirs(samples_dir)
        wd.write_bytes(wd.join(samples_dir, f"step_{step}.png"), buf.getvalue())
        self.writer.write_images(step, {"samples": np.asarray(grid)})


def _vae_to_pixels(vae_cfg, vae_params, latents):
    """Generated VAE latents -> images in [-1, 1]: the inverse of the target normalisation (models/blip3o.py
    `VAELatentTargets`), then the VAE's decoder, as diffusers pipelines decode (`latents * std / scaling_factor +
    mean`, or `latents / scaling_factor + shift_factor`)."""
    import jax.numpy as jnp

    from blip3o_jax.models import autoencoder_kl

    if vae_cfg.latents_mean is not None and vae_cfg.latents_std is not None:
        mean = jnp.asarray(vae_cfg.latents_mean, jnp.float32).reshape(-1)
        std = jnp.asarray(vae_cfg.latents_std, jnp.float32).reshape(-1)
        z = latents * std / vae_cfg.scaling_factor + mean
    else:
        z = latents / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
    return autoencoder_kl.AutoencoderKL(vae_cfg).apply({"params": vae_params}, z, method="decode")


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
    profile: _Profile | None = None
    samples: _Samples | None = None

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
        if run.profile is not None:
            run.profile.before(step + 1)
        state, device_metrics = run.setup.step_fn(state, frozen, run.next_batch())
        step += 1
        if run.profile is not None:
            run.profile.after(step, state)
        if run.samples is not None:
            t_sample = time.perf_counter()
            run.samples(step, state, frozen)
            run.reporter.window_t0 += time.perf_counter() - t_sample  # step_time_s counts training steps only
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
    workdir = os.path.abspath(workdir) if not wd.is_remote(workdir) else workdir
    wd.check_writable(workdir)
    try:
        wd.makedirs(workdir)
    except OSError as e:
        raise UserError(f"--workdir {workdir} cannot be created: {e.strerror or e}") from None
    try:
        mesh = shd.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise UserError(f"config.mesh: {e}") from None
    return config, precomputed, workdir, mesh


def _data_iterator(config, setup: step_lib.TrainSetup):
    from blip3o_jax.data import pipeline as data_lib

    data = data_lib.build(config.data)
    vocab = len(data.tokenizer)
    backbone = getattr(setup.model_cfg, "backbone", None)  # none in the SANA decoder (its captions are unused)
    if backbone is not None and vocab > backbone.vocab_size:
        raise UserError(f"the tokenizer {config.data.tokenizer} has {vocab} tokens but the backbone's vocab_size is "
                        f"{setup.model_cfg.backbone.vocab_size}")
    return data.iterator(), data.tokenizer


def _report_stop(reporter: _Reporter, checkpointer: ckpt_lib.Checkpointer, step: int, stop_reason: str | None,
                 max_seconds: float, signal_name: str | None = None) -> None:
    if stop_reason == "preempted":
        reporter.writer.write_text(f"stopped by {signal_name or 'SIGTERM'} after step {step}; checkpoint saved, "
                                   "rerun the command to resume")
    elif stop_reason == "out_of_time":
        reporter.writer.write_text(f"stopped after step {step}: config.train.max_seconds={max_seconds:g} reached; "
                                   "checkpoint saved, rerun the command to continue")
    elif stop_reason:
        raise TrainingStopped(f"stopping: {stop_reason}; the last good checkpoint "
                              f"(step {checkpointer.latest_step()}) is kept in {checkpointer.directory}")


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    config, precomputed, workdir, mesh = _prepare(config, workdir)
    with wd.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train_locked(config, precomputed, workdir, mesh)


def _train_locked(config, precomputed, workdir: str, mesh) -> dict:
    setup = step_lib.make_train_step(config, mesh)
    data_iter, tokenizer = _data_iterator(config, setup)
    keep = defaults.option(config, "checkpoint.keep")
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=int(config.checkpoint.every),
                                         keep=None if keep is None else int(keep),
                                         async_save=bool(defaults.option(config, "checkpoint.async_save")))
    try:
        state, frozen, start = initial_state(config, setup, workdir, checkpointer, data_iter)
    except BaseException:
        checkpointer.close()
        data_iter.close()
        raise
    if data_iter.step != start:  # checkpoints without a data item: batches are a pure function of the step
        data_iter.set_state({**data_iter.get_state(), "step": start})
    reporter = _reporter(config, setup, workdir, data_iter, start, precomputed)
    _log_parameter_overview(workdir, state, frozen)
    max_seconds = float(defaults.option(config, "train.max_seconds") or 0)
    profile = _Profile(logdir=wd.join(workdir, "profile"), start=int(defaults.option(config, "profile.start_step")),
                       num_steps=int(defaults.option(config, "profile.num_steps")))
    run = _Run(setup=setup, data_iter=data_iter, checkpointer=checkpointer, watcher=ckpt_lib.PreemptionWatcher(),
               reporter=reporter, config_json=ckpt_lib.config_to_json(config),
               total_steps=int(config.train.total_steps), max_seconds=max_seconds, profile=profile,
               samples=_Samples(config, setup, tokenizer, workdir, reporter.writer))
    try:
        step, stop_reason = _step_loop(run, state, frozen, start)
    finally:
        profile.stop()
        checkpointer.close()
        run.watcher.restore_handlers()
        reporter.close()
        data_iter.close()
    _report_stop(reporter, checkpointer, step, stop_reason, max_seconds, run.watcher.signal_name)
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
