"""The one registry of model kinds.

Each model file under `blip3o_jax/models/` declares its kind(s) once, at import, with `register(Kind(...))`:
the config parser, the module factory, the example inputs that give its parameter shapes, the converter table
(a module under `blip3o_jax/convert/`), the names that identify it on disk (transformers `model_type`, diffusers
`_class_name`) and the training param group it initialises. `models.build`, `convert.from_torch/to_torch`,
`pretrained.resolve/load_pretrained` and the trainer's `init_from` all read this registry; nothing else lists
kinds. The model files are discovered by walking the package, so adding a kind is one model file plus one
converter table (docs/adding_a_model_kind.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

# files in blip3o_jax/models that hold shared pieces, not kinds (imported on demand by the model files)
_NOT_MODEL_FILES = {"registry", "layers", "conv_blocks"}


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    config_from_hf: Callable[[dict], Any]  # config.json dict (transformers or diffusers) -> our config dataclass
    build: Callable[[Any], Any]  # our config -> flax.linen.Module
    init_args: Callable[[Any], tuple] | None  # our config -> (args, kwargs, method) of a shape-only `module.init`
    converter: str | None = None  # module under blip3o_jax.convert holding this kind's rule table
    model_types: tuple[str, ...] = ()  # transformers `model_type` values in config.json that mean this kind
    class_names: tuple[str, ...] = ()  # diffusers `_class_name` values in config.json that mean this kind
    init_group: str | None = None  # the Blip3o param group this kind initialises through config.init_from


_KINDS: dict[str, Kind] = {}
_loaded = False


def register(kind: Kind) -> Kind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"model kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import blip3o_jax.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_MODEL_FILES and not info.name.startswith("_"):
            importlib.import_module(f"blip3o_jax.models.{info.name}")
    _loaded = True


def kinds() -> dict[str, Kind]:
    _load_all()
    return dict(_KINDS)


def get(name: str) -> Kind:
    _load_all()
    if name not in _KINDS:
        raise ValueError(f"unknown model kind {name!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[name]


def kind_of_config(hf: dict) -> str | None:
    """The kind a config.json names: transformers `model_type` first, then diffusers `_class_name`."""
    _load_all()
    model_type, class_name = hf.get("model_type"), hf.get("_class_name")
    for k in _KINDS.values():
        if model_type is not None and model_type in k.model_types:
            return k.name
    for k in _KINDS.values():
        if class_name is not None and class_name in k.class_names:
            return k.name
    return None


def known_identifiers() -> list[str]:
    _load_all()
    return sorted({n for k in _KINDS.values() for n in (*k.model_types, *k.class_names)})
