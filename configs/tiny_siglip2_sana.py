"""The SigLIP2 -> SANA decoder recipe (configs/siglip2_sana.py) at toy scale for CPU: the tests and a quick look.

The same chain and objective on 32 px synthetic images, fp32: a 3-layer SigLIP (patch 4: 8x8 tokens, penultimate
layer, pooled to 4x4 = 16 tokens), a 32-wide connector, a 2-layer SANA (inner width 64) on the 8x8x4 latents of a
3-stage DC-AE (f4, a ResBlock-ResBlock-EfficientViT layout like DC-AE f32c32's). SigLIP and the DC-AE are frozen
random inits (trained weights of these shapes load with --config.init_from=GROUP=DIR); the loss falls within a
few hundred steps on 2 cores.

    python tools/make_synthetic_shards.py --out DIR/shards --num-samples 4000 --image-size 32 --max-objects 1 \
        --format tar --tokenizer-out DIR/tokenizer
    python -m blip3o_jax.train --config configs/tiny_siglip2_sana.py:DIR --workdir /tmp/tiny_sana
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(data_dir: str = ""):
    spec = importlib.util.spec_from_file_location("_siglip2_sana", os.path.join(_HERE, "siglip2_sana.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(os.path.join(data_dir, "shards", "*.tar") if data_dir else "")
    if not data_dir:
        c.data.datasets = []
    c.seed = 0

    c.model.image_size = 32
    c.model.encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           num_channels=3, image_size=32, patch_size=4, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6, scan_layers=False)
    c.model.connector = dict(input_dim=32, output_dim=32, num_pooled_tokens=16)
    c.model.transformer = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
                               num_layers=2, num_cross_attention_heads=4, cross_attention_head_dim=16,
                               cross_attention_dim=64, caption_channels=32, mlp_ratio=2.5, attention_bias=False,
                               sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                               interpolation_scale=None, scan_layers=False)
    c.model.vae = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
                       encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                       decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                       encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                       encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                       encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                       downsample_block_type="Conv", upsample_block_type="interpolate",
                       decoder_norm_types="rms_norm", decoder_act_fns="silu",
                       # a trained DC-AE's config carries its own; 0.5 gives this random init's latents of the
                       # synthetic shapes a standard deviation of about 1
                       scaling_factor=0.5)

    c.data.tokenizer = os.path.join(data_dir, "tokenizer") if data_dir else ""
    c.data.global_batch_size = 16
    c.data.seq_buckets = (48,)
    c.data.num_threads = 1
    c.data.worker_count = 0
    c.data.seed = 0

    c.train.total_steps = 300
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0
    c.train.frozen_param_dtype = "float32"
    c.train.max_consecutive_nonfinite = 10

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint.every = 100
    c.log.every = 10
    return c
