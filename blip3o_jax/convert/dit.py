"""DiT weights: the original's `NextDiTCrossAttn` state dict <-> our `models/dit.py` params.

Torch names are those of the module tree under `model.dit.model.` in a BLIP3o checkpoint: the modified `LuminaNextDiT2DModel` with its `caption_projection`. The prefix may be
present (`model.dit.model.`, `dit.model.`, `model.dit.`) or absent. diffusers' unused `pad_token` (present in
newer diffusers `LuminaNextDiT2DModel`s, absent from the original) is accepted and dropped.

Only layout changes: Linear weights are transposed; `patch_embedder.proj.weight` also has its input features
permuted from torch's (C, ph, pw) patch flattening to our channels-last (ph, pw, C).
"""
from __future__ import annotations

import numpy as np

from blip3o_jax.convert.common import Rule, layer_prefixes, linear_rules, norm_rules
from blip3o_jax.models import dit as dit_lib

PREFIXES = ("model.dit.model.", "dit.model.", "model.dit.")
IGNORED = (r"pad_token",)


def _patch_rule(cfg: dit_lib.DiTConfig) -> Rule:
    p, c = cfg.patch_size, cfg.in_channels

    def to_flax(w):  # (dim, C*p*p) torch, features (C, ph, pw) -> (p*p*C, dim), features (ph, pw, C)
        return np.transpose(w.reshape(w.shape[0], c, p, p), (2, 3, 1, 0)).reshape(p * p * c, w.shape[0])

    def to_torch(k):  # inverse
        return np.transpose(k.reshape(p, p, c, k.shape[1]), (3, 2, 0, 1)).reshape(k.shape[1], c * p * p)

    return Rule("patch_embedder.proj.weight", "patch_embedder/proj/kernel", to_flax, to_torch)


def block_rules(cfg: dit_lib.DiTConfig, torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """Rules of one LuminaNextDiTBlock (torch_prefix like "layers.{i}" for the scan-stacked layers)."""
    t, f = torch_prefix, flax_prefix
    rules = [Rule(f"{t}.gate", f"{f}/gate")]
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            rules += linear_rules(f"{t}.{attn}.{proj}", f"{f}/{attn}/{proj}", bias=False)
        if cfg.qk_norm:
            rules += norm_rules(f"{t}.{attn}.norm_q", f"{f}/{attn}/norm_q", bias=True)
            rules += norm_rules(f"{t}.{attn}.norm_k", f"{f}/{attn}/norm_k", bias=True)
    rules += linear_rules(f"{t}.attn2.to_out.0", f"{f}/attn2/to_out", bias=False)
    for lin in ("linear_1", "linear_2", "linear_3"):
        rules += linear_rules(f"{t}.feed_forward.{lin}", f"{f}/feed_forward/{lin}", bias=False)
    rules += linear_rules(f"{t}.norm1.linear", f"{f}/norm1/linear")
    rules += norm_rules(f"{t}.norm1.norm", f"{f}/norm1/norm")
    for norm in ("ffn_norm1", "norm2", "ffn_norm2", "norm1_context"):
        rules += norm_rules(f"{t}.{norm}", f"{f}/{norm}")
    return rules


def rules(cfg: dit_lib.DiTConfig) -> list[Rule]:
    out = [_patch_rule(cfg), Rule("patch_embedder.proj.bias", "patch_embedder/proj/bias")]
    out += linear_rules("caption_projection.linear_1", "caption_projection/linear_1")
    out += linear_rules("caption_projection.linear_2", "caption_projection/linear_2")
    te = "time_caption_embed"
    out += linear_rules(f"{te}.timestep_embedder.linear_1", f"{te}/timestep_embedder/linear_1")
    out += linear_rules(f"{te}.timestep_embedder.linear_2", f"{te}/timestep_embedder/linear_2")
    out += norm_rules(f"{te}.caption_embedder.0", f"{te}/caption_embedder_norm", bias=True)
    out += linear_rules(f"{te}.caption_embedder.1", f"{te}/caption_embedder_linear")
    for t, f in layer_prefixes(cfg.scan_layers, cfg.n_layers, "layers.{i}", "layers"):
        out += block_rules(cfg, t, f)
    out += linear_rules("norm_out.linear_1", "norm_out/linear_1")
    out += linear_rules("norm_out.linear_2", "norm_out/linear_2")
    return out
