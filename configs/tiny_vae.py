"""Tiny BLIP3-o with VAE targets for CPU: the original README's "VAE + flow matching" variant at toy scale.

configs/tiny.py's frozen backbone, latent queries and data, but the DiT generates the latents of a frozen KL
autoencoder (diffusers `AutoencoderKL`, models/autoencoder_kl.py) instead of pixels: the 32 px image is encoded to
16x16x4 latents (the posterior's mean, times `scaling_factor`), which the DiT patchifies 2x2 into 64 tokens, as many
as the release's 8x8 EVA-CLIP grid. The VAE is a random init of a tiny config by default (what the tests train);
trained weights of the same shape load with `--config.init_from=gen_encoder=DIR`, DIR a converted `autoencoder_kl`
(`python convert_torch_weights.py --src vae/ --dst DIR --kind autoencoder_kl`; set `model.gen_encoder` to that VAE's
config.json fields, its scaling_factor included). Precomputing the latents
(tools/precompute_targets.py) works as for EVA-CLIP targets.

    python tools/make_synthetic_shards.py --out DIR/shards --num-samples 4000 --image-size 32 --max-objects 1 \
        --format tar --tokenizer-out DIR/tokenizer
    python -m blip3o_jax.train --config configs/tiny_vae.py:DIR --workdir /tmp/tiny_vae
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(data_dir: str = ""):
    spec = importlib.util.spec_from_file_location("_tiny", os.path.join(_HERE, "tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(data_dir)

    c.model.target = "vae"
    c.model.gen_encoder_kind = "autoencoder_kl"
    # a diffusers AutoencoderKL config: two levels (one 2x downsampling), 4 latent channels
    c.model.gen_encoder = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        # the latents' scale: a trained VAE's config carries its own (SD's 0.18215, SDXL's 0.13025: unit variance of
        # its latents); 6.0 gives this random init's latents of the synthetic shapes a standard deviation of about 1
        scaling_factor=6.0,
    )
    c.model.dit = dict(c.model.dit, input_size=16, patch_size=2, in_channels=4)  # the (16, 16, 4) latent grid
    return c
