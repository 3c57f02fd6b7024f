"""Models: `config_from_hf(kind, dict)` and `build(kind, cfg)` for every registered kind.

Each kind lives in one file under `blip3o_jax/models/` holding its config dataclass, its module and one
`registry.register(Kind(...))` declaration (see `models/registry.py` and docs/adding_a_model_kind.md).
"""
from __future__ import annotations

from typing import Any

from blip3o_jax.models import registry


def config_from_hf(kind: str, hf_config: Any):
    """Our config for `kind` from a transformers/diffusers config dict (or an object with `to_dict()`)."""
    if hasattr(hf_config, "to_dict"):
        hf_config = hf_config.to_dict()
    return registry.get(kind).config_from_hf(dict(hf_config))


def build(kind: str, cfg):
    """A `flax.linen.Module` for `kind` built from our config dataclass."""
    return registry.get(kind).build(cfg)


def kinds() -> list[str]:
    return sorted(registry.kinds())
