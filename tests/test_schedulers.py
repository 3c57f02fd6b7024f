"""Schedulers and the CFG loop vs diffusers 0.42.1: tables bit for bit (Euler σ to the ulp, see below), whole
denoising trajectories driven by the same fake model in torch and JAX, the guidance batch order, config errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from blip3o_jax.diffusion import cfg as cfg_lib
from blip3o_jax.diffusion import schedulers
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

# the decoder's scheduler_config.json (Emu2-Gen / SDXL layout, with the DDIM-only keys Euler ignores)
EMU_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.21.2",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# SANA's scheduler (diffusers conversion script values)
SANA_DPM = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}
LINEAR_BETAS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
SHAPE = (2, 4, 4, 3)  # (B, H, W, C); every update is elementwise, so torch uses the same layout


def ulps(a, b) -> int:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return int(np.max(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))))


# -------------------------------------------------------------------------------------------------------------
# a fake denoiser, identical in torch and JAX: depends on x, t, the conditioning rows AND the batch position, so a
# wrong timestep, a wrong conditioning row or a swapped [cond, uncond] order all change the result


def fake_model(xp, x, t, cond_batch):
    n = x.shape[0]
    pos = xp.arange(n) / n
    t = t / 1000.0
    pre = 0.4 * x + 0.7 * t[:, None, None, None] + cond_batch["emb"][:, None, None, :]
    return xp.tanh(pre) * (1.0 + cond_batch["gain"])[:, None, None, None] + 0.05 * pos[:, None, None, None]


def jax_model(x, t, cond_batch):
    return fake_model(jnp, x, t.astype(jnp.float32), cond_batch)


def torch_model(x, t, cond_batch):
    return fake_model(torch, x, t.to(torch.float32), cond_batch)


def make_conds(seed):
    rng = np.random.default_rng(seed)
    b, c = SHAPE[0], SHAPE[-1]
    def one():
        emb = rng.standard_normal((b, c)).astype(np.float32)
        return {"emb": emb, "gain": rng.uniform(0, 0.5, (b,)).astype(np.float32)}

    return one(), one()  # cond, uncond


def torch_reference_loop(scheduler, latents, cond, uncond, guidance_scale, cond_first):
    """The diffusers pipelines' loop, hand-unrolled: cat, scale_model_input, one model call, split, guide, step."""
    guided = guidance_scale > 1
    to_t = lambda tree: {k: torch.from_numpy(v) for k, v in tree.items()}
    if guided:
        first, second = (cond, uncond) if cond_first else (uncond, cond)
        cond_batch = {k: torch.cat([to_t(first)[k], to_t(second)[k]]) for k in cond}
    else:
        cond_batch = to_t(cond)
    x = torch.from_numpy(np.asarray(latents, np.float32))
    batch = x.shape[0]
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        out = torch_model(x_in, t.expand(x_in.shape[0]), cond_batch)
        if guided:
            head, tail = out[:batch], out[batch:]
            out_cond, out_uncond = (head, tail) if cond_first else (tail, head)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy()


def run_loop(schedule, latents, cond, uncond, guidance_scale, cond_first, seen_shapes=None):
    def model_fn(x, t, cond_batch):
        if seen_shapes is not None:
            seen_shapes.append((x.shape, t.shape, t.dtype))
        return jax_model(x, t, cond_batch)

    run = jax.jit(
        lambda lat, c, u: cfg_lib.sample_loop(
            model_fn, schedule, lat, cond=c, uncond=u, guidance_scale=guidance_scale, cond_first=cond_first
        )
    )
    return np.asarray(run(latents, cond, uncond))


def make_latents(seed, init_noise_sigma):
    return (np.random.default_rng(seed).standard_normal(SHAPE) * np.float32(init_noise_sigma)).astype(np.float32)


# -------------------------------------------------------------------------------------------------------------
# float32 tables


def test_torch_float32_helpers_are_bit_identical():
    rng = np.random.default_rng(0)
    ranges = [(0.00085**0.5, 0.012**0.5, 1000), (0.0001, 0.02, 1000), (0.3, 7.1, 37)]
    random_ranges = zip(rng.normal(0, 3, 20), rng.normal(0, 0.01, 20), rng.integers(2, 2000, 20))
    ranges += [(float(a), float(b), int(n)) for a, b, n in random_ranges]
    for start, end, steps in ranges:
        ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(schedulers._torch_linspace_f32(start, end, steps), ref)
    # numpy's own linspace is NOT what torch computes (the reason for the helper)
    assert not np.array_equal(np.linspace(0.00085**0.5, 0.012**0.5, 1000).astype(np.float32),
                              torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32).numpy())
    for betas in ({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}, LINEAR_BETAS):
        ref = EulerDiscreteScheduler(**betas)
        np.testing.assert_array_equal(schedulers.EulerDiscrete(**betas).alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("betas", ["scaled_linear", "linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_tables_match_diffusers(betas, spacing):
    config = dict(EMU_EULER, timestep_spacing=spacing, **(LINEAR_BETAS if betas == "linear" else {}))
    ours_cfg = schedulers.euler_config_from_dict(config)
    ref = EulerDiscreteScheduler.from_config(config)
    ref_train_sigmas = (((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy()
    # torch's float32 sqrt (MKL) is up to ~0.75 ulp off; ours is correctly rounded
    assert ulps(ours_cfg.train_sigmas, ref_train_sigmas) <= 1
    for n in (20, 30, 50):
        ref.set_timesteps(n)
        ours = ours_cfg.set_timesteps(n)
        assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32 and ours.num_steps == n
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        # everything after the square root is bit-identical: interpolate diffusers' own table
        np.testing.assert_array_equal(schedulers.euler_sigmas(ref_train_sigmas, ours.timesteps), ref.sigmas.numpy())
        assert ulps(ours.sigmas, ref.sigmas.numpy()) <= 1
        assert ulps(ours.init_noise_sigma, float(ref.init_noise_sigma)) <= 2
        assert ours.sigmas[-1] == 0.0
        if spacing == "leading":
            assert ours.init_noise_sigma == pytest.approx(np.sqrt(ours.sigmas[0] ** 2 + 1), rel=1e-6)
        else:
            assert ours.init_noise_sigma == ours.sigmas[0]
    if betas == "scaled_linear" and spacing == "leading":  # the BLIP3-o decoder's 50-step schedule
        assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1 and ours.timesteps[1] == 961
        np.testing.assert_allclose(ours.sigmas[:2], [13.1204, 11.6761], atol=1e-4)
        np.testing.assert_allclose(ours.sigmas[-3:-1], [0.1415, 0.0413], atol=1e-4)
        assert ours.init_noise_sigma == pytest.approx(13.1585, abs=1e-4)


def test_flow_match_tables_match_diffusers():
    for shift in (1.0, 3.0):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        for n in (4, 30):
            ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
            ours = schedulers.FlowMatchEuler(shift=shift).set_timesteps(n)
            assert ours.timesteps.dtype == np.float32 and ours.num_steps == n
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
            np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    four = schedulers.FlowMatchEuler().set_timesteps(4)
    np.testing.assert_array_equal(four.timesteps, [1000, 750, 500, 250])
    np.testing.assert_array_equal(four.sigmas, [1, 0.75, 0.5, 0.25, 0])


def test_dpm_flow_tables_match_diffusers():
    ours_cfg = schedulers.dpm_flow_config_from_dict(SANA_DPM)
    assert ours_cfg == schedulers.DPMSolverMultistepFlow(num_train_timesteps=1000, flow_shift=3.0)
    ref = DPMSolverMultistepScheduler.from_config(SANA_DPM)
    for n in (20, 30):
        ref.set_timesteps(n)
        ours = ours_cfg.set_timesteps(n)
        assert ours.timesteps.dtype == np.int32 and ours.sigmas.dtype == np.float32 and ours.num_steps == n
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    twenty = ours_cfg.set_timesteps(20)
    assert list(twenty.timesteps[:4]) == [999, 982, 963, 944] and list(twenty.timesteps[-2:]) == [249, 136]
    # first and last steps are first order (no D1 term); the others second order
    assert twenty.half_x0_coef[0] == 0 and twenty.half_x0_coef[-1] == 0 and np.all(twenty.half_x0_coef[1:-1] != 0)
    assert twenty.sample_coef[-1] == 0 and twenty.x0_coef[-1] == -1  # σ_N = 0: x_N = x0 prediction


# -------------------------------------------------------------------------------------------------------------
# whole trajectories vs diffusers' own schedulers (fake model, no guidance)

EULER_LOOPS = {
    "emu_epsilon_leading": EMU_EULER,
    "v_prediction_trailing": dict(
        EMU_EULER, prediction_type="v_prediction", timestep_spacing="trailing", **LINEAR_BETAS
    ),
    "epsilon_linspace": dict(EMU_EULER, timestep_spacing="linspace"),
}


@pytest.mark.parametrize("name", list(EULER_LOOPS))
def test_euler_loop_matches_diffusers(name):
    config = EULER_LOOPS[name]
    ref = EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(4)
    schedule = schedulers.euler_config_from_dict(config).set_timesteps(4)
    if name == "emu_epsilon_leading":
        np.testing.assert_array_equal(schedule.timesteps, [751, 501, 251, 1])
    latents = make_latents(1, float(ref.init_noise_sigma))
    cond, _ = make_conds(2)
    seen = []
    ours = run_loop(schedule, latents, cond, None, 1.0, True, seen)
    expected = torch_reference_loop(ref, latents, cond, None, 1.0, True)
    err = rel_err(ours, expected)
    print(f"euler {name}: rel err {err:.2e}")
    assert err <= 1e-5
    assert seen == [(SHAPE, (SHAPE[0],), jnp.float32)]  # guidance 1: one branch, float timesteps
    assert rel_err(ours, latents) > 1e-2  # the loop moved the sample


def test_euler_single_steps_match_diffusers():
    """scale_model_input and step at every (traced) index, ε and v prediction, on random model outputs."""
    rng = np.random.default_rng(3)
    for prediction_type in ("epsilon", "v_prediction"):
        config = dict(EMU_EULER, prediction_type=prediction_type)
        ref = EulerDiscreteScheduler.from_config(config)
        ref.set_timesteps(5)
        schedule = schedulers.euler_config_from_dict(config).set_timesteps(5)
        scale = jax.jit(schedule.scale_model_input)
        step = jax.jit(lambda out, k, x: schedule.step((), out, k, x)[0])
        for k, t in enumerate(ref.timesteps):
            x = (rng.standard_normal(SHAPE) * 5).astype(np.float32)
            out = rng.standard_normal(SHAPE).astype(np.float32)
            ref_in = ref.scale_model_input(torch.from_numpy(x), t).numpy()
            ref_next = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
            assert float(schedule.timestep(k)) == float(t)
            assert rel_err(scale(x, k), ref_in) <= 1e-6
            assert rel_err(step(out, k, x), ref_next) <= 1e-6, (prediction_type, k)


def test_flow_match_loop_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    schedule = schedulers.FlowMatchEuler().set_timesteps(4)
    latents = make_latents(4, 1.0)
    cond, _ = make_conds(5)
    ours = run_loop(schedule, latents, cond, None, 1.0, False)
    expected = torch_reference_loop(ref, latents, cond, None, 1.0, False)
    err = rel_err(ours, expected)
    print(f"flow-match euler 4 steps: rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("num_steps", [20, 5])
def test_dpm_loop_matches_diffusers(num_steps):
    """A whole trajectory (20 steps; 5 < 15 exercises diffusers' lower_order_final branch)."""
    ref = DPMSolverMultistepScheduler.from_config(SANA_DPM)
    ref.set_timesteps(num_steps)
    schedule = schedulers.dpm_flow_config_from_dict(SANA_DPM).set_timesteps(num_steps)
    latents = make_latents(6, 1.0)
    cond, _ = make_conds(7)
    seen = []
    ours = run_loop(schedule, latents, cond, None, 1.0, False, seen)
    expected = torch_reference_loop(ref, latents, cond, None, 1.0, False)
    err = rel_err(ours, expected)
    print(f"dpm-solver++ flow {num_steps} steps: rel err {err:.2e}")
    assert err <= 1e-5
    assert seen[0][2] == jnp.int32  # integer timesteps, as diffusers' int64
    # the second-order correction matters: dropping it (Euler-like first order throughout) is far off
    first_order = dataclasses.replace(schedule, half_x0_coef=np.zeros_like(schedule.half_x0_coef))
    assert rel_err(run_loop(first_order, latents, cond, None, 1.0, False), expected) > 1e-3


# -------------------------------------------------------------------------------------------------------------
# classifier-free guidance


@pytest.mark.parametrize("decoder", ["unet_euler", "sana_dpm", "sana_flow_match"])
def test_cfg_loop_matches_hand_unrolled(decoder):
    """Guidance 3.0 in each decoder's own batch order: UNet [cond, uncond], SANA [uncond, cond]."""
    if decoder == "unet_euler":
        ref = EulerDiscreteScheduler.from_config(EMU_EULER)
        ref.set_timesteps(4)
        schedule, cond_first = schedulers.euler_config_from_dict(EMU_EULER).set_timesteps(4), True
    elif decoder == "sana_dpm":
        ref = DPMSolverMultistepScheduler.from_config(SANA_DPM)
        ref.set_timesteps(6)
        schedule, cond_first = schedulers.dpm_flow_config_from_dict(SANA_DPM).set_timesteps(6), False
    else:
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
        schedule, cond_first = schedulers.FlowMatchEuler().set_timesteps(4), False
    latents = make_latents(8, schedule.init_noise_sigma)
    cond, uncond = make_conds(9)
    seen = []
    ours = run_loop(schedule, latents, cond, uncond, 3.0, cond_first, seen)
    expected = torch_reference_loop(ref, latents, cond, uncond, 3.0, cond_first)
    err = rel_err(ours, expected)
    print(f"cfg {decoder} (cond_first={cond_first}): rel err {err:.2e}")
    assert err <= 1e-5
    assert seen[0][:2] == ((2 * SHAPE[0],) + SHAPE[1:], (2 * SHAPE[0],))  # one batched call per step
    # the order is observable (the fake model sees batch positions): the other order is a different result
    swapped = run_loop(schedule, latents, cond, uncond, 3.0, not cond_first)
    assert rel_err(swapped, expected) > 1e-3
    # and guidance is not a no-op
    assert rel_err(run_loop(schedule, latents, cond, uncond, 1.0, cond_first), expected) > 1e-3


def test_cfg_needs_uncond_and_accepts_a_traced_scale():
    schedule = schedulers.FlowMatchEuler().set_timesteps(2)
    latents = make_latents(10, 1.0)
    cond, uncond = make_conds(11)
    with pytest.raises(ValueError, match="uncond"):
        cfg_lib.sample_loop(jax_model, schedule, latents, cond=cond, guidance_scale=3.0, cond_first=False)
    run = jax.jit(lambda g: cfg_lib.sample_loop(jax_model, schedule, latents, cond=cond, uncond=uncond,
                                                  guidance_scale=g, cond_first=False))
    np.testing.assert_allclose(run(jnp.float32(3.0)), run_loop(schedule, latents, cond, uncond, 3.0, False), rtol=1e-6)
    assert not cfg_lib.uses_guidance(1.0) and not cfg_lib.uses_guidance(0.5) and cfg_lib.uses_guidance(1.5)


# -------------------------------------------------------------------------------------------------------------
# configs


def test_configs_from_scheduler_json():
    euler = schedulers.euler_config_from_dict(EMU_EULER)
    assert euler == schedulers.EulerDiscrete(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    # diffusers' defaults when keys are absent
    assert schedulers.euler_config_from_dict({}) == schedulers.EulerDiscrete()
    assert schedulers.dpm_flow_config_from_dict(
        {k: v for k, v in SANA_DPM.items() if k != "flow_shift"}
    ).flow_shift == DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in SANA_DPM.items() if k != "flow_shift"}
    ).config.flow_shift == 1.0
    # the Reconstruction branch loads SANA's DPM config into the flow-match scheduler: `shift` stays 1
    flow = schedulers.flow_match_config_from_dict(SANA_DPM)
    assert flow == schedulers.FlowMatchEuler(num_train_timesteps=1000, shift=1.0)
    assert FlowMatchEulerDiscreteScheduler.from_config(SANA_DPM).config.shift == flow.shift
    assert schedulers.flow_match_config_from_dict({"shift": 3.0}).shift == 3.0


@pytest.mark.parametrize(
    "bad",
    [
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"rescale_betas_zero_snr": True},
        {"timestep_type": "continuous"},
        {"interpolation_type": "log_linear"},
        {"prediction_type": "sample"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"final_sigmas_type": "sigma_min"},
        {"timestep_spacing": "karras"},
        {"trained_betas": [0.1, 0.2]},
    ],
)
def test_euler_config_errors(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        schedulers.euler_config_from_dict(dict(EMU_EULER, **bad))


@pytest.mark.parametrize(
    "bad",
    [
        {"prediction_type": "epsilon"},
        {"use_flow_sigmas": False},
        {"solver_order": 3},
        {"solver_type": "heun"},
        {"algorithm_type": "sde-dpmsolver++"},
        {"final_sigmas_type": "sigma_min"},
        {"thresholding": True},
        {"use_karras_sigmas": True},
    ],
)
def test_dpm_config_errors(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        schedulers.dpm_flow_config_from_dict(dict(SANA_DPM, **bad))
    with pytest.raises(ValueError, match="prediction_type"):  # absent -> diffusers' default epsilon
        schedulers.dpm_flow_config_from_dict({k: v for k, v in SANA_DPM.items() if k != "prediction_type"})


@pytest.mark.parametrize(
    "bad",
    [{"use_dynamic_shifting": True}, {"invert_sigmas": True}, {"stochastic_sampling": True}, {"shift_terminal": 0.1},
     {"use_karras_sigmas": True}],
)
def test_flow_match_config_errors(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        schedulers.flow_match_config_from_dict(dict({"shift": 1.0}, **bad))
    with pytest.raises(ValueError, match="shift"):
        schedulers.FlowMatchEuler(shift=0.0)
