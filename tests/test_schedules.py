"""Tests for jaxgen.diffusion.schedules: closed forms, zero terminal SNR and parity with diffusers."""

import math

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jaxgen.diffusion import SCHEDULE_KINDS, NoiseSchedule, make_schedule

# float32 storage of values computed in float64; diffusers computes them in float32 torch.
SCHEDULE_ATOL = 1e-6
SCHEDULE_RTOL = 1e-5


def test_linear_betas_closed_form():
    schedule = make_schedule("linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    betas = np.asarray(schedule.betas)
    expected = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    np.testing.assert_allclose(betas, expected, rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL)
    assert betas.dtype == np.float32


def test_scaled_linear_betas_closed_form():
    schedule = make_schedule("scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    roots = math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * np.arange(1000) / 999
    np.testing.assert_allclose(np.asarray(schedule.betas), roots**2, rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL)


def test_cosine_alphas_cumprod_closed_form():
    num_train_timesteps = 1000
    schedule = make_schedule("squaredcos_cap_v2", num_train_timesteps=num_train_timesteps)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # Uncapped betas give alpha_bar_t = f((t + 1) / T) / f(0); only the last few betas hit the 0.999 cap.
    expected = np.array([f((t + 1) / num_train_timesteps) / f(0.0) for t in range(num_train_timesteps)])
    uncapped = slice(0, 990)
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod)[uncapped], expected[uncapped], rtol=1e-4, atol=SCHEDULE_ATOL
    )
    assert float(np.max(schedule.betas)) == pytest.approx(0.999, abs=1e-7)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_derived_quantities(kind):
    schedule = make_schedule(kind, num_train_timesteps=100)
    betas = np.asarray(schedule.betas, dtype=np.float64)
    alphas_cumprod = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(schedule.alphas), 1.0 - betas, rtol=0, atol=SCHEDULE_ATOL)
    np.testing.assert_allclose(
        alphas_cumprod, np.cumprod(1.0 - betas), rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL
    )
    np.testing.assert_allclose(
        np.asarray(schedule.sqrt_alphas_cumprod),
        np.sqrt(alphas_cumprod),
        rtol=SCHEDULE_RTOL,
        atol=SCHEDULE_ATOL,
    )
    np.testing.assert_allclose(
        np.asarray(schedule.sqrt_one_minus_alphas_cumprod),
        np.sqrt(1.0 - alphas_cumprod),
        rtol=SCHEDULE_RTOL,
        atol=SCHEDULE_ATOL,
    )
    np.testing.assert_allclose(
        np.asarray(schedule.snr), alphas_cumprod / (1.0 - alphas_cumprod), rtol=1e-4, atol=SCHEDULE_ATOL
    )
    assert schedule.num_train_timesteps == 100


def test_alpha_sigma_gathers_timesteps():
    schedule = make_schedule("linear", num_train_timesteps=50)
    t = np.array([0, 7, 49], dtype=np.int32)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(
        np.asarray(alpha), np.sqrt(np.asarray(schedule.alphas_cumprod)[t]), rtol=SCHEDULE_RTOL, atol=0
    )
    np.testing.assert_allclose(
        np.asarray(sigma), np.sqrt(1.0 - np.asarray(schedule.alphas_cumprod)[t]), rtol=SCHEDULE_RTOL, atol=0
    )


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_zero_terminal_snr(kind):
    plain = make_schedule(kind)
    rescaled = make_schedule(kind, rescale_zero_terminal_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) == 0.0
    assert float(rescaled.snr[-1]) == 0.0
    np.testing.assert_allclose(
        float(rescaled.alphas_cumprod[0]), float(plain.alphas_cumprod[0]), rtol=SCHEDULE_RTOL, atol=0
    )
    assert np.all(np.diff(np.asarray(rescaled.alphas_cumprod)) < 0)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("rescale", [False, True])
def test_matches_diffusers(kind, rescale):
    beta_start, beta_end = (0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02)
    schedule = make_schedule(
        kind,
        num_train_timesteps=1000,
        beta_start=beta_start,
        beta_end=beta_end,
        rescale_zero_terminal_snr=rescale,
    )
    reference = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=kind,
        rescale_betas_zero_snr=rescale,
    )
    # diffusers rescales in float32, and recovering betas from ratios of small alpha_bar values
    # amplifies its rounding (up to 2e-5 relative near t = T - 1); jaxgen rescales in float64.
    betas_rtol = 1e-4 if rescale else SCHEDULE_RTOL
    np.testing.assert_allclose(
        np.asarray(schedule.betas), reference.betas.numpy(), rtol=betas_rtol, atol=SCHEDULE_ATOL
    )
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod),
        reference.alphas_cumprod.numpy(),
        rtol=SCHEDULE_RTOL,
        atol=SCHEDULE_ATOL,
    )
    assert reference.alphas_cumprod.dtype == torch.float32


def test_schedule_is_pytree():
    schedule = make_schedule("linear", num_train_timesteps=10)
    leaves = jax.tree.leaves(schedule)
    assert len(leaves) == 3
    doubled = jax.tree.map(lambda a: 2 * a, schedule)
    assert isinstance(doubled, NoiseSchedule)
    np.testing.assert_allclose(np.asarray(doubled.betas), 2 * np.asarray(schedule.betas), rtol=1e-7, atol=0)


def test_unknown_kind_names_valid_kinds():
    with pytest.raises(ValueError, match="squaredcos_cap_v2") as info:
        make_schedule("cosine")
    assert "'cosine'" in str(info.value)


def test_rejects_empty_schedule():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_schedule("linear", num_train_timesteps=0)
