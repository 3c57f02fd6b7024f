"""Orbax checkpoints of a run: trainable state, data-iterator state and config; frozen weights; preemption.

Layout of a workdir:
  checkpoints/<step>/state    TrainState: step, trainable params (fp32 masters), optimizer state, rng, counters
  checkpoints/<step>/data     the data iterator's position, one JSON per process (Grain's Orbax handler)
  checkpoints/<step>/config   the run's config as JSON (what produced these weights)
  frozen/                     frozen params (backbone, towers, generation encoder), written once per run
Frozen weights never change, so they are not re-saved with every step (the 8B recipe would write ~16 GB each
time); saving them once keeps the workdir self-contained for sampling.

Restoring takes the abstract target (shapes, dtypes and *shardings* of the current mesh), so a checkpoint saved
on one mesh restores onto any other (Orbax reshards on read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from blip3o_jax.training import workdir as wd


# Orbax writes an array that several devices hold whole ("replicated") cooperatively: each replica slices out and
# writes its part. Every slice is a dispatched (and, per shape, compiled) op, which for small arrays costs far more
# than writing them: a tiny model's first save on 8 CPU devices sliced ~3,300 times and took 5 s instead of 0.5.
# Arrays whose part per replica would be under this size are written whole by one replica instead; large arrays
# (a 2304 x 2304 fp32 kernel over 64 replicas: 330 KB each) are still split.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 64 << 10
_array_handler_registered = False


def use_replica_parallel_threshold() -> None:
    """Registers Orbax's `jax.Array` handler with `REPLICA_PARALLEL_MIN_SLICE_BYTES` (once per process; every
    other setting is Orbax's default). Called by the savers below."""
    global _array_handler_registered
    if _array_handler_registered:
        return
    from orbax.checkpoint._src.metadata import array_metadata_store  # the store Orbax's default handler uses

    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _array_handler_registered = True


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


class Checkpointer:
    """A `CheckpointManager` with items `state`, `data`, `config` and save-every-N / keep-last-K policy."""

    def __init__(self, workdir: str, *, save_every: int, keep: int | None = 2, async_save: bool = True):
        use_replica_parallel_threshold()
        self.directory = wd.join(_abs(workdir), "checkpoints")
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None else int(keep),  # train.check_config refuses keep < 1
            save_interval_steps=1,  # our loop decides when to save (every N, at the end, on SIGTERM)
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by kill -9
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(wd.storage_path(self.directory), item_names=tuple(handlers),
                                             item_handlers=handlers, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(_as_tree(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, abstract_state, *, data_iterator=None):
        """The state at `step` (latest when None) laid out as `abstract_state` says; restores the iterator in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(_as_tree(abstract_state))}
        if data_iterator is not None and wd.exists(wd.join(wd.storage_path(self.directory), str(step), "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return _from_tree(restored["state"], abstract_state)

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def set_aside_after(self, step: int) -> list[int]:
        """Moves the checkpoints newer than `step` to `checkpoints_set_aside/` (kept, out of the run's way, so that
        the run continues from `step`); returns their steps."""
        moved = [s for s in self.all_steps() if s > step]
        if moved:
            directory = wd.storage_path(self.directory)
            aside = wd.join(directory.rstrip("/").rsplit("/", 1)[0], "checkpoints_set_aside")
            wd.makedirs(aside)
            for s in moved:
                dst = wd.join(aside, str(s))
                n = 0
                while wd.exists(dst):  # an earlier set-aside of the same step: keep both
                    n += 1
                    dst = wd.join(aside, f"{s}.{n}")
                wd.rename(wd.join(directory, str(s)), dst)
            self.manager.reload()
        return moved

    def read_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _as_tree(state):
    """A dataclass state (training/step.py TrainState) as a dict without its unused (None) fields: optional parts
    such as the EMA weights must not appear as empty nodes on disk (Orbax compares tree structures)."""
    if dataclasses.is_dataclass(state):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}
    return state


def _from_tree(tree, like):
    if dataclasses.is_dataclass(like):
        return like.replace(**tree)
    return tree


# --------------------------------------------------------------------------------------------------------------
# Params-only checkpoints: frozen weights of a run and converted weights (`convert_torch_weights.py` output).


def save_params(path: str, params) -> None:
    use_replica_parallel_threshold()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(wd.storage_path(_abs(path)), params, force=True)


def restore_params(path: str, abstract_params=None):
    """Params saved by `save_params` / `convert_torch_weights.py`; onto `abstract_params`' shardings if given.

    A converted checkpoint may hold only some top-level groups (e.g. `backbone`, or `gen_encoder`); with an abstract
    target, only the groups present in the checkpoint are read.
    """
    path = wd.storage_path(_abs(path))
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_params is None:
            return ckptr.restore(path)
        stored = ckptr.metadata(path)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        target = {k: v for k, v in abstract_params.items() if k in stored_tree}
        missing = sorted(set(stored_tree) - set(abstract_params))
        if missing:
            raise ValueError(f"{path} holds param groups {missing} that this model does not have "
                             f"(model groups: {sorted(abstract_params)})")
        return ckptr.restore(path, target)


# --------------------------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
    """Turns SIGTERM (TPU/GCE preemption, `kill`) and SIGINT (Ctrl-C) into a flag the loop polls: save, then exit
    cleanly. A second Ctrl-C is not caught (Python's default: KeyboardInterrupt), for a user who will not wait.

    Multi-host: every process receives the signal on a preemption; the loop additionally asks
    `multihost_utils.reached_preemption_sync_point` where the distributed runtime is up.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = {}
        self.signal_name = None  # of the first signal received
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # once: the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logging.warning("received SIGINT: saving a checkpoint and exiting (press Ctrl-C again to abort "
                            "without saving)")
        else:
            logging.warning("received %s: saving a checkpoint and exiting", name)
        self.signal_name = self.signal_name or name
        self._event.set()

    def requested(self, step: int, *other_flags: bool) -> tuple[bool, ...]:
        """(preemption requested, *other_flags), each True when it is True on *any* process.

        Every process must stop at the same step (the final checkpoint save is collective), but SIGTERM reaches
        hosts at different moments and wall-clock budgets run out at different moments: the flags are OR-ed over
        the processes (one tiny all-gather per step, only in multi-process runs).
        """
        flags = [self._event.is_set(), *other_flags]
        if jax.process_count() == 1:
            return tuple(bool(f) for f in flags)
        from jax.experimental import multihost_utils

        with contextlib.suppress(RuntimeError):  # the preemption service is not initialised
            flags[0] = flags[0] or bool(multihost_utils.reached_preemption_sync_point(step))
        gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
        return tuple(bool(v) for v in gathered.reshape(-1, len(flags)).any(axis=0))

    def restore_handlers(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def config_to_json(config) -> dict:
    """An ml_collections config as plain JSON (tuples -> lists, non-JSON values -> str)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))
