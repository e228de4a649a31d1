"""Tests for jaxgen.diffusion.forward: q_sample, prediction conversions and diffusion_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jaxgen.diffusion import (
    diffusion_loss,
    make_schedule,
    min_snr_weight,
    predict_eps,
    predict_x0,
    q_sample,
    velocity_target,
)

ATOL = 1e-5
RTOL = 1e-5
SHAPE = (4, 3, 3, 2)  # [B, H, W, C]


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), dtype=jnp.float32)
    noise = jnp.asarray(rng.standard_normal(SHAPE), dtype=jnp.float32)
    t = jnp.array([0, 10, 500, 999], dtype=jnp.int32)
    return x0, noise, t


def _coefficients(schedule, t):
    alpha_bar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[np.asarray(t)]
    return np.sqrt(alpha_bar)[:, None, None, None], np.sqrt(1.0 - alpha_bar)[:, None, None, None]


def test_q_sample_closed_form(schedule, batch):
    x0, noise, t = batch
    alpha, sigma = _coefficients(schedule, t)
    expected = alpha * np.asarray(x0) + sigma * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(q_sample(schedule, x0, t, noise)), expected, rtol=RTOL, atol=ATOL)


def test_q_sample_and_velocity_match_diffusers(schedule, batch):
    x0, noise, t = batch
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0_torch = torch.tensor(np.asarray(x0))
    noise_torch = torch.tensor(np.asarray(noise))
    t_torch = torch.tensor(np.asarray(t), dtype=torch.long)
    np.testing.assert_allclose(
        np.asarray(q_sample(schedule, x0, t, noise)),
        reference.add_noise(x0_torch, noise_torch, t_torch).numpy(),
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        np.asarray(velocity_target(schedule, x0, noise, t)),
        reference.get_velocity(x0_torch, noise_torch, t_torch).numpy(),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_perfect_prediction_recovers_x0_and_eps(schedule, batch, prediction_type):
    x0, noise, t = batch
    x_t = q_sample(schedule, x0, t, noise)
    target = {"epsilon": noise, "v_prediction": velocity_target(schedule, x0, noise, t), "sample": x0}
    output = target[prediction_type]
    # Converting eps to x0 divides by alpha_999 = 0.0064 and x0 to eps divides by sigma_0 = 0.01, which
    # turns float32 rounding (1e-7) into errors near 1e-5.
    np.testing.assert_allclose(
        np.asarray(predict_x0(schedule, x_t, t, output, prediction_type=prediction_type)),
        np.asarray(x0),
        rtol=0,
        atol=3e-5,
    )
    np.testing.assert_allclose(
        np.asarray(predict_eps(schedule, x_t, t, output, prediction_type=prediction_type)),
        np.asarray(noise),
        rtol=0,
        atol=3e-5,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_per_example_mse(schedule, batch, prediction_type):
    x0, noise, t = batch
    target = {"epsilon": noise, "v_prediction": velocity_target(schedule, x0, noise, t), "sample": x0}
    output = np.asarray(target[prediction_type]) + 0.1 * np.arange(4, dtype=np.float32)[:, None, None, None]
    loss = diffusion_loss(schedule, jnp.asarray(output), x0, noise, t, prediction_type=prediction_type)
    assert loss.shape == (4,)
    expected = (0.1 * np.arange(4)) ** 2
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "prediction_type, weight_fn",
    [
        ("epsilon", lambda snr, g: np.minimum(snr, g) / snr),
        ("v_prediction", lambda snr, g: np.minimum(snr, g) / (snr + 1.0)),
        ("sample", lambda snr, g: np.minimum(snr, g)),
    ],
)
def test_min_snr_weighting(schedule, batch, prediction_type, weight_fn):
    x0, noise, t = batch
    gamma = 5.0
    output = jnp.zeros(SHAPE)
    plain = diffusion_loss(schedule, output, x0, noise, t, prediction_type=prediction_type)
    weighted = diffusion_loss(
        schedule, output, x0, noise, t, prediction_type=prediction_type, min_snr_gamma=gamma
    )
    snr = np.asarray(schedule.snr, dtype=np.float64)[np.asarray(t)]
    np.testing.assert_allclose(
        np.asarray(weighted), weight_fn(snr, gamma) * np.asarray(plain), rtol=1e-4, atol=1e-7
    )


def test_min_snr_eps_weight_finite_at_zero_snr():
    weight = min_snr_weight(jnp.array([0.0, 1.0, 10.0]), 5.0, prediction_type="epsilon")
    np.testing.assert_allclose(np.asarray(weight), [1.0, 1.0, 0.5], rtol=1e-6, atol=0)


def test_loss_is_jittable_and_differentiable(schedule, batch):
    x0, noise, t = batch

    def mean_loss(output):
        per_example = diffusion_loss(
            schedule, output, x0, noise, t, prediction_type="v_prediction", min_snr_gamma=5.0
        )
        return jnp.mean(per_example)

    grad = jax.jit(jax.grad(mean_loss))(jnp.zeros(SHAPE))
    assert grad.shape == SHAPE
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_rejects_unknown_prediction_type(schedule, batch):
    x0, noise, t = batch
    with pytest.raises(ValueError, match="v_prediction"):
        diffusion_loss(schedule, x0, x0, noise, t, prediction_type="velocity")
    with pytest.raises(ValueError, match="'eps'"):
        predict_x0(schedule, x0, t, x0, prediction_type="eps")


def test_rejects_nonpositive_gamma(schedule, batch):
    x0, noise, t = batch
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(schedule, x0, x0, noise, t, min_snr_gamma=0.0)
