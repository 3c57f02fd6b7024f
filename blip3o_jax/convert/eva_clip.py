"""EVA-CLIP-E vision tower <-> the torch checkpoints BLIP3-o uses.

Key names come from BLIP3o's `EVAVisionTransformer` (`blip3o/model/multimodal_encoder/eva_clip/eva_vit.py`):
`cls_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`, `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*`,
`blocks.{i}.attn.proj.*`, `blocks.{i}.norm2.*`, `blocks.{i}.mlp.fc1.*`, `blocks.{i}.mlp.fc2.*`.
Where they are found:
- the standalone tower file `jiuhai/eva_clip_vision_tower/pytorch_model.bin`: no prefix (the original strips a
  leading `module.`; its `visual.` stripping is commented out, so keys load into the bare transformer);
- a BLIP3o checkpoint: `model.gen_vision_tower.vision_tower.model.` (blip3oQwenModel.gen_vision_tower =
  EvaClipVisionTower -> .vision_tower = EVAEncoderWrapper -> .model = EVAVisionTransformer; transformers 4.51
  names the inner model `model`, newer ones `model.language_model`);
- BAAI's EVA-CLIP checkpoints: `visual.`, with a final `norm`/`head` the BLIP3o tower does not use.
The original loads with `strict=False`; we are strict except for those known unused tensors.
"""
from __future__ import annotations

import numpy as np

from blip3o_jax.convert.common import Rule, layer_prefixes, linear_rules, norm_rules
from blip3o_jax.models.eva_clip import EvaClipConfig

PREFIXES = (
    "model.gen_vision_tower.vision_tower.model.",
    "model.language_model.gen_vision_tower.vision_tower.model.",
    "gen_vision_tower.vision_tower.model.",
    "vision_tower.model.",
    "module.visual.",
    "visual.",
    "module.",
)

# Tensors a checkpoint may carry that BLIP3o's feature path never reads: BAAI's final norm / pooled-feature norm /
# projection head, and RoPE buffers of rope-enabled EVA variants (rope=False here; `config_from_hf` rejects rope).
IGNORED = (r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"head\.(weight|bias)", r"rope\.freqs_(cos|sin)")


def rules(cfg: EvaClipConfig) -> list[Rule]:
    p, c, w = cfg.patch_size, cfg.num_channels, cfg.width
    hd = cfg.num_heads * cfg.head_width

    def patch_to_flax(x):  # torch Conv2d (out, c, ph, pw) -> (ph*pw*c, out), matching PatchEmbed's flattening
        return np.transpose(x, (2, 3, 1, 0)).reshape(p * p * c, -1)

    def patch_to_torch(x):
        return np.transpose(x.reshape(p, p, c, -1), (3, 2, 0, 1))

    def qkv_w_to_flax(x):  # (3*H*D, width) -> (width, 3, H*D)
        return np.transpose(x).reshape(x.shape[1], 3, hd)

    def qkv_w_to_torch(x):
        return np.transpose(x.reshape(x.shape[0], 3 * hd))

    rules = [
        Rule("cls_token", "cls_token"),
        Rule("pos_embed", "pos_embed"),
        Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", patch_to_flax, patch_to_torch),
        Rule("patch_embed.proj.bias", "patch_embed/proj/bias"),
    ]
    for t, f in layer_prefixes(cfg.scan_layers, cfg.layers, "blocks.{i}", "blocks"):
        rules += norm_rules(f"{t}.norm1", f"{f}/norm1", bias=True)
        rules.append(Rule(f"{t}.attn.qkv.weight", f"{f}/attn/qkv/kernel", qkv_w_to_flax, qkv_w_to_torch))
        if cfg.qkv_bias:
            rules.append(Rule(f"{t}.attn.qkv.bias", f"{f}/attn/qkv/bias",
                              lambda x: x.reshape(3, hd), lambda x: x.reshape(3 * hd)))
        rules += linear_rules(f"{t}.attn.proj", f"{f}/attn/proj")
        rules += norm_rules(f"{t}.norm2", f"{f}/norm2", bias=True)
        rules += linear_rules(f"{t}.mlp.fc1", f"{f}/mlp/fc1")
        rules += linear_rules(f"{t}.mlp.fc2", f"{f}/mlp/fc2")
    return rules
