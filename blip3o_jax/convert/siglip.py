"""SigLIP vision tower <-> transformers `SiglipVisionModel` checkpoints.

Key names: `vision_model.embeddings.patch_embedding.*`, `vision_model.embeddings.position_embedding.weight`,
`vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*`,
`vision_model.post_layernorm.*`, `vision_model.head.*` (published checkpoints and transformers 4.x). transformers 5
stores the vision model's modules without the `vision_model.` level; both load. Prefixes of the BLIP3-o variants:
`model.vision_tower.` (Qwen3-SigLIP2 branch: blip3oQwenModel.vision_tower = SiglipVisionModel) and `encoder.`
(SigLIP2+SANA reconstruction: `self.encoder = SiglipVisionModel`). A full SiglipModel checkpoint's `text_model.*`
is skipped by the prefix selection.

Skipped on purpose (never used by BLIP3-o's feature paths): the attention-pooling `head.*`; with
`output_layer="penultimate"` also the last encoder layer and `post_layernorm`, whose outputs hidden_states[-2]
does not depend on. `to_torch` writes the published layout (`vision_model.` prefix) of the tensors we hold.
"""
from __future__ import annotations

import numpy as np

from blip3o_jax.convert.common import ConversionError, Rule, layer_prefixes, linear_rules, norm_rules
from blip3o_jax.models.siglip import SiglipVisionConfig

PREFIXES = (
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.vision_model.",
    "encoder.vision_model.",
    "encoder.model.vision_model.",
    "vision_model.",
)
SAVE_PREFIX = "vision_model."


def rules(cfg: SiglipVisionConfig) -> list[Rule]:
    p, c = cfg.patch_size, cfg.num_channels

    def patch_to_flax(x):  # Conv2d (out, c, ph, pw) -> (ph*pw*c, out)
        return np.transpose(x, (2, 3, 1, 0)).reshape(p * p * c, -1)

    def patch_to_torch(x):
        return np.transpose(x.reshape(p, p, c, -1), (3, 2, 0, 1))

    rules = [
        Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", patch_to_flax, patch_to_torch),
        Rule("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias"),
        Rule("embeddings.position_embedding.weight", "embeddings/position_embedding"),
    ]
    for t, f in layer_prefixes(cfg.scan_layers, cfg.num_layers_run, "encoder.layers.{i}", "encoder/layers"):
        rules += norm_rules(f"{t}.layer_norm1", f"{f}/layer_norm1", bias=True)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear_rules(f"{t}.self_attn.{proj}", f"{f}/self_attn/{proj}")
        rules += norm_rules(f"{t}.layer_norm2", f"{f}/layer_norm2", bias=True)
        rules += linear_rules(f"{t}.mlp.fc1", f"{f}/mlp/fc1")
        rules += linear_rules(f"{t}.mlp.fc2", f"{f}/mlp/fc2")
    if cfg.output_layer == "last":
        rules += norm_rules("post_layernorm", "post_layernorm", bias=True)
    return rules


def ignored(cfg: SiglipVisionConfig) -> list[str]:
    ignore = [r"head\..*", r"embeddings\.position_ids"]
    if cfg.output_layer == "penultimate":
        ignore += [rf"encoder\.layers\.{cfg.num_hidden_layers - 1}\..*", r"post_layernorm\..*"]
    return ignore


def prepare(kind: str, sd: dict, cfg: SiglipVisionConfig) -> dict:
    layers_in_ckpt = {int(k.split("encoder.layers.")[1].split(".")[0]) for k in sd if "encoder.layers." in k}
    # a "penultimate" export of ours (to_torch) lacks the unused last layer; a full checkpoint has all of them
    if layers_in_ckpt and max(layers_in_ckpt) + 1 not in (cfg.num_hidden_layers, cfg.num_layers_run):
        raise ConversionError(
            f"siglip checkpoint: has {max(layers_in_ckpt) + 1} encoder layers but the config says "
            f"num_hidden_layers={cfg.num_hidden_layers}"
        )
    return sd
