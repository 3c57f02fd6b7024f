"""SANA transformer weights: diffusers `SanaTransformer2DModel` state dict <-> `models/sana.py` params.

Torch keys are those of the diffusers module (`transformer/diffusion_pytorch_model.safetensors`), or of the
BLIP3-o SigLIP2_SANA checkpoint, where the model sits under `transformer.transformer.`. Only layout changes:
Linear weights are transposed, Conv2d weights go OIHW -> HWIO, the GLUMBConv 1x1 convolutions become Dense
kernels. The sincos position embedding is a non-persistent buffer in diffusers, so it is not in the state dict.
"""
from __future__ import annotations

from blip3o_jax.convert.common import (
    Rule,
    conv1x1_as_linear_rules,
    conv_rules,
    layer_prefixes,
    linear_rules,
    norm_rules,
)

PREFIXES = ("transformer.transformer.", "transformer.")


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def block_rules(cfg, torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """One `SanaTransformerBlock` (torch_prefix like "transformer_blocks.{i}"; "" for a bare block)."""
    t = lambda name: _join(torch_prefix, name, ".")  # noqa: E731
    f = lambda name: _join(flax_prefix, name, "/")  # noqa: E731
    rules = [Rule(t("scale_shift_table"), f("scale_shift_table"))]
    for attn, qkv_bias in (("attn1", cfg.attention_bias), ("attn2", True)):
        for proj in ("to_q", "to_k", "to_v"):
            rules += linear_rules(t(f"{attn}.{proj}"), f(f"{attn}/{proj}"), bias=qkv_bias)
        rules += linear_rules(t(f"{attn}.to_out.0"), f(f"{attn}/to_out"))
        if cfg.qk_norm is not None:
            rules += norm_rules(t(f"{attn}.norm_q"), f(f"{attn}/norm_q"))
            rules += norm_rules(t(f"{attn}.norm_k"), f(f"{attn}/norm_k"))
    if cfg.norm_elementwise_affine:
        rules += norm_rules(t("norm2"), f("norm2"), bias=True)
    rules += conv1x1_as_linear_rules(t("ff.conv_inverted"), f("ff/conv_inverted"))
    rules += conv_rules(t("ff.conv_depth"), f("ff/conv_depth"))
    rules += conv1x1_as_linear_rules(t("ff.conv_point"), f("ff/conv_point"), bias=False)
    return rules


def rules(cfg) -> list[Rule]:
    out = conv_rules("patch_embed.proj", "patch_embed/proj")
    te = "time_embed.emb.timestep_embedder"
    out += linear_rules(f"{te}.linear_1", "time_embed/emb/timestep_embedder/linear_1")
    out += linear_rules(f"{te}.linear_2", "time_embed/emb/timestep_embedder/linear_2")
    out += linear_rules("time_embed.linear", "time_embed/linear")
    out += linear_rules("caption_projection.linear_1", "caption_projection/linear_1")
    out += linear_rules("caption_projection.linear_2", "caption_projection/linear_2")
    out += norm_rules("caption_norm", "caption_norm")
    for torch_prefix, flax_prefix in layer_prefixes(cfg.scan_layers, cfg.num_layers, "transformer_blocks.{i}",
                                                    "transformer_blocks"):
        out += block_rules(cfg, torch_prefix, flax_prefix)
    out.append(Rule("scale_shift_table", "scale_shift_table"))
    out += linear_rules("proj_out", "proj_out")
    return out
