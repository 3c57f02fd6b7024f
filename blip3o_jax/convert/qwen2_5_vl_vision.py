"""Qwen2.5-VL vision tower <-> transformers' `Qwen2_5_VisionTransformerPretrainedModel` keys.

Checkpoints name the tower `visual.*` (Hub Qwen2.5-VL / BLIP3o files, and what transformers 5.24's
`save_pretrained` writes) or `model.visual.*` (transformers 5.x module tree / `state_dict()`); a standalone tower
state dict has no prefix. All three are accepted; `to_torch` writes the on-disk `visual.*` names.
"""
from __future__ import annotations

import numpy as np

from blip3o_jax.convert.common import ConversionError, Rule, linear_rules, norm_rules
from blip3o_jax.models import qwen2_5_vl_vision as qv

PREFIXES = ("model.visual.", "visual.")
SAVE_PREFIX = "visual."


def rules(cfg: qv.Qwen2_5_VLVisionConfig) -> list[Rule]:
    """The table without prefix (the engine strips it on read and writes SAVE_PREFIX)."""
    kernel = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    out = [
        # Conv3d(kernel = stride = patch) weight (E, C, T, P, P) == Linear on the flattened (C, T, P, P) patch
        Rule("patch_embed.proj.weight", "patch_embed/kernel",
             to_flax=lambda w: np.asarray(w).reshape(w.shape[0], -1).T,
             to_torch=lambda k: np.asarray(k).T.reshape(kernel)),
    ]
    b = "blocks.{i}"
    out += norm_rules(f"{b}.norm1", "blocks/norm1")
    out += norm_rules(f"{b}.norm2", "blocks/norm2")
    out += linear_rules(f"{b}.attn.qkv", "blocks/attn/qkv")
    out += linear_rules(f"{b}.attn.proj", "blocks/attn/proj")
    for name in ("gate_proj", "up_proj", "down_proj"):
        out += linear_rules(f"{b}.mlp.{name}", f"blocks/mlp/{name}")
    out += norm_rules("merger.ln_q", "merger/ln_q")
    out += linear_rules("merger.mlp.0", "merger/mlp_0")
    out += linear_rules("merger.mlp.2", "merger/mlp_2")
    return out


def prepare(kind: str, state_dict, cfg: qv.Qwen2_5_VLVisionConfig) -> dict:
    """The tower's keys (under one of PREFIXES, or none for a bare tower state dict); a mix of layouts is an error."""
    return select_visual(state_dict)[1]


def select_visual(state_dict) -> tuple[str, dict]:
    """(prefix, the tower's keys with it) from a full Qwen2.5-VL checkpoint or a bare tower state dict."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            other = [k for k in state_dict if k.startswith(PREFIXES) and not k.startswith(prefix)]
            if other:
                raise ConversionError(
                    f"checkpoint mixes vision key prefixes: {other[0]!r} next to {prefix!r}*; expected one layout"
                )
            return prefix, {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    return "", dict(state_dict)
