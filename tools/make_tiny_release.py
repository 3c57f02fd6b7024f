"""Writes a random tiny BLIP3-o checkpoint in the released layout, so `blip3o-sample` runs end to end offline.

    python tools/make_tiny_release.py --out DIR [--seed 0] [--dtype float32|bfloat16] [--force]

DIR receives what `BLIP3o/BLIP3o-Model-4B` / `-8B` hold, at toy size (reference: the original's
`blip3oQwenForInferenceLM` state dict and its `diffusion-decoder/` diffusers folder):

    config.json                 flat Qwen2.5-VL config (transformers 4.x layout) + BLIP3-o fields (n_query,
                                gen_vision_tower, gen_pooling) + `dit_config` / `gen_vision_tower_config` (the
                                original hard-codes both at full size; blip3o_jax.sample reads them when present)
    model.safetensors           Qwen2.5-VL text (`model.layers.*`, `model.embed_tokens`, `model.norm`) and vision
                                (`visual.*`) towers, `model.latent_queries`, the DiT under `model.dit.model.`, the
                                EVA-CLIP tower under `model.gen_vision_tower.vision_tower.model.`
    tokenizer.json (+ config)   a byte-level BPE with Qwen2.5-VL's special tokens and BLIP3-o's [IMG], [/IMG], <image>
    generation_config.json, preprocessor_config.json
    diffusion-decoder/          model_index.json, unet/ and vae/ (config.json +
                                diffusion_pytorch_model.bf16.safetensors), scheduler/scheduler_config.json (Euler)

With `--sana`, DIR/sana-decoder/ holds a tiny SigLIP2 -> connector -> SANA -> DC-AE decoder in the layout of
`BLIP3o/SigLIP2_SANA` (for `blip3o-sample i2i --decoder DIR/sana-decoder`).

Every weight is a random Flax parameter (no norm exactly 1, no bias or gate exactly 0) written through the
project's own converters (`convert.to_torch`) and safetensors writer, so no PyTorch is needed. The folder is built
beside DIR and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# Qwen2.5-VL's special tokens in their order (ids 151643...), then BLIP3-o's added tokens (151665...)
RELEASE_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "[IMG]", "[/IMG]", "<image>",
)

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True, max_position_embeddings=256, hidden_act="silu", use_sliding_window=False,
            initializer_range=0.02)
VISION = dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=48, num_heads=2, in_chans=3,
              out_hidden_size=64, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
              fullatt_block_indexes=[1], tokens_per_second=2, temporal_patch_size=2)
N_QUERY = 16
# the DiT generates a 4x4 grid of 32-wide EVA features (the release: 8x8 of 1792); EVA at 56 px, patch 7 -> 8x8,
# pooled 2x2 -> 4x4 ("early_pool2d_2"; the release: 448 px, patch 14 -> 32x32, pooled 4x4)
DIT = dict(input_size=4, patch_size=1, in_channels=32, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, multiple_of=32,
           ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, learn_sigma=False)
EVA = dict(image_size=56, patch_size=7, width=32, layers=2, head_width=16, mlp_ratio=2.0, qkv_bias=True,
           postnorm=True)
UNET = dict(sample_size=4, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            only_cross_attention=False, block_out_channels=[16, 32], layers_per_block=1, downsample_padding=1,
            mid_block_scale_factor=1, act_fn="silu", norm_num_groups=8, norm_eps=1e-5, cross_attention_dim=32,
            transformer_layers_per_block=[1, 1], attention_head_dim=[2, 4], num_attention_heads=None,
            dual_cross_attention=False, use_linear_projection=True, class_embed_type=None,
            addition_embed_type="text_time", addition_time_embed_dim=4, num_class_embeds=None,
            upcast_attention=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
            resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
            time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
            conv_out_kernel=3, projection_class_embeddings_input_dim=32 + 6 * 4, attention_type="default",
            class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
            addition_embed_type_num_heads=64, encoder_hid_dim=None, encoder_hid_dim_type=None)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
           act_fn="silu", latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025,
           force_upcast=True)
# the Emu2-Gen decoder's scheduler (BLIP3-o's diffusion-decoder/scheduler/scheduler_config.json)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                 use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                 sample_max_value=1.0, trained_betas=None)


def release_config(vocab_size: int, ids: dict) -> dict:
    return {
        "architectures": ["blip3oQwenForInferenceLM"], "model_type": "blip3o_qwen", "torch_dtype": "bfloat16",
        **TEXT, "vocab_size": vocab_size, "vision_config": dict(VISION),
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "n_query": N_QUERY, "gen_vision_tower": "eva-clip-E-14-plus", "gen_pooling": "early_pool2d_2",
        "dit_config": dict(DIT), "gen_vision_tower_config": dict(EVA),
    }


def random_params(kind: str, cfg, seed: int):
    """Random Flax params of `kind`, drawn in NumPy from the shapes of its registry init (no init is executed:
    eager Flax inits of a UNet take minutes on a busy CPU). Norm scales are 1 + N(0, 0.1²), biases, gates and other
    vectors N(0, 0.1²) (so no path of the model is an identity or switched off), embeddings N(0, 0.1²), matrices and
    conv kernels N(0, 1/fan_in)."""
    import flax
    import flax.linen as nn
    import jax

    from blip3o_jax.models import registry

    spec = registry.get(kind)
    args, kwargs, method = spec.init_args(cfg)
    abstract = jax.eval_shape(
        lambda: spec.build(cfg).init(jax.random.PRNGKey(0), *args, method=method, **kwargs))["params"]
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        shape = tuple(value.shape)
        core = shape[1:] if names and names[0] == "layers" else shape  # a scanned stack's leading layer axis
        noise = rng.standard_normal(shape)
        if path[-1] == "scale":
            x = 1.0 + 0.1 * noise
        elif path[-1] == "embedding" or len(core) <= 1:
            x = 0.1 * noise
        else:
            x = noise / np.sqrt(np.prod(core[:-1]))
        flat[path] = x.astype(value.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def _cast(sd: dict, dtype: str) -> dict:
    import ml_dtypes

    target = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return {k: np.asarray(v).astype(target) for k, v in sd.items()}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_tokenizer(out_dir: str) -> tuple[dict, int]:
    """Tokenizer files into out_dir; returns ({special token: id}, vocabulary size)."""
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(out_dir, special_tokens=RELEASE_SPECIAL_TOKENS)
    return {t: tok.convert_tokens_to_ids(t) for t in RELEASE_SPECIAL_TOKENS}, len(tok)


def write_model(out_dir: str, seed: int, dtype: str) -> None:
    from blip3o_jax import convert, models
    from blip3o_jax.convert.common import write_safetensors
    from blip3o_jax.sample import release_config as parse_release

    ids, vocab = build_tokenizer(out_dir)
    hf = release_config(vocab, ids)
    _write_json(os.path.join(out_dir, "config.json"), hf)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 112 * 112,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275,
                                                                                    0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3})

    vl_cfg = models.config_from_hf("qwen2_5_vl", {**hf, "model_type": "qwen2_5_vl"})
    vl_params = random_params("qwen2_5_vl", vl_cfg, seed)
    bcfg = parse_release(hf, gen_encoder=True)
    rng = np.random.default_rng(seed + 2)
    params = {
        "backbone": vl_params["language_model"],
        "latent_queries": rng.standard_normal((1, N_QUERY, TEXT["hidden_size"])).astype(np.float32),  # torch.randn
        "dit": random_params("dit", bcfg.dit, seed + 3),
        "gen_encoder": random_params("eva_clip", bcfg.gen_encoder, seed + 4),
    }
    sd = convert.to_torch("qwen2_5_vl", vl_params, vl_cfg)
    for key, value in convert.to_torch("blip3o", params, bcfg).items():
        if key in sd and not np.array_equal(sd[key], value):
            raise AssertionError(f"{key}: the language model differs between the two converters")
        sd[key] = value
    write_safetensors(_cast(sd, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def write_decoder(out_dir: str, seed: int) -> None:
    from blip3o_jax import convert, models
    from blip3o_jax.convert.common import write_safetensors

    os.makedirs(out_dir)
    _write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": "LlavaGenPipeline", "_diffusers_version": "0.21.2", "feature_extractor": [None, None],
        "safety_checker": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    for name, kind, cls, hf in (("unet", "unet", "UNet2DConditionModel", UNET),
                                ("vae", "autoencoder_kl", "AutoencoderKL", VAE)):
        part = os.path.join(out_dir, name)
        os.makedirs(part)
        config = {"_class_name": cls, "_diffusers_version": "0.21.2", **hf}
        _write_json(os.path.join(part, "config.json"), config)
        cfg = models.config_from_hf(kind, config)
        sd = convert.to_torch(kind, random_params(kind, cfg, seed), cfg)
        write_safetensors(_cast(sd, "bfloat16"), os.path.join(part, "diffusion_pytorch_model.bf16.safetensors"),
                          metadata={"format": "pt"})
    os.makedirs(os.path.join(out_dir, "scheduler"))
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"),
                {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.2", **SCHEDULER})


SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=2, image_size=64, patch_size=8, num_channels=3, layer_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh")
SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
            mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=4, patch_size=1,
            norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
DCAE = dict(in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=["ResBlock", "EfficientViTBlock"],
            decoder_block_types=["ResBlock", "EfficientViTBlock"],
            encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8],
            encoder_qkv_multiscales=[[], [5]], decoder_qkv_multiscales=[[], [5]],
            encoder_layers_per_block=[1, 1], decoder_layers_per_block=[1, 1], downsample_block_type="Conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407)


def write_sana_decoder(out_dir: str, seed: int) -> None:
    """A tiny BLIP3o/SigLIP2_SANA folder: encoder/ (SigLIP vision), connector/, transformer/ (SANA), vae/ (DC-AE),
    scheduler/ (the SANA repository's DPM-Solver config)."""
    from blip3o_jax import convert, models
    from blip3o_jax.convert.common import write_safetensors

    os.makedirs(out_dir)
    parts = (("encoder", "siglip_vision", {"architectures": ["SiglipVisionModel"], **SIGLIP}, "model.safetensors"),
             ("connector", "sana_connector", {"input_dim": SIGLIP["hidden_size"], "output_dim":
                                              SANA["caption_channels"], "num_pooled_tokens": 4},
              "model.safetensors"),
             ("transformer", "sana", {"_class_name": "SanaTransformer2DModel", **SANA},
              "diffusion_pytorch_model.safetensors"),
             ("vae", "autoencoder_dc", {"_class_name": "AutoencoderDC", **DCAE},
              "diffusion_pytorch_model.safetensors"))
    for i, (name, kind, config, fname) in enumerate(parts):
        part = os.path.join(out_dir, name)
        os.makedirs(part)
        _write_json(os.path.join(part, "config.json"), config)
        cfg = models.config_from_hf(kind, config)
        sd = convert.to_torch(kind, random_params(kind, cfg, seed + 10 * i), cfg)
        write_safetensors(_cast(sd, "float32"), os.path.join(part, fname), metadata={"format": "pt"})
    os.makedirs(os.path.join(out_dir, "scheduler"))
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), {
        "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
        "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "final_sigmas_type": "zero", "beta_schedule": "linear",
        "beta_start": 0.0001, "beta_end": 0.02})


def make_tiny_release(out: str, *, seed: int = 0, dtype: str = "float32", sana: bool = False,
                      force: bool = False) -> str:
    out = os.path.abspath(out)
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write_model(tmp, seed, dtype)
        write_decoder(os.path.join(tmp, "diffusion-decoder"), seed + 100)
        if sana:
            write_sana_decoder(os.path.join(tmp, "sana-decoder"), seed + 200)
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Directory to create.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="Stored dtype of model.safetensors (the decoder is always bf16, as released).")
    p.add_argument("--sana", action="store_true", help="Also write a tiny SigLIP2 -> SANA decoder in sana-decoder/.")
    p.add_argument("--force", action="store_true", help="Replace an existing --out.")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        path = make_tiny_release(a.out, seed=a.seed, dtype=a.dtype, sana=a.sana, force=a.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tiny BLIP3-o release written to {path}")


if __name__ == "__main__":
    main()
