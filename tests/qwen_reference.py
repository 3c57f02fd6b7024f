"""Tiny random transformers Qwen models (the parity references) shared by the Qwen test files.

Built once per test process (lru_cache) and saved with `save_pretrained`, so every test file reuses the same
models and directories. All parameters are randomised (norm weights around 1, biases non-zero) so that a wrong
mapping of any tensor shows up in the logits.
"""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import torch
import transformers

from blip3o_jax.models import qwen

# name -> (kind, our config). Every kind has >= 2 configs: GQA ratio > 1, tied and untied, Qwen3 with
# head_dim != hidden / heads, Qwen2.5-VL with two different M-RoPE sections.
CONFIGS = {
    "qwen2_tied": ("qwen2", qwen.QwenConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2_untied": ("qwen2", qwen.QwenConfig(
        vocab_size=200, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=1_000_000.0)),
    "qwen3_tied": ("qwen3", qwen.QwenConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, attention_bias=False, qk_norm=True,
        rope_theta=1_000_000.0)),
    "qwen3_untied": ("qwen3", qwen.QwenConfig(
        vocab_size=192, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, attention_bias=False, qk_norm=True,
        rope_theta=10000.0)),
    "vl_untied": ("qwen2_5_vl_text", qwen.QwenConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, mrope_section=(2, 3, 3))),
    "vl_tied": ("qwen2_5_vl_text", qwen.QwenConfig(
        vocab_size=160, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, mrope_section=(4, 6, 6))),
}

_ROOT = tempfile.mkdtemp(prefix="blip3o_qwen_ref_")


def hf_config(kind: str, cfg: qwen.QwenConfig):
    hf = qwen.config_to_hf(kind, cfg)
    hf.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**hf)
    if kind == "qwen3":
        return transformers.Qwen3Config(**hf)
    tie = hf.pop("tie_word_embeddings")
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=cfg.hidden_size,
                  fullatt_block_indexes=[0])
    return transformers.Qwen2_5_VLConfig(text_config=hf, vision_config=vision, tie_word_embeddings=tie,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_class(kind: str):
    return {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
            "qwen2_5_vl_text": transformers.Qwen2_5_VLForConditionalGeneration}[kind]


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """(kind, cfg, torch model in eval mode, save_pretrained directory) for a config name."""
    kind, cfg = CONFIGS[name]
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = _hf_class(kind)(hf_config(kind, cfg))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    directory = os.path.join(_ROOT, name)
    model.save_pretrained(directory)
    return kind, cfg, model, directory


def text_state_dict(directory: str) -> dict[str, np.ndarray]:
    """The checkpoint as written by save_pretrained, without the vision tower."""
    from blip3o_jax.convert.common import load_state_dict

    return {k: v for k, v in load_state_dict(directory).items() if "visual" not in k}


def padded_batch(rng: np.random.RandomState, vocab: int, lengths, total: int, left: bool = True):
    """Random token ids (never 0, the pad) left- (or right-) padded to `total`, and the 1/0 mask."""
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for b, n in enumerate(lengths):
        sl = slice(total - n, total) if left else slice(0, n)
        ids[b, sl] = rng.randint(3, vocab, n)
        mask[b, sl] = 1
    return ids, mask
