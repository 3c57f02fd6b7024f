"""The run directory: checked before anything is written to it, and locked while a run uses it.

Two runs on one workdir would interleave their checkpoints and metrics and delete each other's checkpoints (Orbax
keeps the last K of whatever it finds), so process 0 holds `workdir/.lock` (created with O_EXCL; it records the host
and the pid) for the duration of the run. A lock left by a run that died (its pid is gone on this host) is taken
over with a log line; a lock of a live process, or of another host (which this host cannot check), is refused.
A remote workdir (`gs://...`) gets no lock: an object store has no exclusive create, so the run says so in one
warning line and the user keeps two runs apart.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from blip3o_jax import paths
from blip3o_jax.cli import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


is_remote = paths.is_remote


def check_writable(workdir: str) -> None:
    """A UserError naming the path when `workdir` cannot be created or written (a file in the way, no permission)."""
    if is_remote(workdir):
        return  # the storage layer reports its own errors
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--workdir {workdir} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise UserError(f"--workdir {workdir} {what}")


def _alive(pid: int) -> bool:
    if pid <= 0:  # never signal a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `workdir/.lock` (process 0 of a local workdir; a no-op elsewhere)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled and not is_remote(workdir)  # object stores have no O_EXCL create
        self.held = False
        if enabled and is_remote(workdir):
            log.warning("--workdir %s is on an object store, which cannot hold a lock file: make sure no other run "
                        "uses it", workdir)

    def acquire(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is None:
                    continue  # removed (or half-written) meanwhile: try again
                host, pid = other.get("host"), int(other.get("pid", -1))
                if host == me["host"] and not _alive(pid):
                    log.warning("taking over the stale lock %s of process %d (no longer running)", self.path, pid)
                    _remove(self.path)
                    continue
                raise UserError(f"--workdir {self.workdir} is in use by another run (process {pid} on host {host}, "
                                f"since {other.get('since', '?')}): wait for it to end or use another workdir; if "
                                f"that run is gone, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"cannot lock --workdir {self.workdir}: {self.path} keeps changing; delete it if no run uses "
                        "the workdir")

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            if isinstance(info, dict) and "pid" in info:
                return info
        except ValueError:
            pass
        # not ours or half written: a writer that crashed between open and write; the file is at least this old
        if time.time() - os.path.getmtime(self.path) > 10:
            return {"host": socket.gethostname(), "pid": -1}
        return None

    def release(self) -> None:
        if self.held:
            self.held = False
            info = self._read()
            if info is not None and info.get("pid") == os.getpid():
                _remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------------------------
# One path layer for every file a run writes under its workdir: local paths through `os`, `gs://...` (and any
# other scheme) through `etils.epath`, the layer Orbax itself writes checkpoints with (blip3o_jax/paths.py, shared
# with the sampler, precompute and the converter). Nothing here creates a local directory named "gs:".


def _epath(path: str):
    return paths._epath(path)  # looked up at call time: substituting either module's `_epath` redirects both


def storage_path(path: str) -> str:
    """The path handed to Orbax (which reads and writes `gs://` itself, through epath and tensorstore)."""
    return paths.storage_path(path)


def rename(src: str, dst: str) -> None:
    if is_remote(src):
        _epath(src).rename(_epath(dst))
    else:
        os.rename(src, dst)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def open_file(path: str, mode: str = "r"):
    """A file object; "a" (append) on an object store rewrites the object on close (stores have no append)."""
    if not is_remote(path):
        return open(path, mode, buffering=1) if mode in ("a", "w") else open(path, mode)
    if mode == "a":
        return _AppendFile(path)
    return _epath(path).open(mode)


class _AppendFile:
    """Append on an object store (which has no append): the existing object's text plus the lines written, rewritten
    at most every `REMOTE_FLUSH_S` seconds and at close (a crash loses at most that much of the log)."""

    REMOTE_FLUSH_S = 30.0

    def __init__(self, path: str):
        self._path = _epath(path)
        self._text = self._path.read_text() if self._path.exists() else ""
        self._dirty, self._last = False, 0.0

    def write(self, text: str) -> None:
        self._text += text
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._last >= self.REMOTE_FLUSH_S):
            self._path.write_text(self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def write_text(path: str, text: str) -> None:
    if is_remote(path):
        _epath(path).write_text(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    if is_remote(path):
        _epath(path).write_bytes(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def summary_writer(logdir: str):
    """A tensorboardX SummaryWriter; a remote `logdir` gets its event files through epath (tensorboardX's own GCS
    writer needs google-cloud-storage)."""
    from tensorboardX import SummaryWriter

    if is_remote(logdir):
        _register_remote_events(logdir.split(":", 1)[0])
    return SummaryWriter(logdir)


class _EventFile:
    """tensorboardX record writer target on an object store: buffered, written out whole on flush/close."""

    def __init__(self, path: str):
        self._path = _epath(path)
        self._data = b""

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        self._path.write_bytes(self._data)

    def close(self) -> None:
        self.flush()


class _EventFileFactory:
    def open(self, path):
        return _EventFile(path)

    def directory_check(self, path):
        makedirs(path)


def _register_remote_events(scheme: str) -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EventFileFactory())
