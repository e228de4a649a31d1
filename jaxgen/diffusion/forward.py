"""Forward (noising) process, conversions between prediction types, and the training loss.

Shapes: B is the batch size; x_0, x_t and noise are [B, ...] (images [B, H, W, C]); t is int32 [B].
Symbols: alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t) (see schedules.py), so
x_t = alpha_t * x_0 + sigma_t * eps, and the velocity (Salimans & Ho 2022) is
v = alpha_t * eps - sigma_t * x_0.
A model predicts one of eps ("epsilon"), v ("v_prediction") or x_0 ("sample").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    """Raise ValueError unless prediction_type is one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}."
        )


def broadcast_to_sample(coefficient: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a scalar or per-example [B] coefficient so that it broadcasts against x [B, ...]."""
    coefficient = jnp.asarray(coefficient)
    if coefficient.ndim == 0:
        return coefficient
    return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))


def convert_prediction(
    model_output: jax.Array,
    x_t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    *,
    prediction_type: str,
) -> tuple[jax.Array, jax.Array]:
    """Convert a model output into its (x_0, eps) estimates at noise level (alpha, sigma).

    alpha and sigma are scalars or arrays that broadcast against x_t (see broadcast_to_sample).
    With "sample" the eps estimate divides by sigma, so it is undefined at sigma == 0; with
    "epsilon" the x_0 estimate divides by alpha, so it is undefined at alpha == 0 (zero terminal SNR).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * model_output
        eps = alpha * model_output + sigma * x_t
    else:
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def _alpha_sigma_like(schedule: NoiseSchedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    alpha, sigma = schedule.alpha_sigma(t)
    return broadcast_to_sample(alpha, x), broadcast_to_sample(sigma, x)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with the given noise (Ho et al. 2020)."""
    alpha, sigma = _alpha_sigma_like(schedule, t, x0)
    return alpha * x0 + sigma * noise


def predict_x0(
    schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, *, prediction_type: str
) -> jax.Array:
    """Estimate x_0 from a model output of the given prediction type at timesteps t."""
    alpha, sigma = _alpha_sigma_like(schedule, t, x_t)
    return convert_prediction(model_output, x_t, alpha, sigma, prediction_type=prediction_type)[0]


def predict_eps(
    schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, *, prediction_type: str
) -> jax.Array:
    """Estimate eps from a model output of the given prediction type at timesteps t."""
    alpha, sigma = _alpha_sigma_like(schedule, t, x_t)
    return convert_prediction(model_output, x_t, alpha, sigma, prediction_type=prediction_type)[1]


def velocity_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Compute the v-prediction target v = alpha_t * eps - sigma_t * x_0 (Salimans & Ho 2022)."""
    alpha, sigma = _alpha_sigma_like(schedule, t, x0)
    return alpha * noise - sigma * x0


def min_snr_weight(snr: jax.Array, gamma: float, *, prediction_type: str) -> jax.Array:
    """Compute the min-SNR-gamma loss weight (Hang et al. 2023) for a loss on the given prediction type.

    The weight on the x_0 error is min(SNR, gamma). An eps error equals the x_0 error times SNR, and a
    v error equals it times SNR + 1, so those losses get min(SNR, gamma) / SNR and
    min(SNR, gamma) / (SNR + 1). The eps weight is written gamma / max(SNR, gamma), which equals
    min(SNR, gamma) / SNR and stays finite at SNR == 0.
    """
    check_prediction_type(prediction_type)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return gamma / jnp.maximum(snr, gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    *,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> jax.Array:
    """Compute the per-example mean squared error [B] of a diffusion model's output.

    The target is noise for "epsilon", velocity_target for "v_prediction" and x0 for "sample"; the
    squared error is averaged over all axes but the batch axis. With min_snr_gamma, each example is
    weighted by min_snr_weight at its timestep. Average the result over the batch for a scalar loss.

    Raises:
      ValueError: prediction_type is unknown or min_snr_gamma is not positive.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = velocity_target(schedule, x0, noise, t)
    else:
        target = x0

    error = (model_output.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1)

    if min_snr_gamma is None:
        return per_example
    if isinstance(min_snr_gamma, (int, float)) and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive (5.0 is the usual value), got {min_snr_gamma}.")
    weight = min_snr_weight(schedule.snr[t], min_snr_gamma, prediction_type=prediction_type)
    return weight * per_example
