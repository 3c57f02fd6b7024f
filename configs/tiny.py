"""Tiny BLIP3-o for CPU: the demo and the tests (`make demo` trains it in a few minutes on 2 cores).

Same system as the release at toy scale: a frozen 2-layer Qwen3-style backbone with latent queries, and a small
Lumina-Next DiT trained by flow matching. The one deliberate difference: the DiT generates **pixels** (a 32x32 RGB
image, patchified by the DiT into 8x8 patches of 4x4x3 = 48 values, i.e. 64 tokens as in the release), not EVA-CLIP
features, because the release's second stage (an SDXL UNet decoding the features) cannot run here.

    python tools/make_synthetic_shards.py --out DIR/shards --num-samples 4000 --image-size 32 --max-objects 1 \
        --format tar --tokenizer-out DIR/tokenizer
    python -m blip3o_jax.train --config configs/tiny.py:DIR --workdir /tmp/tiny
"""
import os

import ml_collections

from blip3o_jax.data import pipeline


def get_config(data_dir: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.backbone_kind = "qwen3"
    c.model.backbone = dict(
        vocab_size=640,  # >= the tiny tokenizer's size (blip3o_jax.data.tokenizer.build_tiny_tokenizer)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        # a random frozen backbone: a wider init spreads the prompts' hidden states apart (the demo learns faster)
        initializer_range=0.2,
        scan_layers=False,  # 2 layers: nothing to gain from scanning, and unrolled layers run faster on CPU
    )
    c.model.n_query = ml_collections.FieldReference(16)
    c.model.query_init_std = 0.2  # the release uses N(0, 1); at toy width 0.2 trains faster
    c.model.target = "pixels"
    c.model.image_size = ml_collections.FieldReference(32)
    c.model.dit = dict(
        input_size=32,  # the DiT's input is the 32x32x3 image itself ...
        patch_size=4,  # ... as 8x8 patches of 4x4x3
        in_channels=3,
        dim=128,
        n_layers=3,
        n_heads=4,
        n_kv_heads=4,
        multiple_of=32,
        norm_eps=1e-5,
        qk_norm=True,
        scan_layers=False,
    )
    c.model.loss = "clip_fm"
    c.model.query_path = "auto"  # prefix_cache while the backbone is frozen (exact; no prompt backward), else full

    c.flow = ml_collections.ConfigDict(dict(cond_drop_prob=0.1, num_inference_steps=20, guidance_scale=3.0))

    # the data pipeline's section (blip3o_jax/data/pipeline.py); `configs/tiny.py:DIR` reads DIR/shards/*.tar
    # with the tokenizer in DIR/tokenizer (what the demo and tools/make_synthetic_shards.py write)
    c.data = pipeline.default_config()
    c.data.datasets = [dict(name="shapes", paths=os.path.join(data_dir, "shards", "*.tar"), task="t2i")] \
        if data_dir else []
    c.data.tokenizer = os.path.join(data_dir, "tokenizer") if data_dir else ""
    c.data.global_batch_size = 32
    c.data.seq_buckets = (56,)  # ~33 prompt tokens + [IMG] + 16 query slots with the tiny tokenizer
    c.data.n_query = c.model.get_ref("n_query")
    c.data.gen_image_size = c.model.get_ref("image_size")
    c.data.num_threads = 1
    c.data.worker_count = 0
    c.data.seed = 0

    c.train = ml_collections.ConfigDict()
    # tuned for `make demo`: 2000 steps (~6.5 min on 2 quiet cores) follow colour (100 %) and shape (~60 %, real
    # images 83 %) of held-out prompts; 900 steps learn colour but leave shapes as blobs
    c.train.total_steps = 2000
    c.train.lr = 2e-3
    c.train.min_lr = 2e-4
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0
    c.train.grad_accum_steps = 1
    c.train.freeze_backbone = True
    c.train.text_loss_weight = 0.0
    c.train.frozen_param_dtype = "float32"  # fp32 on CPU (faster than bf16 here)
    c.train.max_consecutive_nonfinite = 10

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # keep: None keeps every checkpoint; restore_step: resume from that step instead of the latest
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, async_save=True,
                                                  restore_step=ml_collections.config_dict.placeholder(int)))
    c.log = ml_collections.ConfigDict(dict(every=50, sigma_buckets=5, tensorboard=True, progress_bar=True))
    # a grid of these prompts (fixed noise) every 500 steps: workdir/samples/step_<n>.png and TensorBoard; ~5 s to
    # compile once, then ~0.4 s per grid (20 sampler steps) on 2 CPU cores
    c.log.sample_every = 500
    c.log.sample_prompts = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a purple diamond",
                            "an orange hexagon")
    # a jax.profiler trace of steps [start_step, start_step + num_steps) in workdir/profile; 0: off
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))
    c.init_from = ""
    return c
