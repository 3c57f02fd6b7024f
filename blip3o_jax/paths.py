"""One path layer for every file a CLI writes or reads under a workdir or an output folder: local paths through `os`,
`gs://...` (any `scheme://`) through `etils.epath`, the layer Orbax itself writes checkpoints with (Orbax gets
`storage_path(path)` and reads and writes the bucket through tensorstore itself).

Used by the trainer (through `blip3o_jax/training/workdir.py`), `blip3o-precompute` (companion target shards),
`blip3o-sample` and `convert_torch_weights.py`. Nothing here turns a `gs://` path into a local one: no local
directory named `gs:` is ever created.

Atomic writes: a local file is written under a hidden temporary name beside it and renamed into place; an object
store has no rename (GCS "renames" by copying), but an object upload becomes visible only once complete, so a
remote file is written directly under its final name.

`_epath` and `storage_path` are the two places a test substitutes a local directory for the remote store.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator


def is_remote(path) -> bool:
    return "://" in str(path)


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def storage_path(path: str) -> str:
    """The path handed to Orbax (which reads and writes `gs://` itself, through epath and tensorstore)."""
    return path


# ----------------------------------------------------------------------------------------------------------------
# names


def abspath(path: str) -> str:
    """`os.path.abspath` of a local path; a remote one is already absolute (only a trailing "/" is dropped)."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


# ----------------------------------------------------------------------------------------------------------------
# queries


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a directory."""
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return os.listdir(path)


def getsize(path: str) -> int:
    return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def walk_files(folder: str, *, skip_hidden: bool = False) -> Iterator[str]:
    """Every file under `folder` (depth first, sorted), as paths under `folder` (remote paths stay remote)."""
    if not is_remote(folder):
        for root, dirnames, names in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not (skip_hidden and d.startswith(".")))
            yield from (os.path.join(root, n) for n in sorted(names) if not (skip_hidden and n.startswith(".")))
        return
    for name in listdir(folder):
        if skip_hidden and name.startswith("."):
            continue
        path = join(folder, name)
        if isdir(path):
            yield from walk_files(path, skip_hidden=skip_hidden)
        else:
            yield path


# ----------------------------------------------------------------------------------------------------------------
# changes


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Removes a file; a missing one is fine."""
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def rmtree(path: str) -> None:
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        import shutil

        shutil.rmtree(path)


def replace(src: str, dst: str) -> None:
    """`os.replace`; on an object store a copy and a delete (not atomic: prefer writing the final name once)."""
    if is_remote(src):
        _epath(src).rename(_epath(dst))
    else:
        os.replace(src, dst)


# ----------------------------------------------------------------------------------------------------------------
# contents


def open_file(path: str, mode: str = "r"):
    """A file object for reading ("r", "rb") or writing a whole file ("w", "wb"); on an object store the object
    appears when the file is closed."""
    if is_remote(path):
        return _epath(path).open(mode)
    return open(path, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def atomic_write(path: str, write: Callable, *, tmp_name: str | None = None) -> None:
    """Writes `path` with `write(binary file)`: locally through `tmp_name` (default a hidden `.<name>.partial`
    beside it, flushed, synced, renamed into place); remotely straight to the final object (visible once complete)."""
    if is_remote(path):
        makedirs(dirname(path))
        with _epath(path).open("wb") as f:
            write(f)
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, tmp_name or f".{name}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
