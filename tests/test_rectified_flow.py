"""Tests for jaxgen.diffusion.rectified_flow: forward process, timestep shift and sampling, loss, Euler sampler."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.diffusion import (
    cfg_model_fn,
    resolution_shift,
    rf_add_noise,
    rf_euler_sample,
    rf_euler_step,
    rf_loss,
    rf_sample_timesteps,
    rf_timestep_grid,
    rf_velocity_target,
    shift_timesteps,
)

SHAPE = (3, 2, 4, 4, 2)  # [B, T, H, W, C], a tiny video batch.
BATCH = SHAPE[0]
# float32 results against float64 references or exact identities on values of order 1.
ATOL = 1e-5
RTOL = 1e-5


def normal(seed, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def broadcast(values, ndim):
    """Reshape per-example values [B] to broadcast against a sample of ndim axes."""
    return values.reshape(values.shape + (1,) * (ndim - 1))


def toy_velocity(x, model_time, cond, xp=jnp):
    """A fixed velocity field that depends on x, the model's time input (in [0, 1000]) and cond [B]."""
    time = broadcast(model_time / 1000.0, x.ndim)
    return -0.4 * x * xp.cos(time) + 0.3 * xp.sin(3.0 * time) + broadcast(cond, x.ndim)


def opensora_reference_sample(x_T, cond, num_steps, shift, start_step=0):
    """Open-Sora 1.2's RFLOW sampling loop in float64 NumPy, written from its published algorithm.

    Timesteps are in [0, 1000]; the model predicts x_0 - eps, and each step adds
    velocity * (tau_i - tau_{i+1}) / 1000, with the last step going to 0.
    """
    z = np.asarray(x_T, np.float64)
    cond = np.asarray(cond, np.float64)
    shift = np.broadcast_to(np.asarray(shift, np.float64), (z.shape[0],))
    taus = []
    for i in range(num_steps):
        fraction = 1.0 - i / num_steps
        taus.append(shift * fraction / (1.0 + (shift - 1.0) * fraction) * 1000.0)
    taus.append(np.zeros_like(shift))
    for i in range(start_step, num_steps):
        velocity = toy_velocity(z, taus[i], cond, xp=np)
        z = z + velocity * broadcast((taus[i] - taus[i + 1]) / 1000.0, z.ndim)
    return z


# ----------------------------------------------------------------------------------------------
# Forward process, velocity target and loss.
# ----------------------------------------------------------------------------------------------


def test_add_noise_endpoints():
    x0, noise = normal(0), normal(1)
    np.testing.assert_array_equal(np.asarray(rf_add_noise(x0, noise, 0.0)), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(rf_add_noise(x0, noise, 1.0)), np.asarray(noise))


def test_add_noise_per_example_times():
    x0, noise = normal(0), normal(1)
    t = jnp.array([0.0, 0.25, 0.9])
    expected = (1.0 - np.asarray(t))[:, None, None, None, None] * np.asarray(x0) + np.asarray(t)[
        :, None, None, None, None
    ] * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(rf_add_noise(x0, noise, t)), expected, atol=1e-6, rtol=1e-6)


def test_add_noise_frame_mask_keeps_clean_frames():
    x0, noise = normal(0), normal(1)
    mask = jnp.array([[True, False], [False, False], [True, True]])  # [B, T]
    x_t = np.asarray(rf_add_noise(x0, noise, 0.5, mask=mask))
    noised = np.asarray(rf_add_noise(x0, noise, 0.5))
    for b in range(BATCH):
        for frame in range(SHAPE[1]):
            expected = noised[b, frame] if mask[b, frame] else np.asarray(x0)[b, frame]
            np.testing.assert_array_equal(x_t[b, frame], expected)


@pytest.mark.parametrize("convention, sign", [("noise_minus_data", 1.0), ("data_minus_noise", -1.0)])
def test_velocity_target_is_path_derivative(convention, sign):
    x0, noise = normal(0), normal(1)
    t = jnp.array([0.1, 0.5, 0.8])
    _, dx_dt = jax.jvp(lambda time: rf_add_noise(x0, noise, time), (t,), (jnp.ones_like(t),))
    target = rf_velocity_target(x0, noise, velocity_convention=convention)
    np.testing.assert_allclose(np.asarray(target), sign * np.asarray(dx_dt), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(target), sign * np.asarray(noise - x0), atol=0, rtol=0)


def test_loss_is_mean_squared_velocity_error():
    x0, noise = normal(0), normal(1)
    offsets = jnp.array([0.0, 0.5, -2.0])
    output = rf_velocity_target(x0, noise) + offsets[:, None, None, None, None]
    np.testing.assert_allclose(np.asarray(rf_loss(output, x0, noise)), np.asarray(offsets) ** 2, atol=1e-6)
    wrong_sign = rf_loss(output, x0, noise, velocity_convention="data_minus_noise")
    expected = np.mean(((np.asarray(output) - np.asarray(x0 - noise)) ** 2).reshape(BATCH, -1), axis=1)
    np.testing.assert_allclose(np.asarray(wrong_sign), expected, rtol=1e-6)


def test_loss_frame_mask_and_weights():
    x0, noise, output = normal(0), normal(1), normal(2)
    mask = jnp.array([[True, False], [False, False], [True, True]])  # [B, T]
    weights = jnp.array([2.0, 3.0, 0.5])
    error = (np.asarray(output) - np.asarray(noise - x0)) ** 2
    expected = np.array(
        [
            error[0, 0].mean(),
            0.0,  # No frame of example 1 is noised, so it has no loss.
            error[2].mean(),
        ]
    ) * np.asarray(weights)
    loss = rf_loss(output, x0, noise, mask=mask, weights=weights)
    np.testing.assert_allclose(np.asarray(loss), expected, atol=1e-6, rtol=1e-6)


def test_loss_full_shape_mask_matches_frame_mask():
    x0, noise, output = normal(0), normal(1), normal(2)
    frame_mask = jnp.array([[True, False], [True, True], [False, True]])
    full_mask = jnp.broadcast_to(frame_mask[:, :, None, None, None], SHAPE)
    np.testing.assert_allclose(
        np.asarray(rf_loss(output, x0, noise, mask=full_mask)),
        np.asarray(rf_loss(output, x0, noise, mask=frame_mask)),
        atol=1e-7,
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# Timestep shift and training timesteps.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, shift, expected",
    [
        (0.5, 3.0, 1.5 / 2.0),  # 3 * 0.5 / (1 + 2 * 0.5)
        (0.25, 2.0, 0.5 / 1.25),  # 2 * 0.25 / (1 + 1 * 0.25)
        (0.5, 0.5, 0.25 / 0.75),  # 0.5 * 0.5 / (1 - 0.5 * 0.5)
        (0.0, 7.0, 0.0),
        (1.0, 7.0, 1.0),
    ],
)
def test_shift_timesteps_hand_values(t, shift, expected):
    assert float(shift_timesteps(t, shift)) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_shift_timesteps_identity_at_shift_one():
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_array_equal(np.asarray(shift_timesteps(t, 1.0)), np.asarray(t))


@pytest.mark.parametrize(
    "height, width, num_frames, expected",
    [
        (512, 512, 1, 1.0),  # Base size: no shift.
        (256, 256, 1, 0.5),  # sqrt(256 * 256 / 512^2)
        (512, 512, 17, math.sqrt(5.0)),  # 17 frames -> 5 latent frames.
        # 720p, 51 frames: sqrt(720 * 1280 / 512^2) = 1.875 and 51 // 17 * 5 = 15 latent frames.
        (720, 1280, 51, 1.875 * math.sqrt(15.0)),
        (480, 854, 102, math.sqrt(480 * 854 / 512**2) * math.sqrt(30.0)),
    ],
)
def test_resolution_shift_hand_values(height, width, num_frames, expected):
    assert float(resolution_shift(height, width, num_frames)) == pytest.approx(expected, rel=1e-6)


def test_resolution_shift_per_example_and_scale():
    shifts = resolution_shift(jnp.array([512, 720]), jnp.array([512, 1280]), jnp.array([1, 51]), scale=2.0)
    np.testing.assert_allclose(np.asarray(shifts), [2.0, 2.0 * 1.875 * math.sqrt(15.0)], rtol=1e-6)


def test_resolution_shift_identity_at_base_size():
    t = jnp.linspace(0.0, 1.0, 11)
    shifted = shift_timesteps(t, resolution_shift(512, 512, 1))
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(t), atol=1e-7, rtol=0)


def test_logit_normal_timesteps_have_set_logit_mean():
    num_samples, mean, std = 20000, 0.5, 0.8
    t = np.asarray(rf_sample_timesteps(jax.random.key(3), num_samples, method="logit_normal", mean=mean, std=std))
    assert t.dtype == np.float32
    assert np.all((t > 0.0) & (t < 1.0))
    logits = np.log(t) - np.log1p(-t)
    # Four standard errors of the sample mean and of the sample standard deviation.
    assert abs(logits.mean() - mean) < 4 * std / math.sqrt(num_samples)
    assert abs(logits.std() - std) < 4 * std / math.sqrt(2 * num_samples)


def test_uniform_timesteps_cover_unit_interval():
    num_samples = 20000
    t = np.asarray(rf_sample_timesteps(jax.random.key(4), num_samples))
    assert np.all((t >= 0.0) & (t < 1.0))
    # Four standard errors of the mean of U[0, 1), whose standard deviation is 1 / sqrt(12).
    assert abs(t.mean() - 0.5) < 4 / math.sqrt(12 * num_samples)


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
def test_sampled_timesteps_apply_shift_after_drawing(method):
    key = jax.random.key(5)
    shift = jnp.array([1.0, 3.0, 7.26])
    plain = rf_sample_timesteps(key, BATCH, method=method)
    shifted = rf_sample_timesteps(key, BATCH, method=method, shift=shift)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(shift_timesteps(plain, shift)), rtol=1e-6)
    assert float(jnp.min(shifted[1:] - plain[1:])) > 0.0  # shift > 1 moves every timestep towards noise.


# ----------------------------------------------------------------------------------------------
# Euler sampler.
# ----------------------------------------------------------------------------------------------


def test_timestep_grid_endpoints_and_shift():
    grid = rf_timestep_grid(4, jnp.array([1.0, 3.0]))
    assert grid.shape == (5, 2)
    np.testing.assert_allclose(np.asarray(grid[:, 0]), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(grid[2, 1]), 0.75, rtol=1e-6)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert float(grid[0, 1]) == 1.0
    assert float(grid[-1, 1]) == 0.0


@pytest.mark.parametrize("convention, sign", [("noise_minus_data", 1.0), ("data_minus_noise", -1.0)])
@pytest.mark.parametrize("shift", [1.0, 3.0, "per_example"])
def test_exact_velocity_lands_on_single_point(convention, sign, shift):
    # For data concentrated at x0, x_t = (1 - t) x0 + t eps gives eps - x0 = (x_t - x0) / t exactly.
    x0 = normal(10)
    if shift == "per_example":
        shift = jnp.array([0.5, 1.0, 7.26])

    def exact_velocity(x, model_time, cond):
        del cond
        t = broadcast(model_time / 1000.0, x.ndim)
        return sign * (x - x0) / t

    for seed in (11, 12):
        x_T = 3.0 * normal(seed)
        result = rf_euler_sample(
            exact_velocity, x_T, None, num_steps=7, shift=shift, velocity_convention=convention
        )
        np.testing.assert_allclose(np.asarray(result), np.asarray(x0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, "per_example"])
def test_sampler_matches_opensora_loop(shift):
    if shift == "per_example":
        shift = np.array([1.0, 2.2, 7.26])
    x_T, cond = normal(20), jnp.array([0.1, -0.2, 0.3])
    result = rf_euler_sample(
        toy_velocity, x_T, None, cond, num_steps=30, shift=shift, velocity_convention="data_minus_noise"
    )
    expected = opensora_reference_sample(x_T, cond, 30, shift)
    np.testing.assert_allclose(np.asarray(result), expected, atol=ATOL, rtol=RTOL)


def test_sampler_start_step_matches_loop_tail():
    x_T, cond, shift = normal(21), jnp.array([0.1, -0.2, 0.3]), 2.5
    result = rf_euler_sample(
        toy_velocity, x_T, None, cond, num_steps=10, shift=shift, velocity_convention="data_minus_noise", start_step=4
    )
    expected = opensora_reference_sample(x_T, cond, 10, shift, start_step=4)
    np.testing.assert_allclose(np.asarray(result), expected, atol=ATOL, rtol=RTOL)
    full = rf_euler_sample(toy_velocity, x_T, None, cond, num_steps=10, shift=shift)
    assert float(jnp.max(jnp.abs(full - result))) > 1e-2


def test_euler_step_signs():
    x, velocity = normal(30), normal(31)
    t, t_next = jnp.array([1.0, 0.5, 0.2]), jnp.array([0.5, 0.2, 0.0])
    dt = np.asarray(t_next - t)[:, None, None, None, None]
    forward = rf_euler_step(velocity, x, t, t_next)
    backward = rf_euler_step(velocity, x, t, t_next, velocity_convention="data_minus_noise")
    np.testing.assert_allclose(np.asarray(forward), np.asarray(x) + dt * np.asarray(velocity), atol=1e-6)
    np.testing.assert_allclose(np.asarray(backward), np.asarray(x) - dt * np.asarray(velocity), atol=1e-6)


def test_cfg_one_step_equals_formula():
    scale = 4.5
    x_T, cond = normal(40), jnp.array([0.2, -0.5, 1.0])
    guided = cfg_model_fn(toy_velocity, scale, 0.0)
    result = rf_euler_sample(guided, x_T, None, cond, num_steps=1)

    # One step from t = 1 to 0 with the model at time 1000: x_0 = x_T - (v_u + s (v_c - v_u)).
    x = np.asarray(x_T, np.float64)
    times = np.full((BATCH,), 1000.0)
    v_cond = toy_velocity(x, times, np.asarray(cond, np.float64), xp=np)
    v_uncond = toy_velocity(x, times, np.zeros(BATCH), xp=np)
    expected = x - (v_uncond + scale * (v_cond - v_uncond))
    np.testing.assert_allclose(np.asarray(result), expected, atol=ATOL, rtol=RTOL)


def test_cfg_many_steps_equals_combined_model():
    scale, null = 3.0, -0.25
    x_T, cond = normal(41), jnp.array([0.2, -0.5, 1.0])

    def combined(x, model_time, cond):
        v_uncond = toy_velocity(x, model_time, jnp.full_like(cond, null))
        return v_uncond + scale * (toy_velocity(x, model_time, cond) - v_uncond)

    options = dict(num_steps=12, shift=2.0)
    guided = rf_euler_sample(cfg_model_fn(toy_velocity, scale, null), x_T, None, cond, **options)
    reference = rf_euler_sample(combined, x_T, None, cond, **options)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(reference), atol=1e-6, rtol=1e-6)
    unguided = rf_euler_sample(toy_velocity, x_T, None, cond, **options)
    assert float(jnp.max(jnp.abs(guided - unguided))) > 1e-2


def test_jitted_sampler_compiles_once():
    traces = {"count": 0}

    def counting_model(x, model_time, cond):
        traces["count"] += 1
        return toy_velocity(x, model_time, cond)

    run = jax.jit(functools.partial(rf_euler_sample, counting_model, num_steps=8))
    first = run(normal(50), None, jnp.zeros((BATCH,)), shift=2.0)
    second = run(normal(51), None, jnp.ones((BATCH,)), shift=3.0)
    assert traces["count"] == 1
    assert run._cache_size() == 1
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3

    jaxpr = jax.make_jaxpr(functools.partial(rf_euler_sample, toy_velocity, num_steps=8))(
        normal(50), None, jnp.zeros((BATCH,))
    )
    assert [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns].count("scan") == 1


def test_sampler_keeps_dtype():
    x_T = normal(60).astype(jnp.bfloat16)
    result = rf_euler_sample(toy_velocity, x_T, None, jnp.zeros((BATCH,)), num_steps=3)
    assert result.dtype == jnp.bfloat16


def test_model_receives_scaled_float_times():
    seen = []

    def recording_model(x, model_time, cond):
        seen.append((model_time.shape, model_time.dtype))
        return jnp.zeros_like(x)

    rf_euler_sample(recording_model, normal(61), None, num_steps=2, timestep_scale=1.0)
    assert seen == [((BATCH,), jnp.float32)]

    # timestep_scale=1 passes t in [0, 1]. With model v = t, the sample moves by sum((t_next - t) t).
    def time_as_velocity(x, model_time, cond):
        return jnp.broadcast_to(broadcast(model_time, x.ndim), x.shape)

    result = rf_euler_sample(time_as_velocity, jnp.zeros(SHAPE), None, num_steps=2, timestep_scale=1.0)
    np.testing.assert_allclose(np.asarray(result), -(0.5 * 1.0 + 0.5 * 0.5), atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Option errors.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"num_steps": 0}, ValueError, "num_steps must be a Python int of at least 1"),
        ({"num_steps": 2.0}, ValueError, "num_steps must be a Python int"),
        ({"num_steps": 4, "shift": 0.0}, ValueError, "shift must be positive and finite, got 0.0"),
        ({"num_steps": 4, "shift": jnp.ones((2,))}, ValueError, r"shift has shape \(2,\)"),
        ({"num_steps": 4, "timestep_scale": -1.0}, ValueError, "timestep_scale must be positive"),
        ({"num_steps": 4, "velocity_convention": "x0"}, ValueError, "Unknown velocity_convention 'x0'"),
        ({"num_steps": 4, "start_step": 4}, ValueError, r"start_step=4 is outside \[0, 4\)"),
        ({"num_steps": 4, "start_step": 1.0}, TypeError, "start_step must be a Python int"),
    ],
)
def test_sampler_option_errors(options, error, message):
    with pytest.raises(error, match=message):
        rf_euler_sample(toy_velocity, normal(70), None, jnp.zeros((BATCH,)), **options)


def test_timestep_sampling_errors():
    with pytest.raises(ValueError, match="Unknown method 'logit-normal'"):
        rf_sample_timesteps(jax.random.key(0), 4, method="logit-normal")
    with pytest.raises(ValueError, match="std must be positive and finite, got -1.0"):
        rf_sample_timesteps(jax.random.key(0), 4, method="logit_normal", std=-1.0)
    with pytest.raises(ValueError, match=r"shift has shape \(3,\)"):
        rf_sample_timesteps(jax.random.key(0), 4, shift=jnp.ones((3,)))


def test_resolution_shift_errors():
    with pytest.raises(ValueError, match="num_frames=16 gives 0 latent frames"):
        resolution_shift(512, 512, 16)
    with pytest.raises(ValueError, match="height must be positive and finite, got 0.0"):
        resolution_shift(0, 512, 1)


def test_mask_and_shape_errors():
    x0, noise = normal(0), normal(1)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\)"):
        rf_add_noise(x0, noise, 0.5, mask=jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match=r"noise has shape \(3, 2\)"):
        rf_add_noise(x0, noise[:, :, 0, 0, 0], 0.5)
    with pytest.raises(ValueError, match=r"model_output has shape \(3, 4, 4, 4, 2\)"):
        rf_loss(jnp.zeros((3, 4, 4, 4, 2)), x0, noise)
    with pytest.raises(ValueError, match=r"weights has shape \(2,\)"):
        rf_loss(x0, x0, noise, weights=jnp.ones((2,)))
