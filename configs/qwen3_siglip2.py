"""BLIP3-o's Qwen3-SigLIP2 branch: a Qwen3 backbone (default Qwen3-1.7B), SigLIP2-so400m/16@512 as
the frozen understanding tower with a trainable mlp2x_gelu projector, the same EVA-CLIP 8x8x1792 generation
target and DiT (caption projection from the Qwen3 width).

Argument: `joint` (default: backbone + projector + DiT + queries trained, text CE + flow matching, as run.sh) or
`sequential` (frozen backbone: only the DiT and the queries train), optionally `,QWEN3_PRESET` (qwen3_0_6b,
qwen3_1_7b, qwen3_4b, qwen3_8b, ... from configs/qwen_presets.py).

    python -m blip3o_jax.train --config configs/qwen3_siglip2.py:joint --workdir gs://BUCKET/qwen3_siglip2 \
        --config.init_from=backbone=/ckpt/qwen3_1_7b,gen_encoder=/ckpt/eva_clip_e14_plus,visual=/ckpt/siglip2_512

Data: text-to-image shards and text (question/answer) rows. The language model's text loss therefore comes from
text rows only: the data pipeline builds understanding images for a Qwen2.5-VL tower alone, and the trainer
refuses (one-line error) image-to-text datasets with this SigLIP tower rather than train them without their images.
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

SIGLIP2_SO400M_512 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                          output_layer="last", dtype="bfloat16", param_dtype="float32")


def get_config(arg: str = "joint"):
    mode, _, preset = (arg or "joint").partition(",")
    if mode not in ("joint", "sequential"):
        raise ValueError(f"configs/qwen3_siglip2.py takes joint or sequential, got {mode!r}")
    spec = importlib.util.spec_from_file_location("_blip3o_8b", os.path.join(_HERE, "blip3o_8b.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(backbone=preset or "qwen3_1_7b")
    c.model.und_tower_kind = "siglip_vision"
    c.model.und_tower = dict(SIGLIP2_SO400M_512)
    c.model.und_image_size = 512
    c.data.datasets = [
        dict(name="t2i", paths="gs://YOUR_BUCKET/BLIP3o-Pretrain-*/*.tar", task="t2i", weight=1.0),
        dict(name="text", paths="gs://YOUR_BUCKET/text/*.jsonl", task="text", weight=1.0),
    ]
    c.data.tokenizer = "/ckpt/qwen3_1_7b"
    c.data.seq_buckets = (512, 2048)  # run.sh: model_max_length 2048 (1024 SigLIP tokens per understanding image)
    c.data.tokens.image_start = "[IMG]"  # added tokens; the branch's collator wrongly used 151665
    c.data.global_batch_size = 512
    c.train.freeze_backbone = mode == "sequential"
    c.train.text_loss_weight = 1.0 if mode == "joint" else 0.0  # total = flow matching + CE
    c.model.query_path = "auto"  # prefix caching when the backbone is frozen and there is no text loss
    c.train.total_steps = 100_000
    return c
