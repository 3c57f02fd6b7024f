"""blip3o-jax: BLIP3-o in JAX/Flax.

    import blip3o_jax
    from blip3o_jax import models, convert
    module, params = blip3o_jax.load_pretrained(path)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path: str, *, allow_pickle: bool = False, dtype=None, kind: str | None = None,
                    allow_nonfinite: bool = False):
    """(module, params) from a transformers/diffusers directory (config.json + safetensors) or our converted
    Orbax output.

    The model kind is read from config.json (`model_type`, or diffusers' `_class_name`) or from our converted
    output's blip3o_jax.json; `kind` overrides both (e.g. a DiT, whose config.json names no kind).
    NaN/Inf weights are refused unless `allow_nonfinite`.
    """
    from blip3o_jax.pretrained import load_pretrained as _load

    return _load(path, allow_pickle=allow_pickle, dtype=dtype, kind=kind, allow_nonfinite=allow_nonfinite)
