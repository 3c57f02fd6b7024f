"""VAE weights: diffusers `AutoencoderKL` state dict <-> our `models/autoencoder_kl.py` params.

Renames plus layout changes (Conv2d (O, I, kh, kw) -> (kh, kw, I, O), Linear transposed, norm `weight` ->
`scale`). The mid-block attention is read under either spelling: `to_q/to_k/to_v/to_out.0` (diffusers >= 0.14
saves these) or the legacy `query/key/value/proj_attn` of older VAE checkpoints, which `prepare` renames as
diffusers' `_convert_deprecated_attention_blocks` does. `to_torch` writes the current spelling. Tensors may sit
under `vae.` in a bigger checkpoint.
"""
from __future__ import annotations

import re

from blip3o_jax.convert.common import ConversionError, Rule, conv_rules, linear_rules, norm_rules
from blip3o_jax.convert.unet import resnet_rules
from blip3o_jax.models import autoencoder_kl as vae_lib

PREFIXES = ("vae.",)

_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def prepare(kind: str, state_dict, cfg):
    """Legacy attention names -> the current ones (a checkpoint holding both spellings of one tensor is refused)."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTENTION.match(key)
        new = f"{m.group(1)}{_RENAMED[m.group(2)]}.{m.group(3)}" if m else key
        if new in out:
            raise ConversionError(f"{kind} checkpoint: {key!r} and {new!r} name the same tensor")
        out[new] = value
    return out


def _mid_rules(cfg: vae_lib.AutoencoderKLConfig, t: str, f: str) -> list[Rule]:
    width = cfg.block_out_channels[-1]
    out = resnet_rules(f"{t}.resnets.0", f"{f}/resnets_0", width, width, temb=False)
    if cfg.mid_block_add_attention:
        a, fa = f"{t}.attentions.0", f"{f}/attentions_0"
        out += norm_rules(f"{a}.group_norm", f"{fa}/group_norm", bias=True)
        for proj in ("to_q", "to_k", "to_v"):
            out += linear_rules(f"{a}.{proj}", f"{fa}/{proj}")
        out += linear_rules(f"{a}.to_out.0", f"{fa}/to_out")
    return out + resnet_rules(f"{t}.resnets.1", f"{f}/resnets_1", width, width, temb=False)


def rules(cfg: vae_lib.AutoencoderKLConfig) -> list[Rule]:
    last = len(cfg.block_out_channels) - 1
    out = conv_rules("encoder.conv_in", "encoder/conv_in")
    for i, resnets in enumerate(vae_lib.encoder_resnet_channels(cfg)):
        t, f = f"encoder.down_blocks.{i}", f"encoder/down_blocks_{i}"
        for j, (cin, cout) in enumerate(resnets):
            out += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin, cout, temb=False)
        if i < last:
            out += conv_rules(f"{t}.downsamplers.0.conv", f"{f}/downsamplers_0/conv")
    out += _mid_rules(cfg, "encoder.mid_block", "encoder/mid_block")
    out += norm_rules("encoder.conv_norm_out", "encoder/conv_norm_out", bias=True)
    out += conv_rules("encoder.conv_out", "encoder/conv_out")
    if cfg.use_quant_conv:
        out += conv_rules("quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        out += conv_rules("post_quant_conv", "post_quant_conv")
    out += conv_rules("decoder.conv_in", "decoder/conv_in")
    out += _mid_rules(cfg, "decoder.mid_block", "decoder/mid_block")
    for i, resnets in enumerate(vae_lib.decoder_resnet_channels(cfg)):
        t, f = f"decoder.up_blocks.{i}", f"decoder/up_blocks_{i}"
        for j, (cin, cout) in enumerate(resnets):
            out += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin, cout, temb=False)
        if i < last:
            out += conv_rules(f"{t}.upsamplers.0.conv", f"{f}/upsamplers_0/conv")
    out += norm_rules("decoder.conv_norm_out", "decoder/conv_norm_out", bias=True)
    return out + conv_rules("decoder.conv_out", "decoder/conv_out")
