"""Model registry: `config_from_hf(kind, dict)` and `build(kind, cfg)` for every component.

Each kind lives in one file under `blip3o_jax/models/` holding its config dataclass and module. A model file
exposes `config_from_hf(kind, hf_config_dict) -> Config` and `build(kind, cfg) -> nn.Module`. Files are imported
lazily so that building the language model never imports the vision towers.
"""
from __future__ import annotations

import importlib
from typing import Any

# kind -> model file (module under blip3o_jax.models)
KINDS: dict[str, str] = {
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

# transformers' `model_type` -> our kind (used by load_pretrained to read config.json)
HF_MODEL_TYPES: dict[str, str] = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_5_vl_text": "qwen2_5_vl_text",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl_vision",
    "siglip_vision_model": "siglip_vision",
    "siglip": "siglip_vision",  # a full SiglipModel checkpoint (e.g. google/siglip2-so400m-patch16-512): its vision half
}


def _module_for(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    return importlib.import_module(f"blip3o_jax.models.{KINDS[kind]}")


def config_from_hf(kind: str, hf_config: Any):
    """Our config for `kind` from a HF-style config dict (or an object with `to_dict()`)."""
    if hasattr(hf_config, "to_dict"):
        hf_config = hf_config.to_dict()
    return _module_for(kind).config_from_hf(kind, dict(hf_config))


def build(kind: str, cfg):
    """A `flax.linen.Module` for `kind` built from our config dataclass."""
    return _module_for(kind).build(kind, cfg)
