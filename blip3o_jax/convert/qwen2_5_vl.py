"""Full Qwen2.5-VL checkpoints <-> {"visual": ..., "language_model": ...} params.

The two halves are the text table (`convert/qwen.py`, which ignores `visual.*`) and the vision table
(`convert/qwen2_5_vl_vision.py`). Layouts read: the on-disk one (`visual.*`, `model.layers.*`, `model.embed_tokens`,
`lm_head`: released checkpoints and transformers 5.24's `save_pretrained`) and transformers 5.x's in-memory one
(`model.visual.*`, `model.language_model.*`). `to_torch` writes the on-disk layout.
"""
from __future__ import annotations

from blip3o_jax import convert
from blip3o_jax.convert import qwen2_5_vl_vision as vision_convert
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import qwen2_5_vl as qvl


def from_torch(kind: str, state_dict, cfg: qvl.Qwen2_5_VLConfig):
    if kind != "qwen2_5_vl":
        raise ValueError(f"convert.qwen2_5_vl: unknown kind {kind!r}")
    vision_keys = [k for k in state_dict if k.startswith(vision_convert.PREFIXES)]
    if not vision_keys:
        raise ConversionError(
            "Qwen2.5-VL checkpoint: no vision tower keys (visual.* or model.visual.*); is this a text-only checkpoint?"
        )
    visual = {k: state_dict[k] for k in vision_keys}
    text = {k: v for k, v in state_dict.items() if not k.startswith(vision_convert.PREFIXES)}
    return {
        "visual": convert.from_torch("qwen2_5_vl_vision", visual, cfg.vision),
        "language_model": convert.from_torch("qwen2_5_vl_text", text, cfg.text),
    }


def to_torch(kind: str, params, cfg: qvl.Qwen2_5_VLConfig) -> dict:
    if kind != "qwen2_5_vl":
        raise ValueError(f"convert.qwen2_5_vl: unknown kind {kind!r}")
    out = convert.to_torch("qwen2_5_vl_text", params["language_model"], cfg.text)
    out.update(convert.to_torch("qwen2_5_vl_vision", params["visual"], cfg.vision))
    return out
