"""The SigLIP2 -> SANA reconstruction pipeline vs the same composition in PyTorch, batch invariance, loading.

Reference: the original BLIP3-o SigLIP2_SANA chain rebuilt from tiny random upstream modules, fp32, every parameter
perturbed off its init: transformers `SiglipVisionModel` (hidden_states[-2]) -> `F.adaptive_avg_pool2d` to 8x8 ->
connector `nn.Sequential(Linear, GELU(tanh), Linear, diffusers RMSNorm)` -> diffusers `SanaTransformer2DModel`
driven by diffusers `FlowMatchEulerDiscreteScheduler` (explicit sigmas linspace(1, 1/N, N)) or
`DPMSolverMultistepScheduler` (SANA's flow configuration), CFG 3.0 on the batch [null image, image] -> diffusers
`AutoencoderDC.decode(latents / scaling_factor)` -> (x/2 + 0.5).clamp(0, 1). Both sides start from the same noise.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       SanaTransformer2DModel)
from diffusers.models.normalization import RMSNorm as TorchRMSNorm
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from blip3o_jax import convert, models
from blip3o_jax.convert.common import ConversionError, write_safetensors
from blip3o_jax.diffusion import schedulers
from blip3o_jax.pipelines import sana_decoder

torch.set_num_threads(1)

STEPS = 4
GUIDANCE = 3.0
BATCH = 3
POOLED = 64  # 16x16 SigLIP grid -> 8x8 tokens, as 32x32 -> 8x8 in the released model

SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=2, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
CONNECTOR = dict(input_dim=32, output_dim=16, num_pooled_tokens=POOLED)
SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
            mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=1, norm_elementwise_affine=False,
            norm_eps=1e-6, interpolation_scale=None)
DCAE = dict(in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="Conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
# SANA's scheduler folder (diffusers' SANA conversion script)
DPM = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="flow_prediction",
           use_flow_sigmas=True, flow_shift=3.0, lower_order_final=True, final_sigmas_type="zero",
           timestep_spacing="linspace", beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def perturb_(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def numpy_sd(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


class TorchChain:
    """The original composition in PyTorch (NCHW); `reconstruct` returns float images in [0, 1], NHWC."""

    def __init__(self):
        torch.manual_seed(0)
        siglip_cfg = SiglipVisionConfig(**SIGLIP)
        siglip_cfg._attn_implementation = "eager"
        self.siglip = perturb_(SiglipVisionModel(siglip_cfg), 1, 0.1)
        width, caption = CONNECTOR["input_dim"], CONNECTOR["output_dim"]
        self.connector = torch.nn.Sequential(torch.nn.Linear(width, caption), torch.nn.GELU(approximate="tanh"),
                                             torch.nn.Linear(caption, caption), TorchRMSNorm(caption, eps=1e-5))
        with torch.no_grad():
            self.connector[3].weight.fill_(5.5**0.5)  # as the original, before training moves it
        perturb_(self.connector, 2, 0.1)
        self.sana = perturb_(SanaTransformer2DModel(**SANA), 3, 0.2)
        self.vae = perturb_(AutoencoderDC(**DCAE), 4, 0.1)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.siglip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        b, n, w = hidden.shape
        side, out = int(n**0.5), int(POOLED**0.5)
        grid = hidden.reshape(b, side, side, w).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)  # (B, 64, W) row-major
        return self.connector(pooled)

    @staticmethod
    def pixels(images_uint8: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def reconstruct(self, images_uint8: np.ndarray, noise_nhwc: np.ndarray, scheduler) -> np.ndarray:
        pixels = self.pixels(images_uint8)
        cond = self.features(pixels)
        null = self.features(torch.full_like(pixels[:1], -1.0)).expand_as(cond)  # black image, normalised
        context = torch.cat([null, cond])  # [null image, image]
        latents = torch.from_numpy(np.array(noise_nhwc)).permute(0, 3, 1, 2).contiguous()
        for t in scheduler.timesteps:
            x_in = torch.cat([latents, latents])
            v = self.sana(x_in, encoder_hidden_states=context, timestep=t.expand(x_in.shape[0]), return_dict=False)[0]
            v_uncond, v_cond = v.chunk(2)
            latents = scheduler.step(v_uncond + GUIDANCE * (v_cond - v_uncond), t, latents, return_dict=False)[0]
        images = self.vae.decode(latents / DCAE["scaling_factor"], return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def torch_flow_match(steps: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return scheduler


def torch_dpm(steps: int) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler(**DPM)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.fixture(scope="module")
def chain():
    return TorchChain()


def converted_parts(chain: TorchChain) -> dict:
    """Our modules and params from the torch modules' state dicts (the SigLIP tower as a full "last" checkpoint
    loads; `from_parts` cuts it to the penultimate layer)."""
    parts = {}
    for name, kind, hf, sd in (
        ("encoder", "siglip_vision", chain.siglip.config.to_dict(), numpy_sd(chain.siglip, "vision_model.")),
        ("connector", "sana_connector", CONNECTOR, numpy_sd(chain.connector)),
        ("transformer", "sana", dict(chain.sana.config), numpy_sd(chain.sana)),
        ("vae", "autoencoder_dc", dict(chain.vae.config), numpy_sd(chain.vae)),
    ):
        cfg = models.config_from_hf(kind, hf)
        parts[name] = models.build(kind, cfg)
        parts[f"{name}_params"] = convert.from_torch(kind, sd, cfg)
    return parts


@pytest.fixture(scope="module")
def parts(chain):
    return converted_parts(chain)


@pytest.fixture(scope="module")
def decoders(parts):
    flow = schedulers.flow_match_config_from_dict(dict(FlowMatchEulerDiscreteScheduler().config))
    dpm = schedulers.dpm_flow_config_from_dict(dict(DPMSolverMultistepScheduler(**DPM).config))
    return {"flow_match": sana_decoder.from_parts(**parts, scheduler=flow),
            "dpm": sana_decoder.from_parts(**parts, scheduler=dpm)}


@pytest.fixture(scope="module")
def images():
    # smooth gradients plus noise: natural-ish inputs, all distinct
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIGLIP["image_size"])
    base = (ramp[None, :, None, None] * rng.uniform(0.2, 1.0, (BATCH, 1, 1, 3)) + ramp[None, None, :, None] * 0.3)
    noisy = base + rng.normal(0, 25, (BATCH, SIGLIP["image_size"], SIGLIP["image_size"], 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def noise_for(decoder, batch: int) -> np.ndarray:
    shape = (decoder.default_latent_size, decoder.default_latent_size, decoder.latent_channels)
    return np.asarray(sana_decoder.initial_noise(0, np.arange(batch), shape))


def test_penultimate_encoder_and_features(chain, decoders, images):
    """from_parts cut the "last" tower to hidden_states[-2] (no post-LayerNorm), and the features match torch."""
    decoder = decoders["flow_match"]
    assert decoder.encoder.cfg.output_layer == "penultimate" and decoder.encoder.cfg.num_layers_run == 2
    assert "post_layernorm" not in decoder.encoder_params
    assert decoder.encoder_params["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    got = np.asarray(sana_decoder.encode_images(decoder, images))
    want = chain.features(chain.pixels(images)).numpy()
    assert got.shape == (BATCH, POOLED, CONNECTOR["output_dim"])
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"[rel] features: {err:.3g}")
    assert err <= 1e-4
    null = np.asarray(sana_decoder.null_condition(decoder, 2))
    want_null = chain.features(torch.full((1, 3, 32, 32), -1.0)).numpy()
    assert null.shape == (2, POOLED, CONNECTOR["output_dim"]) and np.array_equal(null[0], null[1])
    assert np.abs(null[0] - want_null[0]).max() / np.abs(want_null).max() <= 1e-4


# 4 flow-matching steps have integer timesteps (1000, 750, 500, 250); 3 steps check the fractional ones
# (1000, 666.67, 333.33) reach SANA uncast
@pytest.mark.parametrize("scheduler,steps", [("flow_match", STEPS), ("dpm", STEPS), ("flow_match", 3)],
                         ids=["flow_match", "dpm", "flow_match_3"])
def test_loop_matches_torch(chain, decoders, images, scheduler, steps):
    """(a) The whole 4-step loop with CFG 3.0 and DC-AE decode vs the torch composition from the same noise;
    (b) uint8 within one grey level (4-step flow-matching run, through `reconstruct`)."""
    decoder = decoders[scheduler]
    noise = noise_for(decoder, BATCH)
    torch_scheduler = torch_flow_match(steps) if scheduler == "flow_match" else torch_dpm(steps)
    # the timesteps SANA receives are the scheduler's own (float 1000·σ, or DPM-Solver's integers)
    ours_t = decoder.scheduler.set_timesteps(steps).timesteps
    np.testing.assert_array_equal(ours_t, torch_scheduler.timesteps.numpy().astype(ours_t.dtype))
    want = chain.reconstruct(images, noise, torch_scheduler)
    features = sana_decoder.encode_images(decoder, images)
    got = np.asarray(sana_decoder.decode_features(decoder, features, steps=steps, guidance_scale=GUIDANCE,
                                                  noise=noise, output="float"))
    assert got.shape == want.shape == (BATCH, 16, 16, 3)
    interior = np.mean((want > 0.01) & (want < 0.99))
    assert interior > 0.5, f"only {interior:.0%} of the reference pixels are off the clip bounds"
    err = np.abs(got - want).max()
    print(f"[abs] {scheduler} {steps}-step image: {err:.3g} (unclipped pixels {interior:.0%})")
    assert err <= 1e-3
    if scheduler == "flow_match" and steps == STEPS:
        pixels = np.asarray(sana_decoder.reconstruct(decoder, images, steps=STEPS, guidance_scale=GUIDANCE))
        assert pixels.dtype == np.uint8 and pixels.shape == (BATCH, 16, 16, 3)
        want_u8 = np.round(want * 255).astype(np.int32)
        diff = np.abs(pixels.astype(np.int32) - want_u8)
        print(f"[u8] flow_match max grey-level difference {diff.max()}, {np.mean(diff > 0):.2%} of pixels differ")
        assert diff.max() <= 1


def test_batch_invariance(decoders, images):
    """(c) Three images at once == each alone with its global index (same seed)."""
    decoder = decoders["flow_match"]
    together = np.asarray(sana_decoder.reconstruct(decoder, images, steps=STEPS, guidance_scale=GUIDANCE, seed=5))
    for i in range(BATCH):
        alone = np.asarray(sana_decoder.reconstruct(decoder, images[i:i + 1], steps=STEPS, guidance_scale=GUIDANCE,
                                                    seed=5, indices=[i]))
        np.testing.assert_array_equal(alone[0], together[i])
    # and the index (not the batch position) picks the noise: image 0 decoded as index 1 differs
    other = np.asarray(sana_decoder.reconstruct(decoder, images[:1], steps=STEPS, guidance_scale=GUIDANCE, seed=5,
                                                indices=[1]))
    assert np.abs(other[0].astype(int) - together[0].astype(int)).max() > 5


def write_folder(root: str, chain: TorchChain, parts: dict) -> None:
    """The five parts in their upstream layouts: config.json written by the upstream classes (scheduler_config.json
    by the scheduler), safetensors written from our params with `convert.to_torch`. The scheduler folder holds
    SANA's DPM-Solver config, as the hub's does."""
    chain.siglip.config.save_pretrained(os.path.join(root, "encoder"))
    os.makedirs(os.path.join(root, "connector"))
    with open(os.path.join(root, "connector", "config.json"), "w") as f:
        json.dump(CONNECTOR, f)
    chain.sana.save_config(os.path.join(root, "transformer"))
    chain.vae.save_config(os.path.join(root, "vae"))
    DPMSolverMultistepScheduler(**DPM).save_config(os.path.join(root, "scheduler"))
    for name, kind, weights in (("encoder", "siglip_vision", "model.safetensors"),
                                ("connector", "sana_connector", "model.safetensors"),
                                ("transformer", "sana", "diffusion_pytorch_model.safetensors"),
                                ("vae", "autoencoder_dc", "diffusion_pytorch_model.safetensors")):
        with open(os.path.join(root, name, "config.json")) as f:
            cfg = models.config_from_hf(kind, json.load(f))
        write_safetensors(convert.to_torch(kind, parts[f"{name}_params"], cfg), os.path.join(root, name, weights))


def test_load_sana_decoder(tmp_path, chain, parts, decoders, images):
    """(d) A folder in the upstream layouts loads to the same pixels; the hub's DPM-Solver scheduler config read as
    flow-matching Euler has shift 1 (diffusers drops flow_shift); a missing vae/ is a one-line error."""
    root = str(tmp_path / "SigLIP2_SANA")
    write_folder(root, chain, parts)
    # the upstream behaviour the flow_match choice reproduces
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(root, "scheduler")).config.shift == 1.0
    loaded = sana_decoder.load_sana_decoder(root, scheduler="flow_match")
    assert loaded.scheduler == schedulers.FlowMatchEuler(num_train_timesteps=1000, shift=1.0)
    assert loaded.encoder.cfg.output_layer == "penultimate" and loaded.scaling_factor == DCAE["scaling_factor"]
    got = np.asarray(sana_decoder.reconstruct(loaded, images, steps=STEPS, guidance_scale=GUIDANCE))
    want = np.asarray(sana_decoder.reconstruct(decoders["flow_match"], images, steps=STEPS, guidance_scale=GUIDANCE))
    np.testing.assert_array_equal(got, want)
    dpm = sana_decoder.load_sana_decoder(root, scheduler="dpm")
    assert dpm.scheduler == schedulers.DPMSolverMultistepFlow(num_train_timesteps=1000, flow_shift=3.0)

    broken = str(tmp_path / "no_vae")
    shutil.copytree(root, broken)
    shutil.rmtree(os.path.join(broken, "vae"))
    with pytest.raises(ConversionError, match=r"no vae/ folder") as info:
        sana_decoder.load_sana_decoder(broken)
    assert "\n" not in str(info.value)


def test_resize_matches_siglip_image_processor(chain, decoders):
    """Images not at the encoder's size: resized as transformers' SiglipImageProcessor (PIL bilinear, SigLIP2's
    resample=2), the features match the processor + torch chain."""
    rng = np.random.default_rng(3)
    odd = rng.integers(0, 256, (BATCH, 40, 24, 3), dtype=np.uint8)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=Image.Resampling.BILINEAR)
    pixel_values = processor(images=[Image.fromarray(x) for x in odd], return_tensors="pt")["pixel_values"]
    want = chain.features(pixel_values).numpy()
    got = np.asarray(sana_decoder.encode_images(decoders["flow_match"], odd))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"[rel] resized features: {err:.3g}")
    assert err <= 1e-4


def test_errors(parts, decoders, images):
    decoder = decoders["flow_match"]
    with pytest.raises(ValueError, match="uint8"):
        sana_decoder.encode_images(decoder, images.astype(np.float32))
    with pytest.raises(ValueError, match=r"noise has shape"):
        sana_decoder.decode_features(decoder, np.zeros((1, POOLED, 16), np.float32), noise=np.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="caption_channels"):
        bad = models.build("sana_connector", models.config_from_hf("sana_connector", {**CONNECTOR, "output_dim": 8}))
        sana_decoder.from_parts(**{**parts, "connector": bad}, scheduler=decoder.scheduler)
    with pytest.raises(ValueError, match="scheduler="):
        sana_decoder.scheduler_from_config({}, "euler")
