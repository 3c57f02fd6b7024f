"""BLIP3-o's SigLIP2 -> SANA image decoder, trained as the original's Reconstruction branch
(JiuhaiChen/BLIP3o@Reconstruction `train_image_reconstruction.py` + `run.sh`): the frozen SigLIP2-so400m-patch16-512
tower's penultimate features, average-pooled to 64 tokens, go through a trained connector (Linear, GELU(tanh),
Linear, RMSNorm) into SANA-1600M (trained), which denoises the 16x16x32 DC-AE f32c32 latents (frozen DC-AE) of
the same 512 px crop by flow matching.

    python -m blip3o_jax.train --config configs/siglip2_sana.py:'/data/shards/*.tar' --workdir gs://BUCKET/sana \
        --config.init_from=encoder=/ckpt/siglip2-so400m-patch16-512,transformer=/ckpt/Sana_1600M_512px_diffusers/transformer,vae=/ckpt/Sana_1600M_512px_diffusers/vae

`init_from` takes the upstream directories as they are (config.json + safetensors) or convert_torch_weights.py
output, one `GROUP=DIR` per part (encoder, connector, transformer, vae); a bare DIR is a whole SANA decoder folder
(encoder/, connector/, transformer/, vae/, e.g. the released BLIP3o/SigLIP2_SANA) and loads all four. The
connector starts from its init (RMSNorm weight sqrt(5.5)) as in the original.

Objective, as `DiffusionDecoder.forward` and `i2i_process_fn`: x0 = DC-AE latent * scaling_factor (0.41407, no
shift), σ uniform over the 1000-entry FlowMatchEulerDiscreteScheduler table (weighting "uniform"; SANA's scheduler
config in that class has shift 1), x_t = (1 - σ) x0 + σ ε, SANA's timestep 1000·σ, target ε - x0, per-sample MSE
averaged over the batch; 10 % of the samples (drawn per sample) see the SigLIP features of an all-black image, the
null condition that sampling guides against (CFG 3.0, 30 steps).

Hyper-parameters as the original's `TrainingArguments`: 8 GPUs x 64 = global batch 512, AdamW lr 1e-4 (β 0.9/0.999,
eps 1e-8, weight decay 0.05), 5000 warm-up steps then cosine to 0, clipping at 0.5, bf16 compute, gradient
checkpointing in SANA, a checkpoint every 1000 steps. The total is not stated (HF's default 3 epochs over an
unnamed image set): 100k steps here. Differences: fp32 master weights (the original keeps SANA's in bf16);
weight decay skips every 1-D param (HF skips biases and norms); the image crop is the data pipeline's
Resize + CenterCrop with bicubic resampling (torchvision's default in the original is bilinear).

The data pipeline reads text-to-image tar shards (image + caption): the caption is tokenized but unused, so any
tokenizer directory does for `data.tokenizer`.
"""
import ml_collections

from blip3o_jax.data import pipeline

# google/siglip2-so400m-patch16-512's vision_config
SIGLIP2_SO400M_512 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          num_channels=3, image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6)
# Efficient-Large-Model/Sana_1600M_512px_diffusers transformer/config.json
SANA_1600M_512 = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                      num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                      caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=16, patch_size=1,
                      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
# ... and its vae/config.json: DC-AE f32c32 (sana-1.0)
DC_AE_F32C32 = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                    decoder_act_fns="silu", scaling_factor=0.41407)


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 42  # the original's seed and data_seed

    c.model = ml_collections.ConfigDict()
    c.model.kind = "sana_decoder"
    c.model.target = "dc_ae"  # DC-AE latents computed in the step
    c.model.image_size = ml_collections.FieldReference(512)  # target_image_size = SigLIP's 512
    # config.json fields + our execution policy (bf16 compute, scanned layers; frozen parts without remat)
    c.model.encoder = dict(SIGLIP2_SO400M_512, dtype="bfloat16", param_dtype="float32", scan_layers=True)
    c.model.connector = dict(input_dim=1152, output_dim=2304, num_pooled_tokens=64)
    c.model.transformer = dict(SANA_1600M_512, dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=True,
                               remat_policy="full")
    c.model.vae = dict(DC_AE_F32C32, dtype="bfloat16", param_dtype="float32")

    # cond_drop_prob: the share of samples conditioned on the black image; uniform σ over the 1000-step table, shift
    # 1; the sampler settings are what blip3o-sample i2i --decoder sana uses by default (30 steps, CFG 3.0)
    c.flow = ml_collections.ConfigDict(dict(cond_drop_prob=0.1, timestep_sampling="uniform_discrete", shift=1.0,
                                            num_train_timesteps=1000, num_inference_steps=30, guidance_scale=3.0))

    c.data = pipeline.default_config()
    c.data.datasets = [dict(name="images", paths=arg or "gs://YOUR_BUCKET/images/*.tar", task="t2i")]
    c.data.tokenizer = "/ckpt/qwen2_5_vl_7b_text"  # any tokenizer: the captions are not used
    c.data.global_batch_size = 512
    c.data.seq_buckets = (128,)  # captions are cut to fit; they are not used
    c.data.n_query = 1
    c.data.gen_image_size = c.model.get_ref("image_size")
    c.data.precomputed_targets = "never"  # the latents are computed in the step (SigLIP needs the image anyway)
    c.data.num_threads = 16
    c.data.worker_count = 8

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 100_000
    c.train.lr = 1e-4
    c.train.min_lr = 0.0
    c.train.schedule = "cosine"
    c.train.warmup_steps = 5000
    c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
    c.train.weight_decay = 0.05
    c.train.grad_clip_norm = 0.5
    c.train.grad_accum_steps = 1
    c.train.frozen_param_dtype = "bfloat16"
    c.train.ema_decay = 0.0  # the original keeps none
    c.train.max_consecutive_nonfinite = 20

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=2, async_save=True, save_frozen=True,
                                                  restore_step=ml_collections.config_dict.placeholder(int)))
    c.log = ml_collections.ConfigDict(dict(every=50, sigma_buckets=5, tensorboard=True, progress_bar=True,
                                           sample_every=0))
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))
    c.init_from = ""
    return c
