"""Qwen2 / Qwen2.5-VL text / Qwen3 checkpoints (transformers key names) <-> `models/qwen.py` params.

Checkpoint layouts read:
- Qwen2ForCausalLM / Qwen3ForCausalLM: `model.embed_tokens.weight`, `model.layers.{i}...`, `model.norm.weight`,
  `lm_head.weight` (absent when the embeddings are tied).
- Qwen2_5_VLForConditionalGeneration: the layout transformers (4.x and 5.24's `save_pretrained`) writes, which is the
  one above plus `visual.*`; and the in-memory 5.x layout `model.language_model.*` / `model.visual.*`. The vision
  keys belong to the vision converter and are ignored here.
`to_torch` writes the layout `save_pretrained` writes for each kind (the first one).
"""
from __future__ import annotations

import re

import numpy as np

from blip3o_jax.convert.common import ConversionError, Rule, layer_prefixes, linear_rules, norm_rules
from blip3o_jax.models import qwen as qwen_model

VISION_KEYS = (r"(model\.)?visual\..*",)


def rules(cfg: qwen_model.QwenConfig) -> list[Rule]:
    """The key table. Per-layer keys carry `{i}` (stacked on the scan axis) or, unscanned, one rule per layer."""

    def layer(t: str, f: str) -> list[Rule]:
        return [
            *linear_rules(f"{t}.self_attn.q_proj", f"{f}/self_attn/q_proj", bias=cfg.attention_bias),
            *linear_rules(f"{t}.self_attn.k_proj", f"{f}/self_attn/k_proj", bias=cfg.attention_bias),
            *linear_rules(f"{t}.self_attn.v_proj", f"{f}/self_attn/v_proj", bias=cfg.attention_bias),
            *linear_rules(f"{t}.self_attn.o_proj", f"{f}/self_attn/o_proj", bias=cfg.o_proj_bias),
            *(norm_rules(f"{t}.self_attn.q_norm", f"{f}/self_attn/q_norm") if cfg.qk_norm else []),
            *(norm_rules(f"{t}.self_attn.k_norm", f"{f}/self_attn/k_norm") if cfg.qk_norm else []),
            *linear_rules(f"{t}.mlp.gate_proj", f"{f}/mlp/gate_proj", bias=False),
            *linear_rules(f"{t}.mlp.up_proj", f"{f}/mlp/up_proj", bias=False),
            *linear_rules(f"{t}.mlp.down_proj", f"{f}/mlp/down_proj", bias=False),
            *norm_rules(f"{t}.input_layernorm", f"{f}/input_layernorm"),
            *norm_rules(f"{t}.post_attention_layernorm", f"{f}/post_attention_layernorm"),
        ]

    table = [Rule("model.embed_tokens.weight", "embed_tokens/embedding")]
    for t, f in layer_prefixes(cfg.scan_layers, cfg.num_hidden_layers, "model.layers.{i}", "layers"):
        table += layer(t, f)
    table += norm_rules("model.norm", "norm")
    if not cfg.tie_word_embeddings:
        table += linear_rules("lm_head", "lm_head", bias=False)
    return table


def _normalise_layout(kind: str, state_dict) -> dict:
    sd = dict(state_dict)
    if kind == "qwen2_5_vl_text":
        sd = {k: v for k, v in sd.items() if not any(re.fullmatch(p, k) for p in VISION_KEYS)}
        if any(k.startswith("model.language_model.") for k in sd):
            sd = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
                  for k, v in sd.items()}
    return sd


def prepare(kind: str, state_dict, cfg: qwen_model.QwenConfig):
    sd = _normalise_layout(kind, state_dict)
    what = f"{kind} checkpoint"
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        # some tied checkpoints still store the (identical) head; a different one means the config is wrong
        head = np.asarray(sd.pop("lm_head.weight"))
        embed = sd.get("model.embed_tokens.weight")
        if embed is None or head.shape != np.shape(embed) or not np.array_equal(head, np.asarray(embed)):
            raise ConversionError(
                f"{what}: key 'lm_head.weight' differs from 'model.embed_tokens.weight' but the config ties them "
                "(tie_word_embeddings=True)"
            )
    return sd
