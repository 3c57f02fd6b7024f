"""DC-AE weights: diffusers `AutoencoderDC` state dict <-> our `models/autoencoder_dc.py` params.

Torch names follow the diffusers module tree: `encoder.down_blocks.{i}.{j}` is entry j of stage i's
`nn.Sequential` (the blocks, then the downsampler), `decoder.up_blocks.{i}.{j}` likewise (the upsampler first);
ours are `encoder/down_blocks_{i}_{j}` and `decoder/up_blocks_{i}_{j}`. 3x3 / depthwise / grouped convolutions
are transposed OIHW <-> HWIO; 1x1 convolutions of GLUMBConv and the attention Linears become `Dense` kernels.
BatchNorm's `running_mean`/`running_var` are params `mean`/`var`; its `num_batches_tracked` counter (training
bookkeeping, unused in eval) is dropped, and torch's BatchNorm fills it in again when such a dict is loaded.
"""
from __future__ import annotations

from blip3o_jax.convert.common import Rule, conv1x1_as_linear_rules, conv_rules, linear_rules, norm_rules
from blip3o_jax.models.autoencoder_dc import AutoencoderDCConfig

PREFIXES = ("vae.",)  # a DC-AE stored inside a pipeline-level state dict
IGNORED = (r"(.*\.)?num_batches_tracked",)


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def norm_layer_rules(norm_type: str, t: str, f: str) -> list[Rule]:
    rules = norm_rules(t, f, bias=True)
    if norm_type == "batch_norm":
        rules += [Rule(f"{t}.running_mean", f"{f}/mean"), Rule(f"{t}.running_var", f"{f}/var")]
    return rules


def resblock_rules(t: str, f: str, norm_type: str) -> list[Rule]:
    """diffusers `ResBlock` under torch prefix t / flax prefix f ("" for a bare block)."""
    tj, fj = (lambda n: _join(t, n, ".")), (lambda n: _join(f, n, "/"))
    return (conv_rules(tj("conv1"), fj("conv1")) + conv_rules(tj("conv2"), fj("conv2"), bias=False)
            + norm_layer_rules(norm_type, tj("norm"), fj("norm")))


def efficientvit_rules(t: str, f: str, qkv_multiscales: tuple[int, ...], norm_type: str) -> list[Rule]:
    """diffusers `EfficientViTBlock`: `attn` (SanaMultiscaleLinearAttention) and `conv_out` (GLUMBConv)."""
    ta, fa = _join(t, "attn", "."), _join(f, "attn", "/")
    rules = []
    for proj in ("to_q", "to_k", "to_v"):
        rules += linear_rules(f"{ta}.{proj}", f"{fa}/{proj}", bias=False)
    for s in range(len(qkv_multiscales)):
        for part in ("proj_in", "proj_out"):
            rules += conv_rules(f"{ta}.to_qkv_multiscale.{s}.{part}", f"{fa}/to_qkv_multiscale_{s}/{part}", bias=False)
    rules += linear_rules(f"{ta}.to_out", f"{fa}/to_out", bias=False)
    rules += norm_layer_rules(norm_type, f"{ta}.norm_out", f"{fa}/norm_out")
    tc, fc = _join(t, "conv_out", "."), _join(f, "conv_out", "/")
    rules += conv1x1_as_linear_rules(f"{tc}.conv_inverted", f"{fc}/conv_inverted")
    rules += conv_rules(f"{tc}.conv_depth", f"{fc}/conv_depth")
    rules += conv1x1_as_linear_rules(f"{tc}.conv_point", f"{fc}/conv_point", bias=False)
    rules += norm_rules(f"{tc}.norm", f"{fc}/norm", bias=True)
    return rules


def resample_rules(t: str, f: str) -> list[Rule]:
    """diffusers `DCDownBlock2d` / `DCUpBlock2d`: one conv (the shortcuts have no parameters)."""
    return conv_rules(_join(t, "conv", "."), _join(f, "conv", "/"))


def block_rules(block_type: str, t: str, f: str, qkv_multiscales, norm_type: str) -> list[Rule]:
    if block_type == "ResBlock":
        return resblock_rules(t, f, norm_type)
    return efficientvit_rules(t, f, qkv_multiscales, norm_type)


def rules(cfg: AutoencoderDCConfig) -> list[Rule]:
    out = []
    # encoder
    widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
    n = len(widths)
    stem = conv_rules if depths[0] else resample_rules  # an empty first stage has a resampling stem
    out += stem("encoder.conv_in", "encoder/conv_in")
    for i in range(n):
        for j in range(depths[i]):
            out += block_rules(cfg.encoder_block_types[i], f"encoder.down_blocks.{i}.{j}",
                               f"encoder/down_blocks_{i}_{j}", cfg.encoder_qkv_multiscales[i], "rms_norm")
        if i < n - 1 and depths[i]:
            out += resample_rules(f"encoder.down_blocks.{i}.{depths[i]}", f"encoder/down_blocks_{i}_{depths[i]}")
    out += conv_rules("encoder.conv_out", "encoder/conv_out")
    # decoder
    widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
    n = len(widths)
    out += conv_rules("decoder.conv_in", "decoder/conv_in")
    for i in range(n):
        first = 0
        if i < n - 1 and depths[i]:
            out += resample_rules(f"decoder.up_blocks.{i}.0", f"decoder/up_blocks_{i}_0")
            first = 1
        for j in range(first, first + depths[i]):
            out += block_rules(cfg.decoder_block_types[i], f"decoder.up_blocks.{i}.{j}", f"decoder/up_blocks_{i}_{j}",
                               cfg.decoder_qkv_multiscales[i], cfg.decoder_norm_types[i])
    out += norm_rules("decoder.norm_out", "decoder/norm_out", bias=True)
    head = conv_rules if depths[0] else resample_rules
    out += head("decoder.conv_out", "decoder/conv_out")
    return out
