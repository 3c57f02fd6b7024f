"""Flow matching: schedules vs diffusers' scheduler, the training loss, the CFG sampler vs the original's loop,
the loss variants, and a small learning run on class-conditional Gaussian blobs."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from blip3o_jax import convert, models
from blip3o_jax.diffusion import flow_matching as fm
from blip3o_jax.diffusion import losses
from blip3o_jax.models import dit as dit_lib
from test_dit import CONFIGS, make_inputs, make_reference, torch_forward

FM = fm.FlowMatchingConfig()


# -------------------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedules_match_diffusers_exactly(shift):
    cfg = dataclasses.replace(FM, shift=shift)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sigmas, timesteps = fm.train_schedule(cfg)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    for n in (30, 10, 7):
        sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n))
        sig, t_int = fm.inference_schedule(cfg, n)
        np.testing.assert_array_equal(sig, sched.sigmas.numpy())
        np.testing.assert_array_equal(t_int, sched.timesteps.to(torch.long).numpy())  # the original's int cast
    if shift == 1.0:
        assert list(fm.inference_schedule(cfg, 30)[1][:3]) == [1000, 966, 933]  # §1.6


def test_training_timestep_distributions():
    n = 20000
    sigma, t = fm.sample_timesteps(jax.random.PRNGKey(0), n, FM)
    sigma, t_float = np.asarray(sigma), np.asarray(t)
    # the original feeds scheduler.timesteps = float32((t/1000)*1000): integers up to float32 rounding
    t = np.round(t_float).astype(np.int32)
    assert np.max(np.abs(t_float - t)) < 1e-3 and t.min() >= 1 and t.max() <= 1000
    np.testing.assert_array_equal(sigma, (t.astype(np.float32) / 1000).astype(np.float32))  # σ = t/1000
    np.testing.assert_array_equal(t_float, sigma * np.float32(1000))
    assert abs(t.mean() - 500.5) < 8 and len(np.unique(t)) > 990  # uniform over {1..1000}
    np.testing.assert_array_equal(fm.sample_sigmas(jax.random.PRNGKey(0), n, FM), sigma)
    ln = np.asarray(fm.sample_sigmas(jax.random.PRNGKey(1), n, dataclasses.replace(FM, timestep_sampling="logit_normal")))
    assert abs(np.median(ln) - 0.5) < 0.02 and np.mean(np.abs(ln - 0.5) < 0.25) > 0.65  # concentrated mid-range
    shifted = np.asarray(fm.sample_sigmas(jax.random.PRNGKey(0), n, dataclasses.replace(FM, shift=3.0)))
    np.testing.assert_allclose(shifted, 3 * sigma / (1 + 2 * sigma), rtol=1e-6)
    keep = np.asarray(fm.draw(jax.random.PRNGKey(2), (n, 1), n, FM)["cond_keep"])
    assert set(np.unique(keep)) == {0.0, 1.0} and abs(keep.mean() - 0.9) < 0.01
    with pytest.raises(ValueError, match="timestep_sampling"):
        fm.FlowMatchingConfig(timestep_sampling="cosine")


# -------------------------------------------------------------------------------------------------------------
# training loss


@pytest.fixture(scope="module")
def tiny():
    hf, n_cond, partial = CONFIGS["gqa_p1"]
    cfg = models.config_from_hf("dit", hf)
    ref = make_reference(cfg)
    params = convert.from_torch("dit", ref.original_state_dict(), cfg)
    module = models.build("dit", cfg)
    return dict(cfg=cfg, ref=ref, params=params, module=module, apply_fn=fm.dit_apply_fn(module), n_cond=n_cond)


def test_training_loss_equals_numpy_recomputation(tiny):
    cfg = tiny["cfg"]
    x0, _, cond, mask = make_inputs(cfg, tiny["n_cond"], True, batch=6, seed=11)
    fm_cfg = dataclasses.replace(FM, cond_drop_prob=0.5)
    rng = jax.random.PRNGKey(4)
    loss, aux = jax.jit(functools.partial(fm.training_loss, tiny["apply_fn"], cfg=fm_cfg))(
        tiny["params"], x0, cond, rng, cond_mask=mask)
    r = {k: np.asarray(v) for k, v in fm.draw(rng, x0.shape, cond.shape[0], fm_cfg).items()}
    assert 0 < r["cond_keep"].sum() < len(r["cond_keep"])  # this batch exercises both kept and dropped conditions
    sigma = r["sigma"][:, None, None, None]
    x_t = (1 - sigma) * x0 + sigma * r["noise"]
    cond_in = cond * r["cond_keep"][:, None, None]
    v = np.asarray(jax.jit(tiny["module"].apply)({"params": tiny["params"]}, x_t, r["timestep"], cond_in, mask),
                   np.float64)
    target = r["noise"].astype(np.float64) - x0
    per_sample = ((v - target) ** 2).reshape(len(v), -1).mean(-1)
    np.testing.assert_allclose(np.asarray(aux["per_sample_loss"]), per_sample, rtol=2e-5)
    np.testing.assert_allclose(float(loss), per_sample.mean(), rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(aux["sigma"]), r["sigma"])
    np.testing.assert_array_equal(r["timestep"], r["sigma"] * 1000)
    assert loss.dtype == jnp.float32


# -------------------------------------------------------------------------------------------------------------
# sampler


def torch_sample(ref, cond, noise_nhwc, steps, guidance):
    """The original's `sample_images` loop (null first, int timesteps) with diffusers' scheduler."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    cond = torch.from_numpy(cond)
    cond_in = torch.cat([torch.zeros_like(cond), cond], 0)
    mask = torch.ones(cond_in.shape[:2])
    latents = torch.from_numpy(np.array(noise_nhwc)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = latents.repeat(2, 1, 1, 1)
            v = ref(x_in, t.unsqueeze(0).expand(x_in.shape[0]).to(torch.long), cond_in, mask)
            v_uncond, v_cond = v.chunk(2)
            latents = sched.step(v_uncond + guidance * (v_cond - v_uncond), t, latents).prev_sample
    return latents.permute(0, 2, 3, 1).numpy()


def test_sampler_matches_original_loop(tiny):
    cfg = tiny["cfg"]
    _, _, cond, _ = make_inputs(cfg, tiny["n_cond"], False, batch=2, seed=21)
    shape = (2, cfg.input_size, cfg.input_size, cfg.in_channels)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(9), shape))
    sampler = jax.jit(functools.partial(fm.sample, tiny["apply_fn"], shape=shape, cfg=FM, num_steps=10))
    got = sampler(tiny["params"], cond, jax.random.PRNGKey(9))  # default noise = normal(rng, shape)
    want = torch_sample(tiny["ref"], cond, noise, 10, 3.0)
    rel = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
    assert rel <= 1e-3, rel
    assert np.max(np.abs(want - noise)) > 0.5  # the run moved far from the noise: the comparison means something
    # explicit initial noise, determinism, and a different key giving a different sample
    again = sampler(tiny["params"], cond, jax.random.PRNGKey(123), initial_noise=noise)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
    other = sampler(tiny["params"], cond, jax.random.PRNGKey(10))
    assert np.max(np.abs(np.asarray(other) - np.asarray(got))) > 0.1


def test_sampler_guidance_one_and_batch_one(tiny):
    cfg = tiny["cfg"]
    cond = make_inputs(cfg, tiny["n_cond"], False, batch=2, seed=22)[2][:1]
    shape = (1, cfg.input_size, cfg.input_size, cfg.in_channels)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape))
    # a Python 1.0 skips the null branch; a traced 1.0 runs CFG whose combination is then exactly v_cond
    plain = fm.sample(tiny["apply_fn"], tiny["params"], cond, None, shape, FM, num_steps=4, guidance_scale=1.0,
                      initial_noise=noise)
    traced = jax.jit(lambda g: fm.sample(tiny["apply_fn"], tiny["params"], cond, None, shape, FM, num_steps=4,
                                         guidance_scale=g, initial_noise=noise))(jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(plain), np.asarray(traced), atol=1e-5)
    # and it is the conditional Euler integration, computed by hand with the torch reference
    sig, ts = fm.inference_schedule(FM, 4)
    x = noise
    for i in range(4):
        v = torch_forward(tiny["ref"], x, np.full((1,), ts[i], np.int64), cond, np.ones(cond.shape[:2], np.int32))
        x = x + (sig[i + 1] - sig[i]) * v
    assert np.max(np.abs(np.asarray(plain) - x)) <= 1e-3 * np.max(np.abs(x))


# -------------------------------------------------------------------------------------------------------------
# it learns: class-conditional Gaussian blobs

NUM_CLASSES = 4
BLOB_STD = 0.05


def blob_problem():
    rs = np.random.RandomState(0)
    means = (1.5 * rs.randn(NUM_CLASSES, 2, 2, 4)).astype(np.float32)  # (K, H, W, C) class means
    cond_table = rs.randn(NUM_CLASSES, 4, 8).astype(np.float32)  # (K, N=4 tokens, D=8) "query states"
    return jnp.asarray(means), jnp.asarray(cond_table)


def blob_batch(rng, means, cond_table, batch):
    c_rng, n_rng = jax.random.split(rng)
    labels = jax.random.randint(c_rng, (batch,), 0, NUM_CLASSES)
    x0 = means[labels] + BLOB_STD * jax.random.normal(n_rng, (batch,) + means.shape[1:])
    return x0, cond_table[labels], labels


BLOB_DIT = dict(input_size=2, patch_size=1, in_channels=4, dim=64, n_layers=2, n_heads=2, n_kv_heads=2,
                multiple_of=32, latent_embedding_size=8)


def train(variant, steps, lr, batch=64, seed=0):
    cfg = models.config_from_hf("dit", BLOB_DIT)
    means, cond_table = blob_problem()
    if variant == "clip_mse":  # the head regresses the grid (diffusion/losses.py)
        module = dit_lib.MSEHead(cfg)
        apply_fn = lambda p, c, m=None: module.apply({"params": p}, c, m)  # noqa: E731
        loss_fn = lambda p, x0, c, rng: losses.clip_mse_loss(apply_fn, p, x0, c)  # noqa: E731
        params = module.init(jax.random.PRNGKey(seed), cond_table[:1])["params"]
    else:  # the DiT learns the velocity (flow matching)
        apply_fn = fm.dit_apply_fn(dit_lib.DiT(cfg))
        loss_fn = lambda p, x0, c, rng: fm.training_loss(apply_fn, p, x0, c, rng, FM)  # noqa: E731
        params = dit_lib.init_params(cfg, jax.random.PRNGKey(seed))
    params = jax.tree.map(jnp.asarray, params)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    def step(carry, rng):
        params, opt_state = carry
        d_rng, l_rng = jax.random.split(rng)
        x0, cond, _ = blob_batch(d_rng, means, cond_table, batch)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x0, cond, l_rng)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    # the whole run is one compiled scan: no per-step dispatch
    run = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys))
    (params, _), history = run((params, opt_state), jax.random.split(jax.random.PRNGKey(1000 + seed), steps))
    return cfg, apply_fn, params, np.asarray(history), means, cond_table


def test_flow_matching_learns_conditional_blobs():
    cfg, apply_fn, params, hist, means, cond_table = train("clip_fm", steps=150, lr=3e-3)
    assert hist[-50:].mean() < 0.5 * hist[:20].mean(), (hist[:20].mean(), hist[-50:].mean())
    per_class = 16
    labels = jnp.repeat(jnp.arange(NUM_CLASSES), per_class)
    shape = (len(labels),) + means.shape[1:]
    sampler = jax.jit(functools.partial(fm.sample, apply_fn, shape=shape, cfg=FM), static_argnames="guidance_scale")
    samples = np.asarray(sampler(params, cond_table[labels], jax.random.PRNGKey(7), guidance_scale=1.0))
    means = np.asarray(means)
    dists = np.linalg.norm((samples[:, None] - means[None]).reshape(len(labels), NUM_CLASSES, -1), axis=-1)
    accuracy = np.mean(np.argmin(dists, axis=1) == np.asarray(labels))
    sample_means = samples.reshape(NUM_CLASSES, per_class, -1).mean(1)
    mean_err = np.linalg.norm(sample_means - means.reshape(NUM_CLASSES, -1), axis=-1)
    separation = np.min([np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(4) if a != b])
    assert accuracy >= 0.95, accuracy
    assert np.all(mean_err < 0.15 * separation), (mean_err, separation)
    # CFG 3.0 (the inference default) still lands every sample in its own class
    guided = np.asarray(sampler(params, cond_table[labels], jax.random.PRNGKey(8), guidance_scale=3.0))
    gd = np.linalg.norm((guided[:, None] - means[None]).reshape(len(labels), NUM_CLASSES, -1), axis=-1)
    assert np.mean(np.argmin(gd, axis=1) == np.asarray(labels)) >= 0.95


def test_clip_mse_head_regresses_the_grid():
    cfg, apply_fn, params, hist, means, cond_table = train("clip_mse", steps=150, lr=1e-2)
    assert hist[-20:].mean() < 0.1 * hist[:5].mean()
    pred = apply_fn(params, cond_table)  # generation is one head call
    assert pred.shape == means.shape and pred.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(pred), np.asarray(means), atol=0.1)
    # the loss is a plain MSE of the head's output (NumPy recomputation)
    x0 = np.asarray(means) + 0.3
    loss, aux = losses.clip_mse_loss(apply_fn, params, x0, cond_table)
    want = ((np.asarray(pred, np.float64) - x0) ** 2).reshape(NUM_CLASSES, -1).mean(-1)
    np.testing.assert_allclose(np.asarray(aux["per_sample_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot tile"):
        dit_lib.MSEHead(cfg).apply({"params": params}, cond_table[:, :3])
