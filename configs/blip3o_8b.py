"""BLIP3o-8B pretraining, the released recipe: frozen Qwen2.5-VL-7B text model, 64 latent
queries, the 1.4B Lumina-Next DiT generating 8x8x1792 EVA-CLIP-E/14+ features of 448 px images by flow matching.

    python -m blip3o_jax.train --config configs/blip3o_8b.py --workdir gs://BUCKET/blip3o_8b \
        --config.init_from=backbone=/ckpt/qwen2_5_vl_7b_text,gen_encoder=/ckpt/eva_clip_e14_plus

Recipe: global batch 512, AdamW lr 1e-4 (β 0.9/0.999, eps 1e-8, wd 0), warm-up 0.3 % of the steps then cosine to
1e-5, clipping 1.0, sequences of 512 tokens (447 prompt + [IMG] + 64 slots), bf16 compute with fp32 masters,
frozen weights stored in bf16. `init_from` takes converted checkpoints (convert_torch_weights.py output): the
Qwen2.5-VL text model (`--kind qwen2_5_vl_text`) and the EVA-CLIP tower (`--kind eva_clip`).
Edit `config.data.datasets` (or pass a config argument: `configs/blip3o_8b.py:/data/shards/*.tar`).
"""
import importlib.util
import os

import ml_collections

from blip3o_jax.data import pipeline

_HERE = os.path.dirname(os.path.abspath(__file__))


def qwen_preset(name: str) -> tuple[str, dict]:
    """(kind, transformers config dict) of a released Qwen backbone from configs/qwen_presets.py."""
    spec = importlib.util.spec_from_file_location("_qwen_presets", os.path.join(_HERE, "qwen_presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kind, hf = module.PRESETS[name]
    return kind, dict(hf)


def get_config(arg: str = "", backbone: str = "qwen2_5_vl_7b"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    kind, hf = qwen_preset(backbone)

    c.model = ml_collections.ConfigDict()
    c.model.backbone_kind = kind
    # transformers field names + our execution policy: bf16 compute, remat'ed scanned layers
    c.model.backbone = dict(hf, dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=True,
                            remat_policy="dots_no_batch", attention_impl="xla")
    c.model.n_query = ml_collections.FieldReference(64)
    c.model.query_init_std = 1.0  # torch.randn as the original
    c.model.target = "eva_clip"
    c.model.image_size = ml_collections.FieldReference(448)
    c.model.gen_encoder_kind = "eva_clip"
    c.model.gen_encoder = dict(image_size=448, patch_size=14, width=1792, layers=64, head_width=112,
                               mlp_ratio=8.571428571428571, pool_stride=4, dtype="bfloat16", param_dtype="float32",
                               scan_layers=True, remat=False)
    # NextDiTCrossAttn; latent_embedding_size = the backbone width (filled in by the model config)
    c.model.dit = dict(input_size=8, patch_size=1, in_channels=1792, dim=1792, n_layers=24, n_heads=28,
                       n_kv_heads=28, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                       dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=True, remat_policy="full")
    c.model.loss = "clip_fm"
    c.model.query_path = "auto"  # prefix_cache while the backbone is frozen (exact; no prompt backward), else full

    # flow matching: uniform t over 1000 steps, 10 % condition drop; 30 Euler steps, CFG 3.0 at inference
    c.flow = ml_collections.ConfigDict(dict(cond_drop_prob=0.1, num_inference_steps=30, guidance_scale=3.0))

    c.data = pipeline.default_config()
    c.data.datasets = [dict(name="blip3o_pretrain", paths=arg or "gs://YOUR_BUCKET/BLIP3o-Pretrain-*/*.tar",
                            task="t2i")]
    c.data.tokenizer = "/ckpt/qwen2_5_vl_7b_text"  # convert_torch_weights.py copies the tokenizer there
    c.data.global_batch_size = 512
    c.data.seq_buckets = (512,)
    c.data.n_query = c.model.get_ref("n_query")
    c.data.gen_image_size = c.model.get_ref("image_size")
    c.data.num_threads = 16
    c.data.worker_count = 8

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 150_000  # README: >= 150k steps (issue #27)
    c.train.lr = 1e-4
    c.train.min_lr = 1e-5
    c.train.schedule = "cosine"
    c.train.warmup_ratio = 0.003
    c.train.warmup_steps = 0
    c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0  # the config without clipping diverged (issue #75)
    c.train.grad_accum_steps = 1
    c.train.freeze_backbone = True
    c.train.text_loss_weight = 0.0  # T2I only: the LM head is skipped entirely
    c.train.frozen_param_dtype = "bfloat16"
    c.train.max_consecutive_nonfinite = 20

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=2, async_save=True, save_frozen=True,
                                                  restore_step=ml_collections.config_dict.placeholder(int)))
    c.log = ml_collections.ConfigDict(dict(every=50, sigma_buckets=5, tensorboard=True, progress_bar=True))
    # samples while training are drawn for pixel and VAE targets; EVA-CLIP features need the SDXL decoder
    c.log.sample_every = 0
    c.log.sample_prompts = ("a photo of a red apple on a wooden table", "a watercolor painting of a lighthouse",
                            "a cat wearing sunglasses", "a bowl of ramen, studio lighting")
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))  # e.g. start_step=100: steps 100-102
    c.init_from = ""
    return c
