"""A whole BLIP3-o checkpoint <-> our params: the sub-converters of each part, composed by key prefix.

Key layout of the original (`blip3oQwenForCausalLM`, transformers 4.51 layout):
  model.latent_queries                          -> latent_queries (1, n_query, D)
  model.dit.model.*                             -> dit            (convert/dit.py)
  model.gen_vision_tower.vision_tower.model.*   -> gen_encoder    (convert/eva_clip.py; EVA-CLIP-E/14+)
  model.embed_tokens / model.layers / model.norm / lm_head  -> backbone (convert/qwen.py)
  visual.*                                      the Qwen2.5-VL ViT: understanding only, never trained by the
                                                release; skipped here (convert it with --kind qwen2_5_vl)
Transformers >= 4.52 checkpoints (`model.language_model.*`) are accepted too. Every part stays strict: an unknown,
missing or mis-shaped key inside a part raises ConversionError naming it.
"""
from __future__ import annotations

import numpy as np

from blip3o_jax import convert
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models.blip3o import Blip3oConfig

QUERIES_KEYS = ("model.latent_queries", "model.language_model.latent_queries", "latent_queries")
DIT_PREFIXES = ("model.dit.", "model.language_model.dit.", "dit.")
GEN_ENCODER_PREFIXES = ("model.gen_vision_tower.", "model.language_model.gen_vision_tower.", "gen_vision_tower.")
SKIPPED_PREFIXES = ("visual.", "model.visual.", "model.mm_projector.", "model.down_projector.")


def _starts(key: str, prefixes) -> bool:
    return any(key.startswith(p) for p in prefixes)


def split_state_dict(state_dict) -> dict[str, dict]:
    parts = {"latent_queries": {}, "dit": {}, "gen_encoder": {}, "backbone": {}, "skipped": {}}
    for k, v in state_dict.items():
        if k in QUERIES_KEYS:
            parts["latent_queries"][k] = v
        elif _starts(k, DIT_PREFIXES):
            parts["dit"][k] = v
        elif _starts(k, GEN_ENCODER_PREFIXES):
            parts["gen_encoder"][k] = v
        elif _starts(k, SKIPPED_PREFIXES):
            parts["skipped"][k] = v
        else:
            parts["backbone"][k] = v
    return parts


def from_torch(kind: str, state_dict, cfg: Blip3oConfig):
    if kind != "blip3o":
        raise ValueError(f"convert/blip3o.py converts kind 'blip3o', not {kind!r}")
    parts = split_state_dict(state_dict)
    if len(parts["latent_queries"]) != 1:
        raise ConversionError(f"blip3o checkpoint: expected one latent-queries tensor ({QUERIES_KEYS[0]}), found "
                              f"{sorted(parts['latent_queries']) or 'none'}")
    (qkey, queries), = parts["latent_queries"].items()
    want = (1, cfg.n_query, cfg.backbone.hidden_size)
    if tuple(np.shape(queries)) != want:
        raise ConversionError(f"blip3o checkpoint: key {qkey!r} has shape {tuple(np.shape(queries))}, expected {want}")
    params = {"latent_queries": np.asarray(queries),
              "backbone": convert.from_torch(cfg.backbone_kind, parts["backbone"], cfg.backbone)}
    if cfg.loss == "clip_fm":
        if not parts["dit"]:
            raise ConversionError("blip3o checkpoint: no DiT keys (model.dit.model.*)")
        params["dit"] = convert.from_torch("dit", parts["dit"], cfg.dit)
    if cfg.target == "eva_clip":
        if not parts["gen_encoder"]:
            raise ConversionError("blip3o checkpoint: no EVA-CLIP keys (model.gen_vision_tower.vision_tower.model.*); "
                                  "convert the tower separately or use target='precomputed'")
        params["gen_encoder"] = convert.from_torch(cfg.gen_encoder_kind, parts["gen_encoder"], cfg.gen_encoder)
    return params


def to_torch(kind: str, params, cfg: Blip3oConfig) -> dict:
    if kind != "blip3o":
        raise ValueError(f"convert/blip3o.py converts kind 'blip3o', not {kind!r}")
    out = dict(convert.to_torch(cfg.backbone_kind, params["backbone"], cfg.backbone))
    out["model.latent_queries"] = np.asarray(params["latent_queries"])
    if "dit" in params:
        out.update({"model.dit.model." + k: v for k, v in convert.to_torch("dit", params["dit"], cfg.dit).items()})
    if "gen_encoder" in params:
        enc = convert.to_torch(cfg.gen_encoder_kind, params["gen_encoder"], cfg.gen_encoder)
        out.update({"model.gen_vision_tower.vision_tower.model." + k: v for k, v in enc.items()})
    return out
