"""VAE targets (`model.target="vae"`, the original README's "VAE + flow matching" variant): the DiT generates the
latents of a frozen KL autoencoder (`gen_encoder` of kind `autoencoder_kl`).

Checked: the target module against diffusers 0.42.1 (uint8 image -> `VaeImageProcessor` -> `AutoencoderKL`
posterior mode -> the pipelines' latent normalisation: scaling only, SD3's shift, SDXL img2img's per-channel
statistics) on a tiny VAE with every parameter perturbed; the model's `gen_encoder` group is the whole VAE (so a
converted `autoencoder_kl` loads into it); config errors; configs/tiny_vae.py trains through the train entry
point, its loss falls and its sample grids are decoded to pixels by the run's VAE; latents precomputed by
blip3o_jax.precompute equal the train step's, to bf16 storage.
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from blip3o_jax import cli, convert, models
from blip3o_jax import sharding as shd
from blip3o_jax.data import pipeline, synthetic, targets
from blip3o_jax.models import blip3o as blip3o_lib
from conftest import rel_err, tensorboard_image_events  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VAE = os.path.join(ROOT, "configs", "tiny_vae.py")
B = 8  # batch of the precompute check

torch.set_num_threads(2)


def vae_config(data_dir: str = "", **overrides):
    return cli.load_config(f"{TINY_VAE}:{data_dir}", overrides or None)


# ---------------------------------------------------------------------------------------------------------------
# the target module vs diffusers


@pytest.fixture(scope="module")
def torch_vae():
    """The tiny VAE of configs/tiny_vae.py as a diffusers module, every parameter moved off its init."""
    kwargs = dict(vae_config().model.gen_encoder)
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def diffusers_latents(ref, images_uint8, *, shift_factor=None, latents_mean=None, latents_std=None):
    """What a diffusers pipeline denoises for these images: `VaeImageProcessor.preprocess` (to [-1, 1]), the
    posterior's mode, then `(x - latents_mean) * scaling_factor / latents_std` (StableDiffusionXLImg2ImgPipeline.
    prepare_latents) or `(x - shift_factor) * scaling_factor` (StableDiffusion3Img2ImgPipeline.prepare_latents)."""
    pixels = VaeImageProcessor(do_resize=False).preprocess([Image.fromarray(im) for im in images_uint8])
    with torch.no_grad():
        mode = ref.encode(pixels).latent_dist.mode()  # (B, C, h, w)
    sf = ref.config.scaling_factor
    if latents_mean is not None:
        mean, std = torch.tensor(latents_mean).view(1, -1, 1, 1), torch.tensor(latents_std).view(1, -1, 1, 1)
        mode = (mode - mean) * sf / std
    else:
        mode = (mode - (shift_factor or 0.0)) * sf
    return mode.numpy().transpose(0, 2, 3, 1)


def test_vae_targets_match_diffusers(torch_vae):
    cfg = models.config_from_hf("autoencoder_kl", dict(torch_vae.config))
    params = convert.from_torch("autoencoder_kl", {k: v.numpy() for k, v in torch_vae.state_dict().items()}, cfg)
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    variants = {  # normalisation -> AutoencoderKLConfig fields (the weights stay the same)
        "scaling": {},
        "sd3_shift": dict(shift_factor=0.0609),
        "sdxl_stats": dict(latents_mean=(0.1, -0.2, 0.3, 0.05), latents_std=(0.9, 1.1, 0.7, 1.3)),
    }
    for name, fields in variants.items():
        module = blip3o_lib.VAELatentTargets(dataclasses.replace(cfg, **fields))
        got = jax.jit(lambda p, x: module.apply({"params": p}, x, method="targets"))(params, images)
        want = diffusers_latents(torch_vae, images, **fields)
        err = rel_err(got, want)
        print(f"vae targets ({name}): rel err {err:.2e}")
        assert got.shape == (2, 16, 16, 4) and got.dtype == jnp.float32
        assert err <= 1e-4, (name, err)


def test_gen_encoder_group_is_the_whole_vae():
    """init declares the decoder too, so the group has exactly the tree of a converted `autoencoder_kl`."""
    mcfg = blip3o_lib.config_from_hf("blip3o", vae_config().model.to_dict())
    assert mcfg.target_shape == (16, 16, 4) and mcfg.gen_encoder_kind == "autoencoder_kl"
    model = blip3o_lib.build("blip3o", mcfg)
    L = mcfg.n_query + 2
    ids = jnp.zeros((1, L), jnp.int32)
    qidx = jnp.arange(2, L, dtype=jnp.int32)[None]
    images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids), jnp.arange(L)[None],
                                                 qidx, jnp.ones((1,), bool), images))["params"]
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract["gen_encoder"]))
    got = {"/".join(path): tuple(leaf.shape) for path, leaf in flat.items()}
    assert any(path.startswith("decoder/") for path in got)
    assert got == convert.expected_shapes("autoencoder_kl", mcfg.gen_encoder)


def test_vae_config_errors():
    good = vae_config().model.to_dict()
    with pytest.raises(ValueError, match="gen_encoder of kind 'autoencoder_kl'.*gen_encoder_kind='eva_clip'"):
        blip3o_lib.config_from_hf("blip3o", dict(good, gen_encoder_kind="eva_clip"))
    # the DiT's input must be the VAE's latent grid: a 3-level VAE halves it again
    three = dict(good["gen_encoder"], down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32))
    with pytest.raises(ValueError, match=r"target='vae' makes \(8, 8, 4\) grids .* are \(16, 16, 4\)"):
        blip3o_lib.config_from_hf("blip3o", dict(good, gen_encoder=three))
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        blip3o_lib.config_from_hf("blip3o", dict(good, image_size=33))


# ---------------------------------------------------------------------------------------------------------------
# training and precomputation on synthetic shards


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("vae_data")
    synthetic.generate(str(d / "shards"), 64, samples_per_shard=32, image_size=32, max_objects=1, formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


STEPS = 20


@pytest.fixture(scope="module")
def vae_run(data_dir, tmp_path_factory):
    """configs/tiny_vae.py trained STEPS steps through the train entry point, with a sample grid of two prompts at
    the last step (one run serves the loss and the samples tests)."""
    from blip3o_jax import train as train_lib

    config = vae_config(data_dir, **{
        "train.total_steps": STEPS, "train.warmup_steps": 5, "checkpoint.every": 1000, "log.every": 1,
        "log.progress_bar": False, "data.global_batch_size": 8, "log.sample_every": STEPS,
        "flow.num_inference_steps": 2, "log.sample_prompts": ("a red circle", "a blue square")})
    workdir = tmp_path_factory.mktemp("vae_run") / "run"
    train_lib.train(config, str(workdir))
    return workdir


def test_vae_target_trains_through_the_train_entry_point(vae_run):
    steps, window = STEPS, 8
    with open(vae_run / "metrics.jsonl") as f:
        losses = {rec["step"]: rec["loss"] for rec in map(json.loads, f) if "loss" in rec}
    assert sorted(losses) == list(range(1, steps + 1))
    first = np.mean([losses[s] for s in range(1, window + 1)])
    last = np.mean([losses[s] for s in range(steps - window + 1, steps + 1)])
    print(f"vae target: mean loss of steps 1-{window} {first:.4f}, of steps {steps - window + 1}-{steps} {last:.4f}")
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


def test_vae_target_samples_are_decoded_to_pixels(vae_run):
    """The samples of a configs/tiny_vae.py run (VAE latents) are decoded by the run's own VAE to a pixel grid.
    (Was in test_train_clu.py with a run of its own; this file's run serves it.)"""
    grid = np.asarray(Image.open(vae_run / "samples" / f"step_{STEPS}.png"))
    # two 32x32 images (the VAE's output size, not the 16x16 latent grid), upscaled 3x, side by side
    assert grid.shape == (8 + 32 * 3 + 26 + 8, 2 * (32 * 3 + 8) + 8, 3)
    assert [(s, t) for s, t, _, _ in tensorboard_image_events(str(vae_run / "tensorboard"))] == [(STEPS, "samples")]


def test_precomputed_vae_targets_equal_the_train_steps(data_dir):
    from blip3o_jax import precompute
    from blip3o_jax.training import step as step_lib

    config = vae_config(data_dir, **{"data.global_batch_size": B, "data.shuffle": False})
    summary = precompute.precompute(config, batch_size=B, log=print)
    assert summary["shards_done"] == 2 and summary["samples"] == 64
    pre_config, res = targets.resolve(config)
    assert res.use, res.reason
    assert pre_config.model.target == "precomputed" and tuple(pre_config.data.target_shape) == (16, 16, 4)

    mesh = shd.make_mesh(dict(config.mesh))
    setup = step_lib.make_train_step(config, mesh)
    state, frozen = setup.init(jax.random.key(int(config.seed)))  # the weights precompute used (seed, no init_from)
    params = {**state.params, **frozen}
    image_data = pipeline.build(config.data, process_index=0, process_count=1)
    pre_data = pipeline.build(pre_config.data, process_index=0, process_count=1)
    for step in range(2):
        img, pre = image_data.batch(step), pre_data.batch(step)
        np.testing.assert_array_equal(pre["record_id"], img["record_id"])
        batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in img.items() if k in setup.batch_shardings}
        in_step = np.asarray(setup.targets_fn(params, batch))
        assert in_step.shape == (B, 16, 16, 4) and np.abs(in_step).max() > 0
        # stored as bfloat16: exactly the in-step latents rounded to bf16
        np.testing.assert_array_equal(pre["targets"], in_step.astype(ml_dtypes.bfloat16))
