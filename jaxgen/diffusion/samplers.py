"""Reverse-process samplers for discrete-time diffusion models, each one XLA program.

Sampler contract: every sampler takes ``model_fn(x_t, t, cond) -> model_output``, where x_t is
[B, ...], t is int32 [B] and the output is in the sampler's ``prediction_type``. The Euler samplers
pass t as float32 [B] instead, because their grids can fall between integer timesteps, as in
diffusers. A sampler also takes the schedule, x_T, a PRNG key and the condition, which goes to
model_fn unchanged. x_T is unit-variance noise for every sampler: the Euler samplers scale it to
their first noise level themselves. The schedule is a pytree, so it is traced and its values can
change without recompiling. Options such as num_steps and spacing are static Python values. The loop is one ``lax.scan`` over precomputed timesteps, so
a sampler can be jitted whole, for example
``jax.jit(functools.partial(ddim_sample, model_fn, schedule, num_steps=50))(x_T, key, cond)``.
The loop state is float32 (float64 for float64 input) and the result is cast back to x_T's dtype.
Samplers that add noise draw step i's noise as ``jax.random.normal(jax.random.fold_in(key, i),
x_T.shape, state_dtype)``.

Starting part-way (image-to-image): every sampler takes a static ``start_step`` in [0, N) and runs
only grid steps start_step, ..., N - 1, as diffusers' img2img pipelines do with
``timesteps[start_step:]`` and ``set_begin_index(start_step)``. With start_step > 0, x_T is not unit
noise but the sample at grid step start_step in the sampler's own scale, and no sampler rescales it
(the Euler samplers skip their init_noise_sigma factor). ``start_sample`` builds that x_T from clean
latents and unit noise. Step i keeps its noise key fold_in(key, i) with i counted from the start of
the full grid, and DPM-Solver's multistep history starts empty at start_step.

Shapes and symbols:
  B        batch size; x has shape [B, ...], images [B, H, W, C].
  T        number of training timesteps; t in [0, T) is an int32 timestep.
  N        number of sampling steps; timesteps is int32 [N], in decreasing order.
  ab_t     alpha_bar_t, the schedule's ``alphas_cumprod[t]``.
  x0, eps  the model's estimates of the clean sample and of the noise.
  sigma    in DPM-Solver and Euler code only: the variance-exploding noise level
           sqrt((1 - ab_t) / ab_t), which diffusers calls ``sigmas``. The variance-preserving pair is
           alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma * alpha, and lambda = log(alpha / sigma_vp).
           The Euler samplers keep x in the variance-exploding scale x = x0 + sigma * eps and call
           the model on x * alpha = x / sqrt(sigma^2 + 1), which is the usual x_t.

Solvers:
  DDPM: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic Models".
  DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models" (eta = 0 is the deterministic ODE).
  DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", multistep second order, midpoint form.
  Euler: Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma, in the
    variance-exploding form of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models".
  Euler ancestral: each step goes down to sigma_down by Euler's method and adds fresh noise of
    standard deviation sigma_up, where sigma_up^2 + sigma_down^2 = sigma_next^2.
  Karras sigmas: Karras et al. 2022, noise levels evenly spaced in sigma^(1 / rho) with rho = 7.

The step functions reproduce diffusers 0.42's DDPMScheduler.step, DDIMScheduler.step,
DPMSolverMultistepScheduler.step (algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
EulerDiscreteScheduler.step (no churn) and EulerAncestralDiscreteScheduler.step on the same inputs;
the tests compare them.
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
# alpha_bar that the variance-exploding samplers (DPM-Solver, Euler) use in place of an exact 0 (zero
# terminal SNR), as diffusers does, so that sigma stays finite.
_MIN_ALPHA_BAR = 2.0**-24


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


def _check_start_step(start_step: Any, num_steps: int) -> None:
    """Reject a start_step that is not a Python int in [0, num_steps)."""
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)):
        raise TypeError(
            f"start_step must be a Python int (it sets the loop length, so it is static), got {start_step!r}."
        )
    if not 0 <= start_step < num_steps:
        raise ValueError(
            f"start_step={start_step} is outside [0, {num_steps}); with {num_steps} sampling steps use 0 to "
            f"{num_steps - 1}, where 0 runs the whole grid."
        )


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
    start_step: int = 0,
) -> jax.Array:
    """Sample with ancestral DDPM (Ho et al. 2020), by default over the full chain T-1, ..., 0.

    num_steps=None runs all T steps. A smaller num_steps runs a shortened chain on the timesteps of
    make_timesteps(T, num_steps, spacing, steps_offset), as diffusers' DDPMScheduler does.
    start_step > 0 skips the first grid steps, and x_T is then x_t at t = timesteps[start_step] (see
    start_sample).

    Raises:
      ValueError: key is None (DDPM draws noise at every step), or an option is invalid.
      TypeError: start_step is not a Python int.
    """
    if key is None:
        raise ValueError("ddpm_sample draws noise at every step; pass a PRNG key, e.g. jax.random.key(0).")
    check_prediction_type(prediction_type)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    timesteps = _ddpm_timesteps(schedule, num_steps, spacing, steps_offset)
    _check_start_step(start_step, len(timesteps))
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
    scan_inputs = (steps[start_step:], timesteps[start_step:], prev_timesteps[start_step:])
    x, _ = jax.lax.scan(body, x, scan_inputs)
    return x.astype(x_T.dtype)


def _ddpm_timesteps(
    schedule: NoiseSchedule, num_steps: int | None, spacing: str, steps_offset: int
) -> np.ndarray:
    """Return ddpm_sample's grid, where num_steps=None means all T training timesteps."""
    num_train_timesteps = schedule.num_train_timesteps
    return make_timesteps(
        num_train_timesteps, num_train_timesteps if num_steps is None else num_steps, spacing, steps_offset
    )


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
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Take one DDIM step x_t -> x_{t_prev} (Song et al. 2021).

    t and t_prev are scalars or [B]; t_prev < 0 ends the chain at alpha_bar = 1 (set_alpha_to_one) or
    at alpha_bar_0. eta scales the noise: 0 is the deterministic DDIM ODE, 1 the DDPM posterior
    variance. Returns (x_prev, x0).

    Symbols: sigma_eta = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) is the paper's
    sigma_t(eta). x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_eta^2) eps + sigma_eta noise.

    clip_sample clips x0 to [-1, 1]. With use_clipped_model_output, eps is then recomputed from the clipped
    x0, eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t), as in GLIDE and diffusers' option of that name, so the
    step stays on the deterministic ODE of the clipped estimate. Clipping x0 alone (diffusers' default)
    mixes a clipped x0 with an unclipped eps.

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
        if use_clipped_model_output:
            eps = (x_t - bcast(jnp.sqrt(ab_t)) * x0) / bcast(jnp.sqrt(1.0 - ab_t))

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
    use_clipped_model_output: bool = False,
    start_step: int = 0,
) -> jax.Array:
    """Sample with DDIM (Song et al. 2021) over num_steps timesteps from make_timesteps.

    Each step moves to the next timestep of the grid. diffusers' DDIMScheduler instead moves to
    t - T // N, which is the same grid for "leading" and for "trailing" when N divides T, and differs
    for "linspace". With eta == 0 the result does not depend on key, which may then be None.
    start_step > 0 skips the first grid steps, and x_T is then x_t at t = timesteps[start_step] (see
    start_sample).

    Raises:
      ValueError: eta is not a concrete 0 and key is None, or an option is invalid.
      TypeError: start_step is not a Python int.
    """
    check_prediction_type(prediction_type)
    _check_eta(eta)
    deterministic = _is_zero(eta)
    if key is None and not deterministic:
        raise ValueError(f"ddim_sample with eta={eta} draws noise; pass a PRNG key or set eta=0.")
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
    _check_start_step(start_step, num_steps)
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
            use_clipped_model_output=use_clipped_model_output,
        )
        return x_prev.astype(x.dtype), None

    steps = np.arange(len(timesteps), dtype=np.int32)
    scan_inputs = (steps[start_step:], timesteps[start_step:], prev_timesteps[start_step:])
    x, _ = jax.lax.scan(body, x, scan_inputs)
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
    clip_sample: bool = False,
) -> tuple[jax.Array, DPMSolverHistory]:
    """Take one DPM-Solver++(2M) step from noise level sigma to sigma_next (Lu et al. 2022).

    sigma and sigma_next are scalar variance-exploding levels (see make_dpm_solver_grid). The first
    step (empty history), a step with lower_order=True and a step to sigma_next == 0 are first order
    (DDIM in data-prediction form); the others add the midpoint correction from the previous data
    prediction. Returns (x_next, history for the next step).

    Symbols: m0, m1 are the data predictions now and at the previous step; h = lambda_next - lambda,
    r = (lambda - lambda_prev) / h and D1 = (m0 - m1) / r.

    clip_sample clips the data prediction to [-1, 1]. diffusers has no such flag for this solver; its
    dynamic thresholding with sample_max_value=1.0 gives the same result.
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
    if clip_sample:
        m0 = jnp.clip(m0, -1.0, 1.0)

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


def _training_sigmas(schedule: NoiseSchedule) -> jax.Array:
    """Return the variance-exploding sigma sqrt((1 - ab_t) / ab_t) of every training timestep, [T].

    An alpha_bar of exactly 0 (zero terminal SNR) is replaced by 2**-24, as diffusers does.
    """
    alphas_cumprod = schedule.alphas_cumprod
    alphas_cumprod = jnp.where(alphas_cumprod > 0, alphas_cumprod, _MIN_ALPHA_BAR)
    return jnp.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _karras_sigmas(sigma_min: jax.Array, sigma_max: jax.Array, num_steps: int) -> jax.Array:
    """Return num_steps noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/7)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    ramp = jnp.asarray(np.linspace(0.0, 1.0, num_steps), jnp.float32)
    max_root = sigma_max ** (1.0 / _KARRAS_RHO)
    min_root = sigma_min ** (1.0 / _KARRAS_RHO)
    return (max_root + ramp * (min_root - max_root)) ** _KARRAS_RHO


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
    all_sigmas = _training_sigmas(schedule)  # [T], increasing in t.

    if use_karras_sigmas:
        sigmas = _karras_sigmas(all_sigmas[0], all_sigmas[-1], num_steps)
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


def _remaining_grid(
    timesteps: jax.Array, sigmas: jax.Array, start_step: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return the scan inputs (t, sigma, sigma_next) of the steps from start_step on, for N timesteps and N + 1 sigmas."""
    return timesteps[start_step:], sigmas[start_step:-1], sigmas[start_step + 1 :]


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
    clip_sample: bool = False,
    start_step: int = 0,
) -> jax.Array:
    """Sample with DPM-Solver++(2M) (Lu et al. 2022) on make_dpm_solver_grid's noise levels.

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint"). The solver is deterministic, so key is unused (it may be None) and only
    there to keep the sampler contract. The last step is first order when final_sigmas_type is
    "zero", or when lower_order_final is set and num_steps < 15 (the diffusers rule, which counts
    the whole grid even when start_step > 0). start_step > 0 skips the first grid steps. x_T is then
    the sample at noise level sigmas[start_step] (see start_sample), and the first step run is first
    order because the history starts empty, as in diffusers after set_begin_index. clip_sample clips
    each step's data prediction to [-1, 1] (see dpmpp_2m_step).

    Raises:
      ValueError: an option is invalid.
      TypeError: start_step is not a Python int.
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
    _check_start_step(start_step, num_steps)
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
            clip_sample=clip_sample,
        )
        return (x_next.astype(x.dtype), history), None

    scan_inputs = (*_remaining_grid(timesteps, sigmas, start_step), lower_order[start_step:])
    (x, _), _ = jax.lax.scan(body, (x, dpmpp_2m_init(x)), scan_inputs)
    return x.astype(x_T.dtype)


# ----------------------------------------------------------------------------------------------
# Euler and Euler ancestral.
# ----------------------------------------------------------------------------------------------


def make_euler_grid(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> tuple[jax.Array, jax.Array]:
    """Compute the Euler samplers' timesteps float32 [N] and variance-exploding sigmas float32 [N + 1].

    Matches diffusers' EulerDiscreteScheduler.set_timesteps (interpolation_type="linear",
    timestep_type="discrete") and EulerAncestralDiscreteScheduler.set_timesteps. "leading" and
    "trailing" give make_timesteps' integer grids. "linspace" gives N evenly spaced points of
    [0, T - 1] without rounding, unlike make_timesteps. sigma at a fractional timestep is
    interpolated linearly between the training timesteps' sigmas.

    With Karras sigmas, N levels are spaced evenly in sigma^(1/7) from the grid's largest sigma (or
    sigma_max) down to its smallest (or sigma_min), so unlike DPM-Solver's Karras grid this one
    depends on spacing. The timesteps are then the levels mapped back by interpolation in log
    sigma, not rounded. The last sigma is 0 ("zero") or the schedule's smallest sigma ("sigma_min").

    Raises:
      ValueError: an option is invalid, or sigma_min or sigma_max is set without use_karras_sigmas
        (diffusers ignores them then).
    """
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not use_karras_sigmas and (sigma_min is not None or sigma_max is not None):
        raise ValueError(
            f"sigma_min={sigma_min} and sigma_max={sigma_max} only bound Karras sigmas; set "
            "use_karras_sigmas=True or leave them None."
        )
    num_train_timesteps = schedule.num_train_timesteps
    # make_timesteps also checks num_steps and steps_offset for every spacing.
    timesteps_np = make_timesteps(num_train_timesteps, num_steps, spacing, steps_offset).astype(np.float32)
    if spacing == "linspace":
        timesteps_np = np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()

    all_sigmas = _training_sigmas(schedule)  # [T], increasing in t.
    timesteps = jnp.asarray(timesteps_np)
    sigmas = jnp.interp(timesteps, jnp.arange(num_train_timesteps, dtype=jnp.float32), all_sigmas)
    if use_karras_sigmas:
        low = sigmas[-1] if sigma_min is None else jnp.asarray(sigma_min, jnp.float32)
        high = sigmas[0] if sigma_max is None else jnp.asarray(sigma_max, jnp.float32)
        sigmas = _karras_sigmas(low, high, num_steps)
        timesteps = _sigma_to_timestep(sigmas, jnp.log(all_sigmas))

    final_sigma = jnp.zeros((), jnp.float32) if final_sigmas_type == "zero" else all_sigmas[0]
    sigmas = jnp.concatenate([sigmas, final_sigma[None]])
    return timesteps.astype(jnp.float32), sigmas.astype(jnp.float32)


def euler_init_noise_sigma(sigmas: jax.Array, spacing: str) -> jax.Array:
    """Return the standard deviation the Euler samplers scale unit noise x_T to, as a scalar.

    The largest sigma for "linspace" and "trailing" grids and sqrt(sigma^2 + 1) of it for "leading",
    as diffusers' init_noise_sigma does.
    """
    _check_choice("spacing", spacing, SPACINGS)
    sigma_max = jnp.max(sigmas)
    if spacing == "leading":
        return jnp.sqrt(sigma_max**2 + 1.0)
    return sigma_max


def _euler_denoised(model_output: jax.Array, x: jax.Array, sigma: jax.Array, prediction_type: str) -> jax.Array:
    """Estimate x0 from the model output on x / sqrt(sigma^2 + 1), for x in the variance-exploding scale."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + x / (sigma**2 + 1.0)
    return model_output


def euler_step(
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    *,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Take one Euler step of dx/dsigma = (x - x0) / sigma from sigma to sigma_next (Karras et al. 2022).

    x is in the variance-exploding scale and model_output is the model's output for
    x / sqrt(sigma^2 + 1). sigma and sigma_next are scalars. Returns (x_next, x0).
    """
    # 1. Denoised estimate x0 = D(x; sigma).
    x0 = _euler_denoised(model_output, x, sigma, prediction_type)
    # 2. ODE derivative d = (x - x0) / sigma and the step of length sigma_next - sigma.
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma), x0


def euler_ancestral_step(
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    noise: jax.Array,
    *,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Take one ancestral Euler step from sigma to sigma_next with the given standard normal noise.

    Symbols: sigma_up = sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is the standard deviation of
    the fresh noise, and sigma_down = sqrt(sigma_next^2 - sigma_up^2) the level the deterministic
    Euler step goes to. Returns (x_next, x0); a step to sigma_next == 0 returns x0 and adds no noise.
    """
    # 1. Denoised estimate and the split of sigma_next into a deterministic and a noise part.
    x0 = _euler_denoised(model_output, x, sigma, prediction_type)
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    # 2. Euler step down to sigma_down, then noise up to sigma_next.
    derivative = (x - x0) / sigma
    x_next = x + derivative * (sigma_down - sigma) + noise * sigma_up
    return x_next, x0


def _euler_model_input(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Scale the variance-exploding x to the model's x_t, as diffusers' scale_model_input does."""
    return x / jnp.sqrt(sigma**2 + 1.0)


def _float_timesteps(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def _euler_initial_state(x_T: jax.Array, sigmas: jax.Array, spacing: str, start_step: int) -> jax.Array:
    """Scale unit noise x_T by euler_init_noise_sigma, or take x_T as it is when start_step > 0."""
    state_dtype = _state_dtype(x_T)
    x = x_T.astype(state_dtype)
    if start_step > 0:
        return x  # start_sample already put x_T at sigmas[start_step] in the variance-exploding scale.
    return x * euler_init_noise_sigma(sigmas, spacing).astype(state_dtype)


def euler_sample(
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
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
    prediction_type: str = "epsilon",
    start_step: int = 0,
) -> jax.Array:
    """Sample with Euler's method (Karras et al. 2022) on make_euler_grid's noise levels.

    Matches diffusers' EulerDiscreteScheduler without churn (s_churn=0, the pipelines' default),
    which is SDXL's default scheduler. x_T is unit-variance noise: the sampler multiplies it by
    euler_init_noise_sigma, so do not pre-scale it as diffusers pipelines do with
    init_noise_sigma. model_fn gets x / sqrt(sigma^2 + 1) and float32 timesteps [B]. The solver is
    deterministic, so key is unused (it may be None) and only there to keep the sampler contract.
    With final_sigmas_type="sigma_min" the result keeps the noise of the schedule's smallest sigma,
    in the variance-exploding scale, as diffusers returns it.

    start_step > 0 skips the first grid steps. x_T is then already in the variance-exploding scale,
    x0 + sigmas[start_step] * noise as start_sample returns it, and is not multiplied by
    euler_init_noise_sigma.

    NOTE: classifier_guided_model_fn gathers alpha_bar at integer timesteps, so it does not accept
    the float timesteps of this sampler.

    Raises:
      ValueError: an option is invalid.
      TypeError: start_step is not a Python int.
    """
    del key  # Deterministic solver.
    check_prediction_type(prediction_type)
    timesteps, sigmas = make_euler_grid(
        schedule,
        num_steps,
        spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        final_sigmas_type=final_sigmas_type,
    )
    _check_start_step(start_step, num_steps)
    x = _euler_initial_state(x_T, sigmas, spacing, start_step)

    def body(x, step_input):
        t, sigma, sigma_next = step_input
        model_output = model_fn(_euler_model_input(x, sigma), _float_timesteps(t, x), cond)
        x_next, _ = euler_step(model_output, x, sigma, sigma_next, prediction_type=prediction_type)
        return x_next.astype(x.dtype), None

    x, _ = jax.lax.scan(body, x, _remaining_grid(timesteps, sigmas, start_step))
    return x.astype(x_T.dtype)


def euler_ancestral_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array,
    cond: Any = None,
    *,
    num_steps: int,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    start_step: int = 0,
) -> jax.Array:
    """Sample with ancestral Euler steps on make_euler_grid's noise levels (final sigma 0).

    Matches diffusers' EulerAncestralDiscreteScheduler, which has no Karras sigmas. The input and
    output conventions are euler_sample's: unit-variance x_T, float32 timesteps [B], model input
    x / sqrt(sigma^2 + 1), and with start_step > 0 an x_T in the variance-exploding scale that is
    not rescaled.

    Raises:
      ValueError: key is None (every step but the last draws noise), or an option is invalid.
      TypeError: start_step is not a Python int.
    """
    if key is None:
        raise ValueError(
            "euler_ancestral_sample draws noise at every step; pass a PRNG key, e.g. jax.random.key(0)."
        )
    check_prediction_type(prediction_type)
    timesteps, sigmas = make_euler_grid(schedule, num_steps, spacing=spacing, steps_offset=steps_offset)
    _check_start_step(start_step, num_steps)
    x = _euler_initial_state(x_T, sigmas, spacing, start_step)

    def body(x, step_input):
        step, t, sigma, sigma_next = step_input
        model_output = model_fn(_euler_model_input(x, sigma), _float_timesteps(t, x), cond)
        noise = _step_noise(key, step, x)
        x_next, _ = euler_ancestral_step(
            model_output, x, sigma, sigma_next, noise, prediction_type=prediction_type
        )
        return x_next.astype(x.dtype), None

    steps = np.arange(num_steps, dtype=np.int32)
    x, _ = jax.lax.scan(body, x, (steps[start_step:], *_remaining_grid(timesteps, sigmas, start_step)))
    return x.astype(x_T.dtype)


# ----------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp_2m": dpmpp_2m_sample,
    "euler": euler_sample,
    "euler_ancestral": euler_ancestral_sample,
}


def sampler_options(name: str) -> tuple[str, ...]:
    """List the keyword-only options that the named sampler accepts."""
    _check_choice("sampler", name, tuple(SAMPLERS))
    parameters = inspect.signature(SAMPLERS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _check_options(name: str, options: dict[str, Any]) -> None:
    """Reject options that are not keyword-only options of the named sampler, naming close matches."""
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


def sample(
    name: str,
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    **options: Any,
) -> jax.Array:
    """Run the sampler registered under name (a key of SAMPLERS) with the given options.

    Raises:
      ValueError: name is unknown.
      TypeError: an option is not one of the sampler's keyword-only options.
    """
    _check_options(name, options)
    return SAMPLERS[name](model_fn, schedule, x_T, key, cond, **options)


# ----------------------------------------------------------------------------------------------
# Starting part-way through the grid (image-to-image).
# ----------------------------------------------------------------------------------------------


def _variance_preserving_levels(
    timesteps: np.ndarray, schedule: NoiseSchedule
) -> tuple[jax.Array, jax.Array]:
    alpha_bar = schedule.alphas_cumprod[timesteps]
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def _ddpm_levels(schedule: NoiseSchedule, settings: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    timesteps = _ddpm_timesteps(
        schedule, settings["num_steps"], settings["spacing"], settings["steps_offset"]
    )
    return _variance_preserving_levels(timesteps, schedule)


def _ddim_levels(schedule: NoiseSchedule, settings: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    timesteps = make_timesteps(
        schedule.num_train_timesteps, settings["num_steps"], settings["spacing"], settings["steps_offset"]
    )
    return _variance_preserving_levels(timesteps, schedule)


def _dpmpp_2m_levels(schedule: NoiseSchedule, settings: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    # The grid's own sigmas, so that Karras levels between training timesteps are matched exactly.
    _, sigmas = make_dpm_solver_grid(
        schedule,
        settings["num_steps"],
        spacing=settings["spacing"],
        steps_offset=settings["steps_offset"],
        use_karras_sigmas=settings["use_karras_sigmas"],
        final_sigmas_type=settings["final_sigmas_type"],
    )
    return _vp_alpha_sigma(sigmas[:-1])


def _euler_levels(schedule: NoiseSchedule, settings: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    _, sigmas = make_euler_grid(
        schedule,
        settings["num_steps"],
        spacing=settings["spacing"],
        steps_offset=settings["steps_offset"],
        use_karras_sigmas=settings["use_karras_sigmas"],
        sigma_min=settings["sigma_min"],
        sigma_max=settings["sigma_max"],
        final_sigmas_type=settings["final_sigmas_type"],
    )
    return jnp.ones_like(sigmas[:-1]), sigmas[:-1]


def _euler_ancestral_levels(schedule: NoiseSchedule, settings: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    _, sigmas = make_euler_grid(
        schedule, settings["num_steps"], spacing=settings["spacing"], steps_offset=settings["steps_offset"]
    )
    return jnp.ones_like(sigmas[:-1]), sigmas[:-1]


# For each sampler: the scales (signal [N], noise [N]) of x0 and unit noise in the sampler's state at
# each grid step, computed from the sampler's options.
_START_LEVELS: dict[str, Callable[[NoiseSchedule, dict[str, Any]], tuple[jax.Array, jax.Array]]] = {
    "ddpm": _ddpm_levels,
    "ddim": _ddim_levels,
    "dpmpp_2m": _dpmpp_2m_levels,
    "euler": _euler_levels,
    "euler_ancestral": _euler_ancestral_levels,
}


def _sampler_settings(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Merge options over the named sampler's keyword-only defaults."""
    parameters = inspect.signature(SAMPLERS[name]).parameters.values()
    settings = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    settings.update(options)
    missing = [option for option, value in settings.items() if value is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"start_sample for sampler {name!r} is missing option(s) {', '.join(missing)}.")
    return settings


def start_sample(
    name: str,
    schedule: NoiseSchedule,
    x0: jax.Array,
    noise: jax.Array,
    *,
    start_step: int,
    **options: Any,
) -> jax.Array:
    """Noise clean samples x0 to grid step start_step of the named sampler, returning its x_T.

    Pass the result as x_T to the same sampler with the same options and start_step. For start_step
    > 0 this is what diffusers' add_noise returns at the first timestep an img2img pipeline runs:
      ddpm, ddim:       sqrt(ab_t) x0 + sqrt(1 - ab_t) noise at t = timesteps[start_step].
      dpmpp_2m:         alpha x0 + sigma_vp noise at the grid level sigmas[start_step], which is
                        the same for integer grids and also covers Karras levels.
      euler, euler_ancestral: x0 + sigmas[start_step] noise, in the variance-exploding scale.
    For start_step == 0 it returns noise unchanged, because the samplers then start from unit noise
    and scale it themselves, so start_step == 0 reproduces plain sampling and x0 has no effect.
    NOTE: diffusers' img2img pipelines at strength 1 (start_step 0) still noise the image to the
    first timestep, which keeps sqrt(ab_t) x0 (about 0.07 x0 for Stable Diffusion's schedule).

    x0 and noise have the same shape [B, ...]. options are the sampler's keyword-only options (those
    that do not set the grid, such as eta, are accepted and unused). The result has x0 and noise's
    promoted dtype.

    Raises:
      ValueError: name is unknown, x0 and noise differ in shape, start_step is outside
        [0, num_steps), or an option is invalid.
      TypeError: an option is unknown or missing (num_steps for most samplers), or start_step is
        not a Python int.
    """
    _check_options(name, options)
    x0 = jnp.asarray(x0)
    noise = jnp.asarray(noise)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {x0.shape} but noise has shape {noise.shape}; pass equal shapes.")
    signal_scales, noise_scales = _START_LEVELS[name](schedule, _sampler_settings(name, options))
    _check_start_step(start_step, signal_scales.shape[0])

    dtype = jnp.result_type(x0, noise)
    if start_step == 0:
        return noise.astype(dtype)
    state_dtype = jnp.promote_types(dtype, jnp.float32)
    signal_scale = signal_scales[start_step].astype(state_dtype)
    noise_scale = noise_scales[start_step].astype(state_dtype)
    x_start = signal_scale * x0.astype(state_dtype) + noise_scale * noise.astype(state_dtype)
    return x_start.astype(dtype)
