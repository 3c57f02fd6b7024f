"""Sampling schedulers of the two image decoders, as diffusers computes them, with jit-able steps.

- `EulerDiscrete`: diffusers `EulerDiscreteScheduler` (the SDXL-style UNet decoder; ε or v prediction);
- `FlowMatchEuler`: diffusers `FlowMatchEulerDiscreteScheduler` driven with explicit σ = linspace(1, 1/N, N), as the
  SANA decoder of the BLIP3-o Reconstruction branch calls it;
- `DPMSolverMultistepFlow`: diffusers `DPMSolverMultistepScheduler` in the one configuration SANA ships
  (dpmsolver++, order 2, midpoint, flow_prediction, use_flow_sigmas, final σ 0).

Each scheduler is a frozen config; `set_timesteps(N)` returns a schedule: numpy tables (timesteps and sigmas as
diffusers computes them on the CPU: bit for bit, except that Euler's σ may differ by 1 ulp, see
`EulerDiscrete.train_sigmas`) plus pure functions of a traced step index k, so that a whole sampling run fits in one
`jax.lax.fori_loop` (see `blip3o_jax.diffusion.cfg.sample_loop`). Every schedule has the same small protocol:

    num_steps                      # static int N
    init_noise_sigma               # float; the caller multiplies unit noise by it (diffusers' prepare_latents)
    init_state(x) -> state         # what the loop carries besides x (() for one-step solvers)
    model_input(x, k) -> x_in      # the denoiser input at step k
    timestep(k) -> t               # scalar timestep the denoiser receives at step k
    step(state, model_output, k, x) -> (x_next, state)

The update math runs in float32 whatever the model dtype (diffusers casts every step back to the model dtype;
we keep the sample in float32 throughout).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.diffusion import flow_matching

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
EULER_PREDICTION_TYPES = ("epsilon", "v_prediction")


# -------------------------------------------------------------------------------------------------------------
# float32 tables exactly as torch computes them


def _fma_f32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add a·b + c, rounded once (elementwise over float32 arrays)."""
    a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
    product = a.astype(np.float64) * b.astype(np.float64)  # exact: two 24-bit significands fit in 53 bits
    c64 = c.astype(np.float64)
    total = product + c64
    # TwoSum: total + err == product + c exactly
    virtual = total - product
    err = (product - (total - virtual)) + (c64 - virtual)
    rounded = total.astype(np.float32)
    # rounding the float64 total to float32 is the correct single rounding except when the total sits exactly
    # halfway between two float32 values and the discarded error points away from the chosen one
    away = np.where(total > rounded.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
    neighbour = np.nextafter(rounded, away.astype(np.float32))
    halfway = (rounded.astype(np.float64) + neighbour.astype(np.float64)) / 2
    wrong_tie = (total == halfway) & (np.sign(err) == np.sign(total - rounded.astype(np.float64))) & (err != 0)
    return np.where(wrong_tie, neighbour, rounded)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit.

    torch fills each half from its own end point with a float32 fused multiply-add, step = (end − start)/(steps−1):
    start + step·i for i < steps // 2, end − step·(steps − 1 − i) for the rest. numpy's float64 linspace differs
    by an ulp in about a third of the entries, which would move β, ᾱ and σ.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = (end32 - start32) / np.float32(steps - 1)
    index = np.arange(steps)
    lower = index < steps // 2
    count = np.where(lower, index, steps - 1 - index).astype(np.float32)
    return _fma_f32(np.where(lower, step, -step), count, np.where(lower, start32, end32))


def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """ᾱ (num_train_timesteps,) float32, as diffusers' float32 torch code computes it."""
    if beta_schedule == "linear":
        betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    else:  # scaled_linear
        betas = np.square(_torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps))
    alphas = np.float32(1.0) - betas
    # torch's CPU cumprod accumulates float32 inputs in float64 and rounds each partial product
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _gather(table: np.ndarray, k) -> jax.Array:
    return jnp.asarray(table)[k]


# -------------------------------------------------------------------------------------------------------------
# Euler (diffusers EulerDiscreteScheduler)


@dataclasses.dataclass(frozen=True)
class EulerDiscrete:
    """diffusers `EulerDiscreteScheduler` (defaults as diffusers; s_churn = 0, discrete timesteps, linear
    interpolation, final σ = 0). BLIP3-o's decoder: scaled_linear 0.00085…0.012, epsilon, leading, steps_offset 1."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        checks = (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, EULER_PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"EulerDiscreteScheduler {name}={value!r} is not supported; expected one of {allowed}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"EulerDiscreteScheduler num_train_timesteps={self.num_train_timesteps} must be >= 2")

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return _alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)

    def set_timesteps(self, num_inference_steps: int) -> "EulerSchedule":
        n, n_train = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= n_train:
            raise ValueError(f"num_inference_steps={n} must be in [1, {n_train}]")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
        elif self.timestep_spacing == "leading":
            ratio = n_train // n
            timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
            timesteps += self.steps_offset
        else:  # trailing
            ratio = n_train / n
            timesteps = np.arange(n_train, 0, -ratio).round().copy().astype(np.float32)
            timesteps -= 1
        sigmas = euler_sigmas(self.train_sigmas, timesteps)
        max_sigma = sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            init_noise_sigma = max_sigma
        else:
            init_noise_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1.0))
        return EulerSchedule(
            timesteps=timesteps.astype(np.float32),
            sigmas=sigmas,
            init_noise_sigma=float(init_noise_sigma),
            prediction_type=self.prediction_type,
        )

    @property
    def train_sigmas(self) -> np.ndarray:
        """σ = sqrt((1 − ᾱ)/ᾱ) (num_train_timesteps,) float32, index = training timestep.

        The square root is the correctly rounded one. diffusers' float32 torch `** 0.5` goes through the CPU math
        library (MKL on x86), which is off by up to ~0.75 ulp, so about one entry in five differs from it by 1 ulp;
        everything before and after the square root matches diffusers bit for bit.
        """
        alphas_cumprod = self.alphas_cumprod
        return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def euler_sigmas(train_sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Inference σ (N+1,) float32: the training σ table linearly interpolated at the (float) timesteps, in float64
    as diffusers' `np.interp`, then a final 0."""
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


_EULER_IGNORED_DEFAULTS = {
    # key: the value(s) our implementation assumes; anything else is refused
    "trained_betas": (None,),
    "interpolation_type": ("linear",),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "timestep_type": ("discrete",),
    "rescale_betas_zero_snr": (False,),
    "final_sigmas_type": ("zero",),
}


def euler_config_from_dict(d: dict) -> EulerDiscrete:
    """`EulerDiscrete` from a diffusers `scheduler_config.json` dict; unknown and DDIM-only keys are ignored."""
    for key, allowed in _EULER_IGNORED_DEFAULTS.items():
        if key in d and d[key] not in allowed:
            raise ValueError(
                f"scheduler config {key}={d[key]!r} is not supported by the Euler scheduler; expected {allowed[0]!r}"
            )
    fields = {f.name for f in dataclasses.fields(EulerDiscrete)}
    return EulerDiscrete(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSchedule:
    """`EulerDiscreteScheduler` after `set_timesteps(N)`: timesteps (N,) float32 (what the UNet receives),
    sigmas (N+1,) float32 ending in 0."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float
    prediction_type: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init_state(self, x) -> tuple:
        return ()

    def timestep(self, k) -> jax.Array:
        return _gather(self.timesteps, k)

    def scale_model_input(self, x, k) -> jax.Array:
        """x / sqrt(σ_k² + 1), as diffusers' `scale_model_input`."""
        sigma = _gather(self.sigmas, k)
        return x.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1)

    model_input = scale_model_input

    def step(self, state, model_output, k, x) -> tuple[jax.Array, tuple]:
        """One Euler step from σ_k to σ_{k+1} (s_churn = 0); same expression order as diffusers."""
        sample = x.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        sigma, sigma_next = _gather(self.sigmas, k), _gather(self.sigmas, k + 1)
        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        derivative = (sample - pred_original_sample) / sigma
        return sample + derivative * (sigma_next - sigma), state


# -------------------------------------------------------------------------------------------------------------
# flow-matching Euler (diffusers FlowMatchEulerDiscreteScheduler with explicit sigmas)


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
    """diffusers `FlowMatchEulerDiscreteScheduler` (static shift, no dynamic shifting) used as
    `set_timesteps(sigmas=linspace(1, 1/N, N))`: σ_k shifted by s·σ/(1 + (s − 1)·σ), then a final 0."""

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"FlowMatchEulerDiscreteScheduler shift={self.shift} must be positive")

    def set_timesteps(self, num_inference_steps: int) -> "FlowMatchSchedule":
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps={n} must be >= 1")
        fm_cfg = flow_matching.FlowMatchingConfig(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        sigmas, _ = flow_matching.inference_schedule(fm_cfg, n)  # (N+1,) float32, bit-identical to diffusers
        timesteps = (sigmas[:-1] * np.float32(self.num_train_timesteps)).astype(np.float32)
        return FlowMatchSchedule(timesteps=timesteps, sigmas=sigmas)


_FLOW_MATCH_REFUSED = {
    "use_dynamic_shifting": (False,),
    "shift_terminal": (None,),
    "invert_sigmas": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "stochastic_sampling": (False,),
}


def flow_match_config_from_dict(d: dict) -> FlowMatchEuler:
    """`FlowMatchEuler` from a diffusers `scheduler_config.json` dict (unknown keys ignored)."""
    for key, allowed in _FLOW_MATCH_REFUSED.items():
        if key in d and d[key] not in allowed:
            raise ValueError(
                f"scheduler config {key}={d[key]!r} is not supported by the flow-matching Euler scheduler; "
                f"expected {allowed[0]!r}"
            )
    fields = {f.name for f in dataclasses.fields(FlowMatchEuler)}
    return FlowMatchEuler(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchSchedule:
    """timesteps (N,) float32 = 1000·σ (the float the SANA transformer receives); sigmas (N+1,) float32, last 0."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init_state(self, x) -> tuple:
        return ()

    def timestep(self, k) -> jax.Array:
        return _gather(self.timesteps, k)

    def model_input(self, x, k) -> jax.Array:
        return x.astype(jnp.float32)

    def step(self, state, model_output, k, x) -> tuple[jax.Array, tuple]:
        """x + (σ_{k+1} − σ_k)·v."""
        dt = _gather(self.sigmas, k + 1) - _gather(self.sigmas, k)
        return x.astype(jnp.float32) + dt * model_output.astype(jnp.float32), state


# -------------------------------------------------------------------------------------------------------------
# DPM-Solver++ (2M, midpoint) on flow sigmas (diffusers DPMSolverMultistepScheduler as SANA configures it)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepFlow:
    """diffusers `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=..., lower_order_final=True,
    final_sigmas_type="zero")`. The first step is first order (no history yet) and so is the last one (σ = 0).
    The default flow_shift is SANA's 3.0 (`dpm_flow_config_from_dict` uses diffusers' 1.0 for an absent key)."""

    num_train_timesteps: int = 1000
    flow_shift: float = 3.0

    def __post_init__(self):
        if self.flow_shift <= 0:
            raise ValueError(f"DPMSolverMultistepScheduler flow_shift={self.flow_shift} must be positive")

    def set_timesteps(self, num_inference_steps: int) -> "DPMFlowSchedule":
        n, n_train, shift = int(num_inference_steps), self.num_train_timesteps, self.flow_shift
        if n < 1:
            raise ValueError(f"num_inference_steps={n} must be >= 1")
        # float64 like diffusers; the timesteps are truncated from the float64 sigmas, before the float32 cast
        sigmas = 1.0 - np.linspace(1, 1 / n_train, n + 1)
        sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
        timesteps = (sigmas * n_train).astype(np.int64).astype(np.int32)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return DPMFlowSchedule(timesteps=timesteps, sigmas=sigmas, **_dpm_coefficients(sigmas))


def _dpm_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step float32 coefficients of the DPM-Solver++ update, computed with diffusers' float32 expressions.

    x_next = sample_coef·x − x0_coef·m0 − half_x0_coef·(inv_r0·(m0 − m1)), with m0/m1 the current/previous x0
    predictions; first-order steps (the first and the last) have half_x0_coef = inv_r0 = 0.
    """
    n = len(sigmas) - 1
    f32 = np.float32
    with np.errstate(divide="ignore"):  # log(σ = 0) = −inf at the last step gives x_next = x0, as in diffusers
        alphas = f32(1.0) - sigmas
        lambdas = np.log(alphas) - np.log(sigmas)
    sample_coef = np.zeros((n,), f32)
    x0_coef = np.zeros((n,), f32)
    half_x0_coef = np.zeros((n,), f32)
    inv_r0 = np.zeros((n,), f32)
    for k in range(n):
        h = lambdas[k + 1] - lambdas[k]
        sample_coef[k] = sigmas[k + 1] / sigmas[k]
        x0_coef[k] = alphas[k + 1] * (np.exp(-h) - f32(1.0))
        if 0 < k < n - 1:  # second order: lower_order_nums >= 1 and not the final step
            r0 = (lambdas[k] - lambdas[k - 1]) / h
            half_x0_coef[k] = f32(0.5) * x0_coef[k]
            inv_r0[k] = f32(1.0) / r0
    return {"sample_coef": sample_coef, "x0_coef": x0_coef, "half_x0_coef": half_x0_coef, "inv_r0": inv_r0}


_DPM_REQUIRED = {
    # key: (required value, diffusers' default when the key is absent)
    "algorithm_type": ("dpmsolver++", "dpmsolver++"),
    "solver_order": (2, 2),
    "solver_type": ("midpoint", "midpoint"),
    "prediction_type": ("flow_prediction", "epsilon"),
    "use_flow_sigmas": (True, False),
    "final_sigmas_type": ("zero", "zero"),
}
_DPM_REFUSED = {
    "thresholding": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_dynamic_shifting": (False,),
    "variance_type": (None,),
}


def dpm_flow_config_from_dict(d: dict) -> DPMSolverMultistepFlow:
    """`DPMSolverMultistepFlow` from a diffusers `scheduler_config.json` dict; absent keys take diffusers' defaults
    (flow_shift 1.0). Keys that cannot change this configuration's result are ignored: betas, timestep_spacing,
    steps_offset and lambda_min_clipped (flow sigmas replace that schedule), lower_order_final and euler_at_final
    (σ_N = 0 already makes the last step first order)."""
    for key, (required, default) in _DPM_REQUIRED.items():
        value = d.get(key, default)
        if value != required:
            raise ValueError(
                f"scheduler config {key}={value!r} is not supported by the DPM-Solver port; expected {required!r}"
            )
    for key, allowed in _DPM_REFUSED.items():
        if key in d and d[key] not in allowed:
            raise ValueError(
                f"scheduler config {key}={d[key]!r} is not supported by the DPM-Solver port; expected {allowed[0]!r}"
            )
    return DPMSolverMultistepFlow(
        num_train_timesteps=d.get("num_train_timesteps", 1000), flow_shift=d.get("flow_shift", 1.0)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DPMFlowSchedule:
    """timesteps (N,) int32 (diffusers' int64 `int(1000·σ)`), sigmas (N+1,) float32 ending in 0, plus the per-step
    coefficients of `_dpm_coefficients`. The loop state is the previous step's x0 prediction."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    sample_coef: np.ndarray
    x0_coef: np.ndarray
    half_x0_coef: np.ndarray
    inv_r0: np.ndarray
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init_state(self, x) -> jax.Array:
        return jnp.zeros(x.shape, jnp.float32)  # previous x0 prediction; unused by the first (first-order) step

    def timestep(self, k) -> jax.Array:
        return _gather(self.timesteps, k)

    def model_input(self, x, k) -> jax.Array:
        return x.astype(jnp.float32)

    def step(self, state: Any, model_output, k, x) -> tuple[jax.Array, jax.Array]:
        sample = x.astype(jnp.float32)
        x0 = sample - _gather(self.sigmas, k) * model_output.astype(jnp.float32)  # flow prediction -> data
        diff = _gather(self.inv_r0, k) * (x0 - state)
        x_next = (
            _gather(self.sample_coef, k) * sample - _gather(self.x0_coef, k) * x0 - _gather(self.half_x0_coef, k) * diff
        )
        return x_next, x0
