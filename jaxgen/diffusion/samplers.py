"""Reverse-process samplers for discrete-time diffusion models, each one XLA program.

Sampler contract: every sampler takes ``model_fn(x_t, t, cond) -> model_output``, where x_t is
[B, ...], t is int32 [B] and the output is in the sampler's ``prediction_type``. It also takes the
schedule, x_T, a PRNG key and the condition, which goes to model_fn unchanged. The schedule is a
pytree, so it is traced and its values can change without recompiling. Options such as num_steps
and spacing are static Python values. The loop is one ``lax.scan`` over precomputed timesteps, so
a sampler can be jitted whole, for example
``jax.jit(functools.partial(ddim_sample, model_fn, schedule, num_steps=50))(x_T, key, cond)``.
The loop state is float32 (float64 for float64 input) and the result is cast back to x_T's dtype.
Samplers that add noise draw step i's noise as ``jax.random.normal(jax.random.fold_in(key, i),
x_T.shape, state_dtype)``.

Shapes and symbols:
  B        batch size; x has shape [B, ...], images [B, H, W, C].
  T        number of training timesteps; t in [0, T) is an int32 timestep.
  N        number of sampling steps; timesteps is int32 [N], in decreasing order.
  ab_t     alpha_bar_t, the schedule's ``alphas_cumprod[t]``.
  x0, eps  the model's estimates of the clean sample and of the noise.
  sigma    in DPM-Solver code only: the variance-exploding noise level sqrt((1 - ab_t) / ab_t),
           which diffusers calls ``sigmas``. The variance-preserving pair is
           alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma * alpha, and lambda = log(alpha / sigma_vp).

Solvers:
  DDPM: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic Models".
  DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models" (eta = 0 is the deterministic ODE).
  DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", multistep second order, midpoint form.
  Karras sigmas: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
    Models", noise levels evenly spaced in sigma^(1 / rho) with rho = 7.

The step functions reproduce diffusers 0.42's DDPMScheduler.step, DDIMScheduler.step and
DPMSolverMultistepScheduler.step (algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
on the same inputs; the tests compare them.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.forward import broadcast_to_sample, check_prediction_type, convert_prediction
from jaxgen.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_CONVENTIONS = ("ddim", "dpm_solver")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Exponent rho of the Karras et al. 2022 noise levels.
_KARRAS_RHO = 7.0
# Smallest variance of the DDPM posterior, as in diffusers, so that sqrt stays differentiable at t == 0.
_MIN_POSTERIOR_VARIANCE = 1e-20
# alpha_bar that DPM-Solver uses in place of an exact 0 (zero terminal SNR), as diffusers does, so that
# sigma stays finite.
_DPM_MIN_ALPHA_BAR = 2.0**-24


# ----------------------------------------------------------------------------------------------
# Timestep grids (NumPy, static).
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(choices)}.")


def make_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    convention: str = "ddim",
) -> np.ndarray:
    """Choose the N sampling timesteps out of [0, T), in decreasing order, as int32 [N].

    Spacings (Lin et al. 2023, Table 2):
      "leading": multiples of T // N starting at 0, shifted by steps_offset.
      "trailing": counts down from T - 1 in strides of T / N.
      "linspace": N evenly spaced points of [0, T - 1], rounded.
    As in diffusers, steps_offset shifts only the "leading" grid.

    convention="ddim" matches diffusers' DDIMScheduler and DDPMScheduler.set_timesteps. With
    convention="dpm_solver" it matches DPMSolverMultistepScheduler.set_timesteps instead, which places
    N + 1 points for "leading" and "linspace" and drops the one at t == 0, because DPM-Solver's last
    step goes to the final noise level on its own.

    NOTE: for "trailing" and some N (61, 103, 122, ... with T = 1000) diffusers 0.42 returns N + 1
    timesteps ending in -1, from rounding in np.arange; this function always returns N.

    Raises:
      ValueError: num_steps is below 1 or above num_train_timesteps, a name is unknown, or the grid
        leaves [0, T) or repeats a timestep.
    """
    _check_choice("spacing", spacing, SPACINGS)
    _check_choice("convention", convention, TIMESTEP_CONVENTIONS)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} is larger than num_train_timesteps={num_train_timesteps}; "
            f"use at most {num_train_timesteps} sampling steps."
        )

    num_points = num_steps + 1 if convention == "dpm_solver" and spacing != "trailing" else num_steps
    if spacing == "leading":
        stride = num_train_timesteps // num_points
        timesteps = (np.arange(num_points) * stride)[::-1] + steps_offset
    elif spacing == "trailing":
        stride = num_train_timesteps / num_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -stride)) - 1
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, num_points).round()[::-1]
    timesteps = timesteps[:num_steps].astype(np.int32)

    if timesteps.min() < 0 or timesteps.max() >= num_train_timesteps:
        raise ValueError(
            f"Timesteps {timesteps.min()}..{timesteps.max()} leave [0, {num_train_timesteps}); "
            f"lower steps_offset={steps_offset} or num_steps={num_steps}."
        )
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"spacing={spacing!r} with num_steps={num_steps} and num_train_timesteps={num_train_timesteps} "
            "repeats timesteps; use fewer steps or another spacing."
        )
    return timesteps


def _previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """Return the timestep each step moves to; -1 marks the end of the chain."""
    return np.append(timesteps[1:], -1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------


def _is_zero(value: Any) -> bool:
    """Tell whether value is a concrete number equal to 0 (traced values are never treated as 0)."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _check_eta(eta: Any) -> None:
    try:
        value = float(eta)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 is deterministic DDIM, 1 is DDPM-like), got {value}.")


def _alpha_bar_or(schedule: NoiseSchedule, t: jax.Array, fallback: jax.Array) -> jax.Array:
    """Gather alpha_bar_t, using fallback where t < 0 (before the first or after the last timestep)."""
    t = jnp.asarray(t)
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], fallback)


def _state_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def _batch_timesteps(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, dtype=jnp.int32)


def _step_noise(key: jax.Array, step: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, step), x.shape, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# DDPM.
# ----------------------------------------------------------------------------------------------


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    x_t: jax.Array,
    noise: jax.Array,
    *,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    variance_type: str = "fixed_small",
) -> tuple[jax.Array, jax.Array]:
    """Take one ancestral DDPM step x_t -> x_{t_prev}, sampling the posterior q(x_{t_prev} | x_t, x0).

    t and t_prev are scalars or [B]; t_prev == -1 ends the chain (alpha_bar = 1). With t_prev < t - 1
    (a shortened chain) the step uses the effective beta 1 - ab_t / ab_prev, as diffusers does.
    No noise is added at t == 0. Returns (x_prev, x0), where x0 is the model's clean-sample estimate.

    Symbols: beta_eff = 1 - ab_t / ab_prev is the beta of this step; the posterior mean is
    mu = sqrt(ab_prev) beta_eff / (1 - ab_t) * x0 + sqrt(1 - beta_eff) (1 - ab_prev) / (1 - ab_t) * x_t.
    """
    check_prediction_type(prediction_type)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)

    # 1. Noise levels of this step.
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = _alpha_bar_or(schedule, t_prev, jnp.ones((), ab_t.dtype))
    alpha_eff = ab_t / ab_prev
    beta_eff = 1.0 - alpha_eff

    # 2. Clean-sample estimate x0 from the model output.
    bcast = lambda c: broadcast_to_sample(c, x_t)  # noqa: E731
    x0, _ = convert_prediction(
        model_output, x_t, bcast(jnp.sqrt(ab_t)), bcast(jnp.sqrt(1.0 - ab_t)), prediction_type=prediction_type
    )
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)

    # 3. Posterior mean mu(x_t, x0) of q(x_{t_prev} | x_t, x0).
    x0_coef = jnp.sqrt(ab_prev) * beta_eff / (1.0 - ab_t)
    xt_coef = jnp.sqrt(alpha_eff) * (1.0 - ab_prev) / (1.0 - ab_t)
    mean = bcast(x0_coef) * x0 + bcast(xt_coef) * x_t

    # 4. Posterior variance ("fixed_small") or beta ("fixed_large"); no noise at t == 0.
    if variance_type == "fixed_small":
        variance = jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * beta_eff, _MIN_POSTERIOR_VARIANCE)
    else:
        variance = beta_eff
    std = jnp.where(jnp.asarray(t) > 0, jnp.sqrt(variance), 0.0)
    return mean + bcast(std) * noise, x0


def ddpm_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array,
    cond: Any = None,
    *,
    num_steps: int | None = None,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    variance_type: str = "fixed_small",
) -> jax.Array:
    """Sample with ancestral DDPM (Ho et al. 2020), by default over the full chain T-1, ..., 0.

    num_steps=None runs all T steps. A smaller num_steps runs a shortened chain on the timesteps of
    make_timesteps(T, num_steps, spacing, steps_offset), as diffusers' DDPMScheduler does.

    Raises:
      ValueError: key is None (DDPM draws noise at every step), or an option is invalid.
    """
    if key is None:
        raise ValueError("ddpm_sample draws noise at every step; pass a PRNG key, e.g. jax.random.key(0).")
    check_prediction_type(prediction_type)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    num_train_timesteps = schedule.num_train_timesteps
    timesteps = make_timesteps(
        num_train_timesteps, num_train_timesteps if num_steps is None else num_steps, spacing, steps_offset
    )
    prev_timesteps = _previous_timesteps(timesteps)
    x = x_T.astype(_state_dtype(x_T))

    def body(x, step_input):
        step, t, t_prev = step_input
        model_output = model_fn(x, _batch_timesteps(t, x), cond)
        noise = _step_noise(key, step, x)
        x_prev, _ = ddpm_step(
            schedule,
            model_output,
            t,
            t_prev,
            x,
            noise,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            variance_type=variance_type,
        )
        return x_prev.astype(x.dtype), None

    steps = np.arange(len(timesteps), dtype=np.int32)
    x, _ = jax.lax.scan(body, x, (steps, timesteps, prev_timesteps))
    return x.astype(x_T.dtype)


# ----------------------------------------------------------------------------------------------
# DDIM.
# ----------------------------------------------------------------------------------------------


def _final_alpha_bar(schedule: NoiseSchedule, set_alpha_to_one: bool) -> jax.Array:
    if set_alpha_to_one:
        return jnp.ones((), schedule.alphas_cumprod.dtype)
    return schedule.alphas_cumprod[0]


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    x_t: jax.Array,
    *,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    set_alpha_to_one: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Take one DDIM step x_t -> x_{t_prev} (Song et al. 2021).

    t and t_prev are scalars or [B]; t_prev < 0 ends the chain at alpha_bar = 1 (set_alpha_to_one) or
    at alpha_bar_0. eta scales the noise: 0 is the deterministic DDIM ODE, 1 the DDPM posterior
    variance. Returns (x_prev, x0).

    Symbols: sigma_eta = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) is the paper's
    sigma_t(eta). x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_eta^2) eps + sigma_eta noise.

    Raises:
      ValueError: eta is not a concrete 0 and noise is None, or eta is outside [0, 1].
    """
    check_prediction_type(prediction_type)
    _check_eta(eta)
    deterministic = _is_zero(eta)
    if noise is None and not deterministic:
        raise ValueError(f"ddim_step with eta={eta} adds noise; pass noise with the shape of x_t.")

    # 1. Noise levels of this step.
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = _alpha_bar_or(schedule, t_prev, _final_alpha_bar(schedule, set_alpha_to_one))
    bcast = lambda c: broadcast_to_sample(c, x_t)  # noqa: E731

    # 2. Estimates of x0 and eps.
    x0, eps = convert_prediction(
        model_output, x_t, bcast(jnp.sqrt(ab_t)), bcast(jnp.sqrt(1.0 - ab_t)), prediction_type=prediction_type
    )
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)

    # 3. Noise scale sigma_eta and the direction pointing to x_t.
    variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    std = eta * jnp.sqrt(variance)
    direction = bcast(jnp.sqrt(jnp.maximum(1.0 - ab_prev - std**2, 0.0))) * eps

    # 4. x_prev.
    x_prev = bcast(jnp.sqrt(ab_prev)) * x0 + direction
    if not deterministic:
        x_prev = x_prev + bcast(std) * noise
    return x_prev, x0


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    *,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    set_alpha_to_one: bool = True,
) -> jax.Array:
    """Sample with DDIM (Song et al. 2021) over num_steps timesteps from make_timesteps.

    Each step moves to the next timestep of the grid. diffusers' DDIMScheduler instead moves to
    t - T // N, which is the same grid for "leading" and for "trailing" when N divides T, and differs
    for "linspace". With eta == 0 the result does not depend on key, which may then be None.

    Raises:
      ValueError: eta is not a concrete 0 and key is None, or an option is invalid.
    """
    check_prediction_type(prediction_type)
    _check_eta(eta)
    deterministic = _is_zero(eta)
    if key is None and not deterministic:
        raise ValueError(f"ddim_sample with eta={eta} draws noise; pass a PRNG key or set eta=0.")
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
    prev_timesteps = _previous_timesteps(timesteps)
    x = x_T.astype(_state_dtype(x_T))

    def body(x, step_input):
        step, t, t_prev = step_input
        model_output = model_fn(x, _batch_timesteps(t, x), cond)
        noise = None if deterministic else _step_noise(key, step, x)
        x_prev, _ = ddim_step(
            schedule,
            model_output,
            t,
            t_prev,
            x,
            eta=eta,
            noise=noise,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
        )
        return x_prev.astype(x.dtype), None

    steps = np.arange(len(timesteps), dtype=np.int32)
    x, _ = jax.lax.scan(body, x, (steps, timesteps, prev_timesteps))
    return x.astype(x_T.dtype)


def ddim_invert(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: jax.Array,
    cond: Any = None,
    *,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    set_alpha_to_one: bool = True,
) -> jax.Array:
    """Map x_0 to x_T by running the deterministic DDIM ODE (eta = 0) forward in time.

    The grid is ddim_sample's, in increasing order, so ddim_sample with the same options maps the
    result back to about x0. Each step goes from level s to grid timestep t, where s is the previous
    grid timestep, and before the first step alpha_bar = 1 (or alpha_bar_0 when set_alpha_to_one is
    False). The model is evaluated at (x_s, t) because x_t is not known yet, the same approximation
    as diffusers' DDIMInverseScheduler. The round trip is therefore exact only in the limit of
    small steps.
    """
    check_prediction_type(prediction_type)
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)[::-1].copy()
    source_timesteps = np.concatenate([[-1], timesteps[:-1]]).astype(np.int32)
    initial_alpha_bar = _final_alpha_bar(schedule, set_alpha_to_one)
    x = x0.astype(_state_dtype(x0))

    def body(x, step_input):
        t_source, t = step_input
        model_output = model_fn(x, _batch_timesteps(t, x), cond)
        ab_source = _alpha_bar_or(schedule, t_source, initial_alpha_bar)
        ab_t = schedule.alphas_cumprod[t]
        x0_estimate, eps = convert_prediction(
            model_output, x, jnp.sqrt(ab_source), jnp.sqrt(1.0 - ab_source), prediction_type=prediction_type
        )
        x_next = jnp.sqrt(ab_t) * x0_estimate + jnp.sqrt(1.0 - ab_t) * eps
        return x_next.astype(x.dtype), None

    x, _ = jax.lax.scan(body, x, (source_timesteps, timesteps))
    return x.astype(x0.dtype)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M).
# ----------------------------------------------------------------------------------------------


class DPMSolverHistory(NamedTuple):
    """Multistep state of DPM-Solver++(2M): what the next step needs from the previous one."""

    x0_prev: jax.Array  # [B, ...] data prediction of the previous step.
    lambda_prev: jax.Array  # [] log(alpha / sigma_vp) at the previous step's noise level.
    num_stored: jax.Array  # [] int32, 0 before the first step and 1 after it.


def dpmpp_2m_init(x: jax.Array) -> DPMSolverHistory:
    """Return the empty DPM-Solver++(2M) history for samples shaped like x."""
    return DPMSolverHistory(
        x0_prev=jnp.zeros_like(x),
        lambda_prev=jnp.zeros((), jnp.float32),
        num_stored=jnp.zeros((), jnp.int32),
    )


def _vp_alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Convert a variance-exploding sigma into the variance-preserving (alpha, sigma_vp) pair."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def dpmpp_2m_step(
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    history: DPMSolverHistory,
    *,
    prediction_type: str = "epsilon",
    lower_order: bool | jax.Array = False,
) -> tuple[jax.Array, DPMSolverHistory]:
    """Take one DPM-Solver++(2M) step from noise level sigma to sigma_next (Lu et al. 2022).

    sigma and sigma_next are scalar variance-exploding levels (see make_dpm_solver_grid). The first
    step (empty history), a step with lower_order=True and a step to sigma_next == 0 are first order
    (DDIM in data-prediction form); the others add the midpoint correction from the previous data
    prediction. Returns (x_next, history for the next step).

    Symbols: m0, m1 are the data predictions now and at the previous step; h = lambda_next - lambda,
    r = (lambda - lambda_prev) / h and D1 = (m0 - m1) / r.
    """
    check_prediction_type(prediction_type)

    # 1. Variance-preserving (alpha, sigma_vp) and lambda at both levels.
    alpha, sigma_vp = _vp_alpha_sigma(sigma)
    alpha_next, sigma_vp_next = _vp_alpha_sigma(sigma_next)
    lam = jnp.log(alpha) - jnp.log(sigma_vp)
    lam_next = jnp.log(alpha_next) - jnp.log(sigma_vp_next)  # +inf when sigma_next == 0.
    h = lam_next - lam

    # 2. Data prediction m0 (DPM-Solver++ integrates in x0 space).
    m0, _ = convert_prediction(model_output, x, alpha, sigma_vp, prediction_type=prediction_type)

    # 3. Second-order difference D1 from the previous data prediction, where it is used.
    use_second_order = (history.num_stored > 0) & jnp.logical_not(lower_order) & (sigma_next > 0)
    r = jnp.where(use_second_order, (lam - history.lambda_prev) / h, 1.0)
    d1 = jnp.where(use_second_order, (m0 - history.x0_prev) / r, 0.0)

    # 4. Exponential-integrator update (midpoint form).
    phi = jnp.expm1(-h)
    x_next = (sigma_vp_next / sigma_vp) * x - alpha_next * phi * (m0 + 0.5 * d1)

    new_history = DPMSolverHistory(
        x0_prev=m0.astype(history.x0_prev.dtype),
        lambda_prev=lam.astype(history.lambda_prev.dtype),
        num_stored=jnp.ones((), jnp.int32),
    )
    return x_next, new_history


def _sigma_to_timestep(sigma: jax.Array, log_sigmas: jax.Array) -> jax.Array:
    """Invert sigma(t) by linear interpolation in log sigma, as diffusers' _sigma_to_t does."""
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    num_train_timesteps = log_sigmas.shape[0]
    num_below = jnp.sum(log_sigmas[None, :] <= log_sigma[:, None], axis=1)
    low = jnp.clip(num_below - 1, 0, num_train_timesteps - 2)
    high = low + 1
    weight = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])
    weight = jnp.clip(weight, 0.0, 1.0)
    return (1.0 - weight) * low + weight * high


def make_dpm_solver_grid(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    final_sigmas_type: str = "zero",
) -> tuple[jax.Array, jax.Array]:
    """Compute DPM-Solver's timesteps int32 [N] and variance-exploding sigmas float32 [N + 1].

    Matches diffusers' DPMSolverMultistepScheduler.set_timesteps. Without Karras sigmas, the
    timesteps come from make_timesteps(..., convention="dpm_solver") and sigma_i is the schedule's
    sqrt((1 - ab_t) / ab_t) at them. With Karras sigmas, N levels are spaced evenly in sigma^(1/7)
    between the schedule's smallest and largest sigma, and spacing and steps_offset are unused. The
    model is then called with each level's timestep, rounded to the nearest integer. The last sigma
    is 0 ("zero") or the schedule's smallest sigma ("sigma_min").

    The Karras grid depends on the schedule's values, so it is computed in JAX (and traced under jit).
    An alpha_bar of exactly 0 (zero terminal SNR) is replaced by 2**-24, as diffusers does.
    NOTE: diffusers truncates (not rounds) the Karras timesteps of the squaredcos_cap_v2 schedule, so
    for that schedule the model can see a timestep one lower than diffusers passes.
    """
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    num_train_timesteps = schedule.num_train_timesteps
    alphas_cumprod = schedule.alphas_cumprod
    alphas_cumprod = jnp.where(alphas_cumprod > 0, alphas_cumprod, _DPM_MIN_ALPHA_BAR)
    all_sigmas = jnp.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # [T], increasing in t.

    if use_karras_sigmas:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        ramp = jnp.asarray(np.linspace(0.0, 1.0, num_steps), jnp.float32)
        max_root = all_sigmas[-1] ** (1.0 / _KARRAS_RHO)
        min_root = all_sigmas[0] ** (1.0 / _KARRAS_RHO)
        sigmas = (max_root + ramp * (min_root - max_root)) ** _KARRAS_RHO
        timesteps = jnp.round(_sigma_to_timestep(sigmas, jnp.log(all_sigmas))).astype(jnp.int32)
    else:
        timesteps_np = make_timesteps(
            num_train_timesteps, num_steps, spacing, steps_offset, convention="dpm_solver"
        )
        timesteps = jnp.asarray(timesteps_np)
        sigmas = all_sigmas[timesteps_np]

    final_sigma = jnp.zeros((), jnp.float32) if final_sigmas_type == "zero" else all_sigmas[0]
    sigmas = jnp.concatenate([sigmas, final_sigma[None]]).astype(jnp.float32)
    return timesteps, sigmas


def dpmpp_2m_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    cond: Any = None,
    *,
    num_steps: int,
    spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    prediction_type: str = "epsilon",
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
) -> jax.Array:
    """Sample with DPM-Solver++(2M) (Lu et al. 2022) on make_dpm_solver_grid's noise levels.

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint"). The solver is deterministic, so key is unused (it may be None) and only
    there to keep the sampler contract. The last step is first order when final_sigmas_type is
    "zero", or when lower_order_final is set and num_steps < 15 (the diffusers rule).
    """
    del key  # Deterministic solver.
    check_prediction_type(prediction_type)
    timesteps, sigmas = make_dpm_solver_grid(
        schedule,
        num_steps,
        spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        final_sigmas_type=final_sigmas_type,
    )
    lower_order = np.zeros(num_steps, dtype=bool)
    lower_order[-1] = lower_order_final and num_steps < 15
    x = x_T.astype(_state_dtype(x_T))

    def body(carry, step_input):
        x, history = carry
        t, sigma, sigma_next, force_first_order = step_input
        model_output = model_fn(x, _batch_timesteps(t, x), cond)
        x_next, history = dpmpp_2m_step(
            model_output,
            x,
            sigma,
            sigma_next,
            history,
            prediction_type=prediction_type,
            lower_order=force_first_order,
        )
        return (x_next.astype(x.dtype), history), None

    (x, _), _ = jax.lax.scan(body, (x, dpmpp_2m_init(x)), (timesteps, sigmas[:-1], sigmas[1:], lower_order))
    return x.astype(x_T.dtype)


# ----------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}


def sampler_options(name: str) -> tuple[str, ...]:
    """List the keyword-only options that the named sampler accepts."""
    _check_choice("sampler", name, tuple(SAMPLERS))
    parameters = inspect.signature(SAMPLERS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def sample(
    name: str,
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    **options: Any,
) -> jax.Array:
    """Run the sampler registered under name ("ddpm", "ddim" or "dpmpp_2m") with the given options.

    Raises:
      ValueError: name is unknown.
      TypeError: an option is not one of the sampler's keyword-only options.
    """
    valid = sampler_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hints = []
        for option in unknown:
            close = difflib.get_close_matches(option, valid, n=1)
            hints.append(f"{option!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"Sampler {name!r} got unknown option(s) {', '.join(hints)}; valid options: {', '.join(valid)}."
        )
    return SAMPLERS[name](model_fn, schedule, x_T, key, cond, **options)
