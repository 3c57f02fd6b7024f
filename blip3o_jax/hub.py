"""Hugging Face Hub ids where a checkpoint directory is expected: `BLIP3o/BLIP3o-Model-8B` instead of a local path.

`resolve_path(x)` returns `x` unchanged when it exists on disk. Otherwise, if `x` reads as a repo id (`owner/name`,
optionally followed by a folder inside the repo, `owner/name/diffusion-decoder`, and `@revision`), the repo is
fetched with `huggingface_hub.snapshot_download` into the Hugging Face cache and the local snapshot directory (or
the folder inside it) is returned. With `HF_HUB_OFFLINE` set (the tests set it) nothing is fetched: the error is
one line that says how to download the repo. Nothing here touches the network at import time.
"""
from __future__ import annotations

import os
import re

# owner/name: the Hub's rules (letters, digits, "-", "_", "."; no "--" or ".." and no leading/trailing "-" or ".")
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?P<sub>(?:/[A-Za-z0-9._-]+)*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


class HubUnavailableError(FileNotFoundError):
    """A repo id given where a local directory was expected, and the Hub may not be used (offline) or failed.
    A FileNotFoundError, so every CLI reports it as one line with exit status 2."""


def parse_repo_id(text: str) -> tuple[str, str, str | None] | None:
    """`owner/name[/sub/folder][@revision]` -> (repo id, sub folder ("" if none), revision); None if not one."""
    m = _REPO_RE.match(text)
    if m is None or "--" in m.group("repo") or ".." in text:
        return None
    return m.group("repo"), m.group("sub").lstrip("/"), m.group("rev")


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now (not at import)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download_command(repo_id: str, sub: str = "", revision: str | None = None) -> str:
    cmd = f"hf download {repo_id}"
    if revision:
        cmd += f" --revision {revision}"
    if sub:
        cmd += f" --include '{sub}/*'"
    return cmd + f" --local-dir {repo_id.split('/')[-1]}"


def resolve_path(path_or_repo_id: str, *, what: str = "checkpoint", allow_patterns=None) -> str:
    """A local path for a local path (returned as given) or a Hub repo id (downloaded when online).

    `what` names the argument in the error ("--decoder", "init_from", ...); `allow_patterns` restricts what
    `snapshot_download` fetches (default: the whole repo, or the sub folder when one is given).
    """
    text = os.fspath(path_or_repo_id)
    if os.path.exists(os.path.expanduser(text)):
        return text
    parsed = parse_repo_id(text)
    if parsed is None:
        raise FileNotFoundError(f"{what} {text}: no such file or directory")
    repo_id, sub, revision = parsed
    if is_offline():
        raise HubUnavailableError(
            f"{what} {text}: no such local path, and it names a Hugging Face repo but HF_HUB_OFFLINE is set; download "
            f"it first (`{download_command(repo_id, sub, revision)}`) and pass that directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover  (a dependency of transformers, always installed with the project)
        raise HubUnavailableError(f"{what} {text}: a Hub repo id needs huggingface_hub (pip install huggingface_hub)")
    patterns = allow_patterns if allow_patterns is not None else ([f"{sub}/*"] if sub else None)
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001  (network, auth, missing repo: many types; one actionable line)
        raise HubUnavailableError(
            f"{what} {text}: could not download Hugging Face repo {repo_id} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); download it yourself (`{download_command(repo_id, sub, revision)}`) "
            f"and pass that directory") from None
    path = os.path.join(local, sub) if sub else local
    if not os.path.exists(path):
        raise HubUnavailableError(f"{what} {text}: repo {repo_id} has no folder {sub!r}")
    return path
