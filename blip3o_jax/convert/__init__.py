"""Weight conversion between PyTorch state dicts (checkpoint key names) and our Flax params.

`from_torch(kind, state_dict, cfg)` and `to_torch(kind, params, cfg)` dispatch to one small converter file per
model family (`convert/qwen.py`, `convert/dit.py`, ...), each a table of `Rule`s so they read side by side.
"""
from __future__ import annotations

import importlib

from blip3o_jax.convert.common import ConversionError, load_state_dict  # noqa: F401

CONVERTERS: dict[str, str] = {
    "qwen2": "qwen",
    "qwen2_5_vl_text": "qwen",
    "qwen3": "qwen",
    "dit": "dit",
    "eva_clip": "eva_clip",
    "siglip_vision": "siglip",
    "qwen2_5_vl_vision": "qwen2_5_vl_vision",
    "qwen2_5_vl": "qwen2_5_vl",
    "blip3o": "blip3o",
}


def _converter(kind: str):
    if kind not in CONVERTERS:
        raise ValueError(f"no converter for kind {kind!r}; expected one of {sorted(CONVERTERS)}")
    return importlib.import_module(f"blip3o_jax.convert.{CONVERTERS[kind]}")


def from_torch(kind: str, state_dict, cfg):
    """Flax params for `kind` from {checkpoint key: array}; strict about unknown/missing/mis-shaped keys."""
    return _converter(kind).from_torch(kind, state_dict, cfg)


def to_torch(kind: str, params, cfg) -> dict:
    """The inverse of `from_torch`: {checkpoint key: np.ndarray} with the same keys, shapes and values."""
    return _converter(kind).to_torch(kind, params, cfg)
