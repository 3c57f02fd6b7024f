"""The SDXL-architecture decoding pipeline vs the same weights composed in diffusers (UNet + Euler + VAE), as the
original's `pipeline_llava_gen.py` runs them (CFG [cond, uncond], pooled = mean of the tokens, time ids)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from blip3o_jax import convert, models
from blip3o_jax.convert.common import ConversionError, write_safetensors
from blip3o_jax.pipelines import sdxl_decoder

# the Emu2-Gen / BLIP3-o decoder scheduler config (diffusion-decoder/scheduler/scheduler_config.json)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                 use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
WIDTH = 24  # feature width (1792 at full size)


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def make_parts():
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=WIDTH,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=WIDTH + 6 * 4, use_linear_projection=True), 1)
    vae = perturb(AutoencoderKL(
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=32, scaling_factor=0.13025), 2)
    configs = {"unet": dict(unet.config), "vae": dict(vae.config)}
    sds = {"unet": {k: v.numpy() for k, v in unet.state_dict().items()},
           "vae": {k: v.numpy() for k, v in vae.state_dict().items()}}
    ucfg = models.config_from_hf("unet", configs["unet"])
    vcfg = models.config_from_hf("autoencoder_kl", configs["vae"])
    decoder = sdxl_decoder.from_parts(models.build("unet", ucfg), convert.from_torch("unet", sds["unet"], ucfg),
                                      models.build("autoencoder_kl", vcfg),
                                      convert.from_torch("autoencoder_kl", sds["vae"], vcfg), SCHEDULER)
    return dict(unet=unet, vae=vae, configs=configs, sds=sds, decoder=decoder)


@pytest.fixture(scope="module")
def parts():
    return make_parts()


def torch_decode(unet, vae, features, negative, noise_nhwc, steps, guidance, size):
    """The original pipeline's loop, batched (time ids as a (2B, 6) tensor)."""
    sched = EulerDiscreteScheduler.from_config(SCHEDULER)  # DDIM-only keys are ignored, as when loading the folder
    assert sched.config.timestep_spacing == "leading" and sched.config.beta_schedule == "scaled_linear"
    sched.set_timesteps(steps)
    cond, uncond = torch.from_numpy(features), torch.from_numpy(negative)
    prompt_embeds = torch.cat([cond, uncond])
    text_embeds = prompt_embeds.mean(dim=1)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(prompt_embeds.shape[0], 1)
    x = torch.from_numpy(noise_nhwc).permute(0, 3, 1, 2) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            eps = unet(x_in, t, encoder_hidden_states=prompt_embeds,
                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
            eps_c, eps_u = eps.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        image = vae.decode(x / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_four_step_decode_matches_the_diffusers_composition(parts):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 16, WIDTH)).astype(np.float32)
    negative = rng.normal(size=(2, 16, WIDTH)).astype(np.float32) * 0.5
    size, steps = 32, 4
    noise = np.asarray(sdxl_decoder.initial_noise(0, [0, 1], (size // 4, size // 4, 4)))
    ours = sdxl_decoder.decode_clip_features(parts["decoder"], features, negative=negative, steps=steps,
                                             guidance_scale=3.0, resolution=size, noise=noise, output="float")
    ours01 = np.clip(np.asarray(ours) / 2 + 0.5, 0, 1)
    ref = torch_decode(parts["unet"], parts["vae"], features, negative, noise, steps, 3.0, size)
    err = np.max(np.abs(ours01 - ref))
    assert err <= 1e-3, err
    assert ref.std() > 0.05  # a real image, not a constant
    pixels = sdxl_decoder.decode_clip_features(parts["decoder"], features, negative=negative, steps=steps,
                                               resolution=size, noise=noise)
    ref_u8 = np.round(ref * 255).astype(np.int32)
    assert pixels.dtype == jnp.uint8 and np.max(np.abs(np.asarray(pixels, np.int32) - ref_u8)) <= 1
    # guidance changes the result (the unconditional branch is really used)
    plain = sdxl_decoder.decode_clip_features(parts["decoder"], features, negative="zeros", steps=steps,
                                              resolution=size, noise=noise, output="float")
    assert np.max(np.abs(np.asarray(plain) - np.asarray(ours))) > 1e-2


def test_batch_invariance_and_errors(parts):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3, 16, WIDTH)).astype(np.float32)
    together = sdxl_decoder.decode_clip_features(parts["decoder"], features, steps=2, resolution=16, seed=7,
                                                 output="float")
    for i in range(3):
        alone = sdxl_decoder.decode_clip_features(parts["decoder"], features[i:i + 1], steps=2, resolution=16,
                                                  seed=7, indices=[i], output="float")
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(together[i]), atol=1e-5)
    with pytest.raises(ValueError, match="not a positive multiple"):
        sdxl_decoder.decode_clip_features(parts["decoder"], features, resolution=30)
    with pytest.raises(ValueError, match=r"expected \(B, N, 24\)"):
        sdxl_decoder.decode_clip_features(parts["decoder"], features[..., :8])


def test_load_from_a_diffusion_decoder_folder(parts, tmp_path):
    root = tmp_path / "diffusion-decoder"
    for name in ("unet", "vae"):
        (root / name).mkdir(parents=True)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in parts["configs"][name].items()}
        (root / name / "config.json").write_text(json.dumps(cfg))
        write_safetensors(parts["sds"][name], str(root / name / "diffusion_pytorch_model.bf16.safetensors"))
    with pytest.raises(ConversionError, match="no scheduler/ folder"):
        sdxl_decoder.load_sdxl_decoder(str(root))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", **SCHEDULER}))
    loaded = sdxl_decoder.load_sdxl_decoder(str(root))
    features = np.random.default_rng(2).normal(size=(1, 16, WIDTH)).astype(np.float32)
    a = sdxl_decoder.decode_clip_features(loaded, features, steps=2, resolution=16)
    b = sdxl_decoder.decode_clip_features(parts["decoder"], features, steps=2, resolution=16)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
