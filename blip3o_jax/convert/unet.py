"""UNet weights: diffusers `UNet2DConditionModel` state dict <-> our `models/unet.py` params.

Renames plus layout changes: Linear weights transposed, Conv2d weights (O, I, kh, kw) -> (kh, kw, I, O), norm
`weight` -> `scale`, `to_out.0` -> `to_out`, `ff.net.0.proj` -> `ff/net_0/proj`. With `use_linear_projection=False`
the Transformer2DModel's proj_in/proj_out are 1x1 convs in torch and Dense layers here. The BasicTransformerBlocks
of one attention are stacked on a leading axis when `scan_layers`. Tensors may sit under `unet.` in a bigger
checkpoint.
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
from blip3o_jax.models import unet as unet_lib

PREFIXES = ("unet.",)


def resnet_rules(t: str, f: str, cin: int, cout: int, temb: bool = True) -> list[Rule]:
    """One ResnetBlock2D (shared with the VAE's, which have no time_emb_proj)."""
    out = norm_rules(f"{t}.norm1", f"{f}/norm1", bias=True) + conv_rules(f"{t}.conv1", f"{f}/conv1")
    if temb:
        out += linear_rules(f"{t}.time_emb_proj", f"{f}/time_emb_proj")
    out += norm_rules(f"{t}.norm2", f"{f}/norm2", bias=True) + conv_rules(f"{t}.conv2", f"{f}/conv2")
    if cin != cout:
        out += conv_rules(f"{t}.conv_shortcut", f"{f}/conv_shortcut")
    return out


def _block_rules(t: str, f: str) -> list[Rule]:
    out = []
    for norm in ("norm1", "norm2", "norm3"):
        out += norm_rules(f"{t}.{norm}", f"{f}/{norm}", bias=True)
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            out += linear_rules(f"{t}.{attn}.{proj}", f"{f}/{attn}/{proj}", bias=False)
        out += linear_rules(f"{t}.{attn}.to_out.0", f"{f}/{attn}/to_out")
    out += linear_rules(f"{t}.ff.net.0.proj", f"{f}/ff/net_0/proj")
    out += linear_rules(f"{t}.ff.net.2", f"{f}/ff/net_2")
    return out


def transformer_rules(cfg: unet_lib.UNetConfig, t: str, f: str, num_layers: int) -> list[Rule]:
    """One Transformer2DModel: GroupNorm, proj_in, the (scan-stacked) blocks, proj_out."""
    proj = linear_rules if cfg.use_linear_projection else conv1x1_as_linear_rules
    out = norm_rules(f"{t}.norm", f"{f}/norm", bias=True) + proj(f"{t}.proj_in", f"{f}/proj_in")
    for tp, fp in layer_prefixes(cfg.scan_layers, num_layers, f"{t}.transformer_blocks.{{i}}",
                                 f"{f}/transformer_blocks"):
        out += _block_rules(tp, fp)
    return out + proj(f"{t}.proj_out", f"{f}/proj_out")


def _level_rules(cfg, level: unet_lib.Level, t: str, f: str, resample: str) -> list[Rule]:
    out = []
    for j, (cin, cout) in enumerate(level.resnets):
        out += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin, cout)
        if level.attention:
            out += transformer_rules(cfg, f"{t}.attentions.{j}", f"{f}/attentions_{j}", level.transformer_layers)
    if level.resample:
        out += conv_rules(f"{t}.{resample}.0.conv", f"{f}/{resample}_0/conv")
    return out


def rules(cfg: unet_lib.UNetConfig) -> list[Rule]:
    out = conv_rules("conv_in", "conv_in")
    out += linear_rules("time_embedding.linear_1", "time_embedding/linear_1")
    out += linear_rules("time_embedding.linear_2", "time_embedding/linear_2")
    if cfg.addition_embed_type == "text_time":
        out += linear_rules("add_embedding.linear_1", "add_embedding/linear_1")
        out += linear_rules("add_embedding.linear_2", "add_embedding/linear_2")
    for i, level in enumerate(unet_lib.down_levels(cfg)):
        out += _level_rules(cfg, level, f"down_blocks.{i}", f"down_blocks_{i}", "downsamplers")
    mid = unet_lib.mid_level(cfg)
    if mid is not None:
        for j, (cin, cout) in enumerate(mid.resnets):
            out += resnet_rules(f"mid_block.resnets.{j}", f"mid_block/resnets_{j}", cin, cout)
        out += transformer_rules(cfg, "mid_block.attentions.0", "mid_block/attentions_0", mid.transformer_layers)
    for i, level in enumerate(unet_lib.up_levels(cfg)):
        out += _level_rules(cfg, level, f"up_blocks.{i}", f"up_blocks_{i}", "upsamplers")
    out += norm_rules("conv_norm_out", "conv_norm_out", bias=True)
    return out + conv_rules("conv_out", "conv_out")
