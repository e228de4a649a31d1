"""Tests for jaxgen.diffusion.samplers: timestep grids, single steps and whole loops against diffusers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from jaxgen.diffusion import (
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dpmpp_2m_init,
    dpmpp_2m_sample,
    dpmpp_2m_step,
    make_dpm_solver_grid,
    make_schedule,
    make_timesteps,
    sample,
    sampler_options,
)
from jaxgen.diffusion.samplers import (
    SAMPLERS,
    euler_ancestral_sample,
    euler_ancestral_step,
    euler_init_noise_sigma,
    euler_sample,
    euler_step,
    make_euler_grid,
    start_sample,
)

T = 1000
SHAPE = (2, 3, 3, 2)  # [B, H, W, C]; the schedulers are elementwise, so the layout does not matter.
# One float32 step against diffusers' float32 step.
STEP_ATOL = 1e-5
STEP_RTOL = 1e-5
# Whole loops of 20 to 1000 steps. Measured differences were below 6e-6 (DDIM-20 on values up to 19,
# DDPM-1000 on values below 1), so the tolerance leaves room for other CPUs and XLA versions.
LOOP_ATOL = 1e-4
LOOP_RTOL = 1e-4


# A fixed model that is linear in x and t, written once for torch (diffusers) and once for JAX.
def dummy_model_jax(x, t, cond=None):
    del cond
    return 0.6 * x + 0.4 * (t.astype(jnp.float32) / T)[:, None, None, None] - 0.05


def dummy_model_torch(x, t):
    return 0.6 * x + 0.4 * (float(t) / T) - 0.05


def to_torch(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def initial_noise(seed=0, shape=SHAPE):
    # NumPy draws need no XLA compile, which keeps the tests fast.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=jnp.float32)


def make_reference(scheduler_class, schedule, **config):
    """Build a diffusers scheduler on exactly this schedule's float32 values.

    diffusers computes alpha_bar by a float32 cumprod and jaxgen in float64, a difference of about
    1e-7 that steps such as DDPM's (1 - ab_t / ab_prev) amplify near t = 0; test_schedules.py covers
    it. Sharing the values makes these tests measure the step formulas alone.
    """
    reference = scheduler_class(num_train_timesteps=T, beta_schedule="linear", **config)
    reference.betas = to_torch(schedule.betas)
    reference.alphas = to_torch(schedule.alphas)
    reference.alphas_cumprod = to_torch(schedule.alphas_cumprod)
    if hasattr(reference, "final_alpha_cumprod"):
        set_alpha_to_one = config.get("set_alpha_to_one", True)
        reference.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else reference.alphas_cumprod[0]
    if hasattr(reference, "initial_alpha_cumprod"):
        reference.initial_alpha_cumprod = torch.tensor(1.0)
    return reference


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", num_train_timesteps=T)


# ----------------------------------------------------------------------------------------------
# Timestep grids.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 999])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_make_timesteps_matches_ddim_scheduler(spacing, num_steps, steps_offset):
    reference = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    reference.set_timesteps(num_steps)
    ours = make_timesteps(T, num_steps, spacing, steps_offset)
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())
    assert ours.dtype == np.int32


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50])
def test_make_timesteps_matches_dpm_scheduler(spacing, num_steps):
    reference = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1)
    reference.set_timesteps(num_steps)
    ours = make_timesteps(T, num_steps, spacing, 1, convention="dpm_solver")
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_make_timesteps_full_chain(spacing):
    np.testing.assert_array_equal(make_timesteps(T, T, spacing), np.arange(T)[::-1])


def test_make_timesteps_rejects_too_many_steps():
    with pytest.raises(ValueError, match="num_steps=1001") as info:
        make_timesteps(T, 1001)
    assert "num_train_timesteps=1000" in str(info.value)
    assert "at most 1000" in str(info.value)


def test_make_timesteps_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        make_timesteps(T, 0)


def test_make_timesteps_rejects_offset_overflow():
    with pytest.raises(ValueError, match="steps_offset=1"):
        make_timesteps(T, 1000, "leading", 1)


def test_make_timesteps_rejects_unknown_spacing():
    with pytest.raises(ValueError, match="trailing"):
        make_timesteps(T, 10, "uniform")


def test_sampler_rejects_too_many_steps(schedule):
    with pytest.raises(ValueError, match="num_steps=2000"):
        ddim_sample(dummy_model_jax, schedule, initial_noise(), None, num_steps=2000)


# ----------------------------------------------------------------------------------------------
# Single steps against diffusers.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_step_matches_diffusers(schedule, prediction_type, variance_type, clip_sample):
    reference = make_reference(DDPMScheduler, schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=clip_sample,
    )
    x = initial_noise(1)
    for t in [999, 500, 37, 1, 0]:
        output = dummy_model_jax(x, jnp.full((SHAPE[0],), t, jnp.int32))
        # diffusers draws its noise from the generator; the same seed gives the same noise here.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        expected = reference.step(
            to_torch(output), t, to_torch(x), generator=torch.Generator().manual_seed(t)
        ).prev_sample
        ours, _ = ddpm_step(
            schedule,
            output,
            t,
            t - 1,
            x,
            jnp.asarray(noise.numpy()),
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            variance_type=variance_type,
        )
        np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


def test_ddpm_step_shortened_chain_matches_diffusers(schedule):
    reference = make_reference(DDPMScheduler, schedule, clip_sample=False)
    reference.set_timesteps(10)
    timesteps = make_timesteps(T, 10)
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
    x = initial_noise(2)
    for t, t_prev in zip(timesteps, list(timesteps[1:]) + [-1]):
        output = dummy_model_jax(x, jnp.full((SHAPE[0],), t, jnp.int32))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        expected = reference.step(
            to_torch(output), int(t), to_torch(x), generator=torch.Generator().manual_seed(int(t))
        ).prev_sample
        ours, _ = ddpm_step(schedule, output, int(t), int(t_prev), x, jnp.asarray(noise.numpy()))
        np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_step_matches_diffusers(schedule, eta, prediction_type, set_alpha_to_one, use_clipped_model_output):
    num_steps = 20
    reference = make_reference(DDIMScheduler, schedule,
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=True,
    )
    reference.set_timesteps(num_steps)
    x = initial_noise(3)
    noise = initial_noise(4)
    for t in [951, 501, 51, 1]:
        output = dummy_model_jax(x, jnp.full((SHAPE[0],), t, jnp.int32))
        expected = reference.step(
            to_torch(output), t, to_torch(x), eta=eta, variance_noise=to_torch(noise),
            use_clipped_model_output=use_clipped_model_output,
        ).prev_sample
        ours, _ = ddim_step(
            schedule,
            output,
            t,
            t - T // num_steps,  # diffusers' previous timestep.
            x,
            eta=eta,
            noise=noise,
            prediction_type=prediction_type,
            clip_sample=True,
            set_alpha_to_one=set_alpha_to_one,
            use_clipped_model_output=use_clipped_model_output,
        )
        np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


def test_ddim_step_per_example_timesteps(schedule):
    x = initial_noise(5)
    t = jnp.array([800, 300], dtype=jnp.int32)
    t_prev = jnp.array([700, -1], dtype=jnp.int32)
    output = dummy_model_jax(x, t)
    batched, _ = ddim_step(schedule, output, t, t_prev, x)
    for i in range(SHAPE[0]):
        single, _ = ddim_step(schedule, output[i : i + 1], int(t[i]), int(t_prev[i]), x[i : i + 1])
        np.testing.assert_allclose(np.asarray(batched[i : i + 1]), np.asarray(single), rtol=1e-6, atol=1e-6)


def _dpm_reference(schedule, prediction_type, use_karras_sigmas, final_sigmas_type="zero"):
    return make_reference(DPMSolverMultistepScheduler, schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type=prediction_type,
        use_karras_sigmas=use_karras_sigmas,
        lower_order_final=True,
        final_sigmas_type=final_sigmas_type,
        timestep_spacing="linspace",
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
@pytest.mark.parametrize("num_steps, final_sigmas_type", [(20, "zero"), (10, "sigma_min"), (20, "sigma_min")])
def test_dpmpp_2m_steps_match_diffusers(
    schedule, prediction_type, use_karras_sigmas, num_steps, final_sigmas_type
):
    reference = _dpm_reference(schedule, prediction_type, use_karras_sigmas, final_sigmas_type)
    reference.set_timesteps(num_steps)
    timesteps, sigmas = make_dpm_solver_grid(
        schedule, num_steps, use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type
    )
    np.testing.assert_array_equal(np.asarray(timesteps), reference.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(sigmas), reference.sigmas.numpy(), rtol=STEP_RTOL, atol=1e-6)

    # Feed diffusers' sample into both at every step, so each comparison covers one step (with the
    # history that both built from the same inputs).
    x = to_torch(initial_noise(6))
    history = dpmpp_2m_init(jnp.asarray(x.numpy()))
    for i, t in enumerate(reference.timesteps):
        x_jax = jnp.asarray(x.numpy())
        output = dummy_model_jax(x_jax, jnp.full((SHAPE[0],), int(t), jnp.int32))
        ours, history = dpmpp_2m_step(
            output,
            x_jax,
            sigmas[i],
            sigmas[i + 1],
            history,
            prediction_type=prediction_type,
            lower_order=(i == num_steps - 1 and num_steps < 15),
        )
        x = reference.step(to_torch(output), t, x).prev_sample
        np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


# ----------------------------------------------------------------------------------------------
# Whole loops against diffusers' scheduler loops.
# ----------------------------------------------------------------------------------------------


def _run_ddim_reference(schedule, x_T, num_steps, spacing, eta=0.0, key=None, prediction_type="epsilon"):
    reference = make_reference(DDIMScheduler, schedule,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    reference.set_timesteps(num_steps)
    x = to_torch(x_T)
    for i, t in enumerate(reference.timesteps):
        output = dummy_model_torch(x, t)
        noise = None if eta == 0 else to_torch(jax.random.normal(jax.random.fold_in(key, i), x_T.shape))
        x = reference.step(output, int(t), x, eta=eta, variance_noise=noise).prev_sample
    return x.numpy()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_sample_matches_diffusers_loop(schedule, spacing, prediction_type):
    x_T = initial_noise(7)
    expected = _run_ddim_reference(schedule, x_T, 20, spacing, prediction_type=prediction_type)
    ours = ddim_sample(
        dummy_model_jax, schedule, x_T, None, num_steps=20, spacing=spacing, prediction_type=prediction_type
    )
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_ddim_sample_with_eta_matches_diffusers_loop(schedule):
    x_T = initial_noise(8)
    key = jax.random.key(42)
    expected = _run_ddim_reference(schedule, x_T, 20, "leading", eta=0.5, key=key)
    ours = ddim_sample(dummy_model_jax, schedule, x_T, key, num_steps=20, eta=0.5)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


@pytest.mark.parametrize(
    "use_karras_sigmas, prediction_type, num_steps, final_sigmas_type",
    [
        (False, "epsilon", 20, "zero"),
        (False, "v_prediction", 20, "zero"),
        (True, "epsilon", 20, "zero"),
        (True, "v_prediction", 20, "zero"),
        # Below 15 steps with a nonzero final sigma, only lower_order_final makes the last step first order.
        (False, "epsilon", 10, "sigma_min"),
    ],
)
def test_dpmpp_2m_sample_matches_diffusers_loop(
    schedule, use_karras_sigmas, prediction_type, num_steps, final_sigmas_type
):
    reference = _dpm_reference(schedule, prediction_type, use_karras_sigmas, final_sigmas_type)
    reference.set_timesteps(num_steps)
    x_T = initial_noise(9)
    x = to_torch(x_T)
    for t in reference.timesteps:
        x = reference.step(dummy_model_torch(x, t), t, x).prev_sample
    ours = dpmpp_2m_sample(
        dummy_model_jax,
        schedule,
        x_T,
        None,
        num_steps=num_steps,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
        final_sigmas_type=final_sigmas_type,
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_dpmpp_2m_clip_sample_matches_thresholding(schedule):
    # diffusers' dynamic thresholding with sample_max_value=1.0 clamps its threshold to 1, which is clipping.
    reference = make_reference(DPMSolverMultistepScheduler, schedule, algorithm_type="dpmsolver++",
                               solver_order=2, solver_type="midpoint", timestep_spacing="linspace",
                               thresholding=True, sample_max_value=1.0)
    reference.set_timesteps(20)
    x_T = 3.0 * initial_noise(21)  # large enough that the data predictions leave [-1, 1]
    x = to_torch(x_T)
    for t in reference.timesteps:
        x = reference.step(dummy_model_torch(x, t), t, x).prev_sample
    clipped = dpmpp_2m_sample(dummy_model_jax, schedule, x_T, None, num_steps=20, clip_sample=True)
    unclipped = dpmpp_2m_sample(dummy_model_jax, schedule, x_T, None, num_steps=20)
    np.testing.assert_allclose(np.asarray(clipped), x.numpy(), rtol=LOOP_RTOL, atol=LOOP_ATOL)
    assert np.abs(np.asarray(clipped) - np.asarray(unclipped)).max() > 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_zero_terminal_snr_matches_diffusers_loop(sampler):
    # Zero terminal SNR (alpha_bar_999 == 0) with v-prediction and "trailing" spacing, the setup that
    # Lin et al. 2023 recommend. The first step starts at t = 999, where eps-prediction is undefined.
    schedule = make_schedule(
        "scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True
    )
    scheduler_class = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    config = {"clip_sample": False} if sampler == "ddim" else {"algorithm_type": "dpmsolver++"}
    # Built from the config, not make_reference, because diffusers' DPM-Solver replaces the final
    # alpha_bar of 0 by 2**-24 in its constructor.
    reference = scheduler_class(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        **config,
    )
    reference.set_timesteps(20)
    x = to_torch(initial_noise(20))
    for t in reference.timesteps:
        x = reference.step(dummy_model_torch(x, t), t, x).prev_sample

    run = ddim_sample if sampler == "ddim" else dpmpp_2m_sample
    ours = run(
        dummy_model_jax,
        schedule,
        initial_noise(20),
        None,
        num_steps=20,
        spacing="trailing",
        prediction_type="v_prediction",
    )
    assert bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=LOOP_RTOL, atol=LOOP_ATOL)


def _run_ddpm_reference(monkeypatch, schedule, x_T, key, num_steps=None, **config):
    """Run diffusers' DDPM loop with the sampler's per-step noise normal(fold_in(key, i))."""
    reference = make_reference(DDPMScheduler, schedule, **config)
    if num_steps is not None:
        reference.set_timesteps(num_steps)
    step = {"index": 0}

    def sampler_noise(shape, **kwargs):
        del kwargs
        return to_torch(jax.random.normal(jax.random.fold_in(key, step["index"]), tuple(shape)))

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", sampler_noise)
    x = to_torch(x_T)
    for i, t in enumerate(reference.timesteps):
        step["index"] = i
        x = reference.step(dummy_model_torch(x, t), int(t), x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddpm_sample_short_chain_matches_diffusers_loop(monkeypatch, schedule, prediction_type):
    x_T = initial_noise(10)
    key = jax.random.key(3)
    expected = _run_ddpm_reference(
        monkeypatch,
        schedule,
        x_T,
        key,
        num_steps=25,
        prediction_type=prediction_type,
        variance_type="fixed_large",
        clip_sample=False,
    )
    ours = ddpm_sample(
        dummy_model_jax,
        schedule,
        x_T,
        key,
        num_steps=25,
        prediction_type=prediction_type,
        variance_type="fixed_large",
    )
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_ddpm_sample_full_chain_matches_diffusers_loop(monkeypatch, schedule):
    x_T = initial_noise(11, shape=(1, 2, 2, 1))
    key = jax.random.key(4)
    expected = _run_ddpm_reference(monkeypatch, schedule, x_T, key, clip_sample=True)
    calls = {"count": 0}

    def counting_model(x, t, cond):
        calls["count"] += 1
        return dummy_model_jax(x, t, cond)

    ours = ddpm_sample(counting_model, schedule, x_T, key, clip_sample=True)
    assert calls["count"] == 1  # Traced once: the 1000 steps are one lax.scan.
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


# ----------------------------------------------------------------------------------------------
# Euler and Euler ancestral against diffusers.
# ----------------------------------------------------------------------------------------------

# Karras timesteps come from inverting sigma(t) in float32 here and in float64 in diffusers; near
# t = 999 log sigma changes by about 3e-3 per timestep, so float32 rounding moves t by up to ~3e-4.
KARRAS_TIMESTEP_ATOL = 1e-3


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
@pytest.mark.parametrize("num_steps", [1, 7, 25])
def test_make_euler_grid_matches_diffusers(schedule, spacing, steps_offset, use_karras_sigmas, num_steps):
    reference = make_reference(EulerDiscreteScheduler, schedule,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
    )
    reference.set_timesteps(num_steps)
    timesteps, sigmas = make_euler_grid(
        schedule, num_steps, spacing=spacing, steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas
    )
    assert timesteps.dtype == jnp.float32
    timestep_atol = KARRAS_TIMESTEP_ATOL if use_karras_sigmas else 0.0
    np.testing.assert_allclose(np.asarray(timesteps), reference.timesteps.numpy(), rtol=0, atol=timestep_atol)
    np.testing.assert_allclose(np.asarray(sigmas), reference.sigmas.numpy(), rtol=STEP_RTOL, atol=1e-6)
    np.testing.assert_allclose(
        float(euler_init_noise_sigma(sigmas, spacing)), float(reference.init_noise_sigma), rtol=1e-6
    )


def test_make_euler_grid_sigma_bounds_and_final_sigma(schedule):
    reference = make_reference(EulerDiscreteScheduler, schedule,
        use_karras_sigmas=True,
        sigma_min=0.1,
        sigma_max=20.0,
        final_sigmas_type="sigma_min",
    )
    reference.set_timesteps(10)
    timesteps, sigmas = make_euler_grid(
        schedule, 10, use_karras_sigmas=True, sigma_min=0.1, sigma_max=20.0, final_sigmas_type="sigma_min"
    )
    np.testing.assert_allclose(
        np.asarray(timesteps), reference.timesteps.numpy(), rtol=0, atol=KARRAS_TIMESTEP_ATOL
    )
    np.testing.assert_allclose(np.asarray(sigmas), reference.sigmas.numpy(), rtol=STEP_RTOL, atol=1e-6)
    assert float(sigmas[0]) == pytest.approx(20.0, rel=1e-6)
    assert float(sigmas[-1]) > 0.0


def test_make_euler_grid_rejects_sigma_bounds_without_karras(schedule):
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        make_euler_grid(schedule, 10, sigma_min=0.1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
def test_euler_steps_match_diffusers(schedule, prediction_type, use_karras_sigmas):
    num_steps = 15
    reference = make_reference(EulerDiscreteScheduler, schedule,
        prediction_type=prediction_type,
        use_karras_sigmas=use_karras_sigmas,
    )
    reference.set_timesteps(num_steps)
    _, sigmas = make_euler_grid(schedule, num_steps, use_karras_sigmas=use_karras_sigmas)
    # Feed diffusers' sample into both at every step, so each comparison covers one step.
    x = to_torch(initial_noise(21)) * reference.init_noise_sigma
    for i, t in enumerate(reference.timesteps):
        model_input = reference.scale_model_input(x, t)
        output = dummy_model_jax(jnp.asarray(model_input.numpy()), jnp.full((SHAPE[0],), float(t), jnp.float32))
        ours, _ = euler_step(
            output, jnp.asarray(x.numpy()), sigmas[i], sigmas[i + 1], prediction_type=prediction_type
        )
        x = reference.step(to_torch(output), t, x).prev_sample
        np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


def _run_euler_reference(reference, x_T, num_steps):
    """Run a diffusers Euler loop as its pipelines do: scale x_T, scale each model input, step."""
    reference.set_timesteps(num_steps)
    x = to_torch(x_T) * reference.init_noise_sigma
    for t in reference.timesteps:
        output = dummy_model_torch(reference.scale_model_input(x, t), t)
        x = reference.step(output, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize(
    "spacing, steps_offset, use_karras_sigmas, prediction_type, final_sigmas_type",
    [
        ("leading", 1, False, "epsilon", "zero"),  # SDXL's scheduler config.
        ("linspace", 0, False, "epsilon", "zero"),  # Fractional timesteps reach the model.
        ("trailing", 0, False, "v_prediction", "zero"),
        ("linspace", 0, True, "epsilon", "zero"),
        ("leading", 1, True, "v_prediction", "sigma_min"),
    ],
)
def test_euler_sample_matches_diffusers_loop(
    spacing, steps_offset, use_karras_sigmas, prediction_type, final_sigmas_type
):
    schedule = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference = make_reference(EulerDiscreteScheduler, schedule,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
        final_sigmas_type=final_sigmas_type,
    )
    x_T = initial_noise(22)
    expected = _run_euler_reference(reference, x_T, 20)
    ours = euler_sample(
        dummy_model_jax,
        schedule,
        x_T,
        None,
        num_steps=20,
        spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
        final_sigmas_type=final_sigmas_type,
    )
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_euler_float_timesteps_and_initial_scale(schedule):
    seen = []

    def recording_model(x, t, cond):
        seen.append((x, t))
        return jnp.zeros_like(x)

    x_T = initial_noise(23)
    # One "trailing" step runs at t = 999 and goes to sigma 0.
    result = euler_sample(recording_model, schedule, x_T, None, num_steps=1, spacing="trailing")
    model_input, timesteps = seen[0]  # Tracers: the scan traces the model once.
    assert timesteps.dtype == jnp.float32
    assert timesteps.shape == (SHAPE[0],)
    assert model_input.shape == SHAPE
    # A zero noise prediction means x0 = x, so the step leaves x_T * init_noise_sigma unchanged.
    alpha_bar = float(schedule.alphas_cumprod[-1])
    sigma_max = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    np.testing.assert_allclose(np.asarray(result), np.asarray(x_T) * sigma_max, rtol=1e-5, atol=1e-6)


def test_euler_zero_terminal_snr_matches_diffusers_loop():
    schedule = make_schedule(
        "scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True
    )
    # Built from the config, because diffusers replaces the final alpha_bar of 0 in its constructor.
    reference = EulerDiscreteScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    x_T = initial_noise(24)
    expected = _run_euler_reference(reference, x_T, 20)
    ours = euler_sample(
        dummy_model_jax, schedule, x_T, None, num_steps=20, spacing="trailing", prediction_type="v_prediction"
    )
    assert bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_step_matches_diffusers(schedule, prediction_type):
    reference = make_reference(EulerAncestralDiscreteScheduler, schedule, prediction_type=prediction_type)
    reference.set_timesteps(10)
    _, sigmas = make_euler_grid(schedule, 10)
    x = to_torch(initial_noise(25)) * reference.init_noise_sigma
    for i, t in enumerate(reference.timesteps):
        output = dummy_model_jax(
            jnp.asarray(reference.scale_model_input(x, t).numpy()), jnp.full((SHAPE[0],), float(t), jnp.float32)
        )
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        ours, _ = euler_ancestral_step(
            output,
            jnp.asarray(x.numpy()),
            sigmas[i],
            sigmas[i + 1],
            jnp.asarray(noise.numpy()),
            prediction_type=prediction_type,
        )
        x = reference.step(to_torch(output), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL)


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 1), ("linspace", 0)])
def test_euler_ancestral_sample_matches_diffusers_loop(monkeypatch, schedule, spacing, steps_offset):
    reference = make_reference(EulerAncestralDiscreteScheduler, schedule,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    key = jax.random.key(6)
    step = {"index": 0}

    def sampler_noise(shape, **kwargs):
        del kwargs
        return to_torch(jax.random.normal(jax.random.fold_in(key, step["index"]), tuple(shape)))

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", sampler_noise)
    reference.set_timesteps(20)
    x_T = initial_noise(26)
    x = to_torch(x_T) * reference.init_noise_sigma
    for i, t in enumerate(reference.timesteps):
        step["index"] = i
        x = reference.step(dummy_model_torch(reference.scale_model_input(x, t), t), t, x).prev_sample
    ours = euler_ancestral_sample(
        dummy_model_jax, schedule, x_T, key, num_steps=20, spacing=spacing, steps_offset=steps_offset
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_euler_ancestral_without_key_raises(schedule):
    with pytest.raises(ValueError, match="pass a PRNG key"):
        euler_ancestral_sample(dummy_model_jax, schedule, initial_noise(), None, num_steps=10)


# ----------------------------------------------------------------------------------------------
# Sampler properties.
# ----------------------------------------------------------------------------------------------


def test_ddim_eta_zero_ignores_key(schedule):
    x_T = initial_noise(12)
    first = ddim_sample(dummy_model_jax, schedule, x_T, jax.random.key(0), num_steps=10)
    second = ddim_sample(dummy_model_jax, schedule, x_T, jax.random.key(1), num_steps=10)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_ddim_eta_positive_uses_key(schedule):
    x_T = initial_noise(12)
    run = jax.jit(functools.partial(ddim_sample, dummy_model_jax, schedule, num_steps=10, eta=1.0))
    first = run(x_T, jax.random.key(0))
    second = run(x_T, jax.random.key(1))
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3


def test_ddim_invert_matches_diffusers_loop(schedule):
    x0 = initial_noise(13)
    reference = make_reference(DDIMInverseScheduler, schedule, clip_sample=False)
    reference.set_timesteps(20)
    x = to_torch(x0)
    for t in reference.timesteps:
        x = reference.step(dummy_model_torch(x, t), int(t), x).prev_sample
    ours = ddim_invert(dummy_model_jax, schedule, x0, num_steps=20)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=LOOP_RTOL, atol=LOOP_ATOL)


def _linear_model_gain(alpha_bar_from, alpha_bar_to, slope):
    """Return c with x_to = c * x_from for one deterministic DDIM step of the model eps = slope * x."""
    sqrt_from, sqrt_to = np.sqrt(alpha_bar_from), np.sqrt(alpha_bar_to)
    x0_gain = (1.0 - np.sqrt(1.0 - alpha_bar_from) * slope) / sqrt_from
    return sqrt_to * x0_gain + np.sqrt(1.0 - alpha_bar_to) * slope


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_invert_round_trip(schedule, spacing):
    # With eps = slope * x every DDIM step multiplies x by a known scalar, so the round trip
    # x0 -> invert -> sample returns c * x0 with c computed below in float64. Inversion evaluates
    # eps at the start of each step instead of its end, so c != 1 by O(slope * step size): with
    # slope 0.01 and 100 steps |c - 1| is about 3.5e-3, and the 5e-3 bound fails for a wrong update.
    slope, num_steps = 0.01, 100

    def linear_model(x, t, cond):
        del t, cond
        return slope * x

    x0 = initial_noise(14)
    x_T = ddim_invert(linear_model, schedule, x0, num_steps=num_steps, spacing=spacing)
    recovered = ddim_sample(linear_model, schedule, x_T, None, num_steps=num_steps, spacing=spacing)

    alpha_bar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    levels = [1.0] + [alpha_bar[t] for t in make_timesteps(T, num_steps, spacing)[::-1]]  # x0 up to x_T.
    gain = 1.0
    for low, high in zip(levels[:-1], levels[1:]):
        gain *= _linear_model_gain(low, high, slope) * _linear_model_gain(high, low, slope)

    assert float(jnp.max(jnp.abs(x_T - x0))) > 0.1  # Inversion moved the sample.
    np.testing.assert_allclose(np.asarray(recovered), gain * np.asarray(x0), rtol=1e-4, atol=1e-5)
    assert abs(gain - 1.0) < 5e-3


@pytest.mark.parametrize(
    "sampler, options",
    [
        (ddim_sample, {"num_steps": 10, "eta": 0.5}),
        (dpmpp_2m_sample, {"num_steps": 10, "use_karras_sigmas": True}),
        (euler_sample, {"num_steps": 10, "use_karras_sigmas": True, "spacing": "leading", "steps_offset": 1}),
        (euler_ancestral_sample, {"num_steps": 10}),
    ],
)
def test_jitted_sampler_does_not_recompile(sampler, options):
    traces = {"count": 0}

    def counting_model(x, t, cond):
        traces["count"] += 1
        return dummy_model_jax(x, t) + cond[:, None, None, None]

    run = jax.jit(functools.partial(sampler, counting_model, **options))
    cond = jnp.zeros((SHAPE[0],))
    first = run(make_schedule("linear"), initial_noise(15), jax.random.key(0), cond)
    other_schedule = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    second = run(other_schedule, initial_noise(16), jax.random.key(1), cond + 1.0)
    assert traces["count"] == 1
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3


def test_sampler_under_vmap(schedule):
    x_T = initial_noise(17, shape=(3,) + SHAPE)
    run = functools.partial(ddim_sample, dummy_model_jax, schedule, key=None, num_steps=5)
    batched = jax.vmap(run)(x_T)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(run(x_T[1])), rtol=1e-6, atol=1e-6)


def test_sampler_keeps_dtype(schedule):
    x_T = initial_noise(18).astype(jnp.bfloat16)
    result = dpmpp_2m_sample(dummy_model_jax, schedule, x_T, None, num_steps=5)
    assert result.dtype == jnp.bfloat16
    assert result.shape == SHAPE


# ----------------------------------------------------------------------------------------------
# Dispatch and bad input.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral"])
def test_sample_dispatch_forwards_arguments(monkeypatch, schedule, name):
    real_sampler = SAMPLERS[name]
    calls = []

    @functools.wraps(real_sampler)  # Keeps the signature that sample() checks options against.
    def recording_sampler(*args, **kwargs):
        calls.append((args, kwargs))
        return "sampled"

    monkeypatch.setitem(SAMPLERS, name, recording_sampler)
    x_T, key, cond = initial_noise(), jax.random.key(5), jnp.ones((SHAPE[0],))
    assert sample(name, dummy_model_jax, schedule, x_T, key, cond, num_steps=5) == "sampled"
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] is dummy_model_jax
    assert args[1] is schedule
    assert args[2] is x_T
    assert args[3] is key
    assert args[4] is cond
    assert kwargs == {"num_steps": 5}


def test_sample_dispatch_runs_sampler(schedule):
    x_T = initial_noise(19)
    np.testing.assert_array_equal(
        np.asarray(sample("dpmpp_2m", dummy_model_jax, schedule, x_T, None, num_steps=5)),
        np.asarray(dpmpp_2m_sample(dummy_model_jax, schedule, x_T, None, num_steps=5)),
    )


def test_sample_rejects_unknown_option(schedule):
    with pytest.raises(TypeError, match="'num_step'") as info:
        sample("ddim", dummy_model_jax, schedule, initial_noise(), None, num_step=10)
    assert "did you mean 'num_steps'" in str(info.value)
    assert "set_alpha_to_one" in str(info.value)


def test_sample_rejects_option_of_other_sampler(schedule):
    with pytest.raises(TypeError, match="use_karras_sigmas"):
        sample("ddim", dummy_model_jax, schedule, initial_noise(), None, num_steps=10, use_karras_sigmas=True)


def test_sample_rejects_unknown_sampler(schedule):
    with pytest.raises(ValueError, match="dpmpp_2m, euler, euler_ancestral"):
        sample("heun", dummy_model_jax, schedule, initial_noise(), None, num_steps=10)


def test_sampler_options_lists_keywords():
    assert "eta" in sampler_options("ddim")
    assert "eta" not in sampler_options("dpmpp_2m")


def test_ddim_eta_without_key_raises(schedule):
    with pytest.raises(ValueError, match="pass a PRNG key"):
        ddim_sample(dummy_model_jax, schedule, initial_noise(), None, num_steps=10, eta=0.5)


def test_ddim_step_eta_without_noise_raises(schedule):
    x = initial_noise()
    with pytest.raises(ValueError, match="pass noise"):
        ddim_step(schedule, x, 500, 450, x, eta=0.5)


def test_ddim_rejects_eta_out_of_range(schedule):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ddim_sample(dummy_model_jax, schedule, initial_noise(), jax.random.key(0), num_steps=10, eta=1.5)


def test_ddpm_without_key_raises(schedule):
    with pytest.raises(ValueError, match="PRNG key"):
        ddpm_sample(dummy_model_jax, schedule, initial_noise(), None, num_steps=10)


@pytest.mark.parametrize(
    "sampler", [ddim_sample, dpmpp_2m_sample, ddpm_sample, euler_sample, euler_ancestral_sample]
)
def test_samplers_reject_unknown_prediction_type(schedule, sampler):
    with pytest.raises(ValueError, match="v_prediction"):
        sampler(
            dummy_model_jax,
            schedule,
            initial_noise(),
            jax.random.key(0),
            num_steps=10,
            prediction_type="velocity",
        )


def test_ddpm_rejects_unknown_variance_type(schedule):
    with pytest.raises(ValueError, match="fixed_large"):
        ddpm_sample(dummy_model_jax, schedule, initial_noise(), jax.random.key(0), variance_type="learned")


def test_dpm_rejects_unknown_final_sigmas_type(schedule):
    with pytest.raises(ValueError, match="sigma_min"):
        dpmpp_2m_sample(
            dummy_model_jax, schedule, initial_noise(), None, num_steps=10, final_sigmas_type="min"
        )


# ----------------------------------------------------------------------------------------------
# Starting part-way through the grid (image-to-image) against diffusers' img2img loop.
# ----------------------------------------------------------------------------------------------

# Loops of 5 to 17 steps that start from noised clean samples. Measured differences were below 2e-6 on
# values up to about 5.5, so 1e-5 leaves room for other CPUs and XLA versions.
IMG2IMG_ATOL = 1e-5
IMG2IMG_RTOL = 1e-5
IMG2IMG_STEPS = 20
SAMPLER_NAMES = ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral"]


def img2img_start_step(num_steps, strength):
    """Return the first grid step that diffusers' StableDiffusionImg2ImgPipeline runs for strength."""
    return num_steps - min(int(num_steps * strength), num_steps)


def clean_latents(seed=30):
    return 0.5 * initial_noise(seed)


def diffusers_img2img_start(reference, num_steps, start_step, x0, noise):
    """Set up reference as diffusers' img2img pipelines do and return (timesteps to run, noised x0)."""
    reference.set_timesteps(num_steps)
    begin = start_step * reference.order
    timesteps = reference.timesteps[begin:]
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(begin)
    return timesteps, reference.add_noise(to_torch(x0), to_torch(noise), timesteps[:1])


def fold_in_noise(monkeypatch, module, key, step):
    """Make module's randn_tensor return normal(fold_in(key, step["index"])), the samplers' step noise."""

    def sampler_noise(shape, **kwargs):
        del kwargs
        return to_torch(jax.random.normal(jax.random.fold_in(key, step["index"]), tuple(shape)))

    monkeypatch.setattr(module, "randn_tensor", sampler_noise)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("spacing, eta", [("leading", 0.0), ("trailing", 0.0), ("leading", 0.5)])
def test_ddim_img2img_matches_diffusers(schedule, strength, spacing, eta):
    start_step = img2img_start_step(IMG2IMG_STEPS, strength)
    key = jax.random.key(31)
    x0, noise = clean_latents(), initial_noise(32)
    reference = make_reference(DDIMScheduler, schedule, timestep_spacing=spacing, clip_sample=False)
    timesteps, x = diffusers_img2img_start(reference, IMG2IMG_STEPS, start_step, x0, noise)
    for i, t in enumerate(timesteps, start=start_step):
        # The noise of grid step i is keyed by i, counted from the start of the full grid.
        variance_noise = None if eta == 0 else to_torch(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
        output = dummy_model_torch(x, t)
        x = reference.step(output, int(t), x, eta=eta, variance_noise=variance_noise).prev_sample

    options = {"num_steps": IMG2IMG_STEPS, "spacing": spacing, "eta": eta}
    x_start = start_sample("ddim", schedule, x0, noise, start_step=start_step, **options)
    ours = ddim_sample(dummy_model_jax, schedule, x_start, key, start_step=start_step, **options)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=IMG2IMG_RTOL, atol=IMG2IMG_ATOL)


@pytest.mark.parametrize(
    "use_karras_sigmas, prediction_type, num_steps, final_sigmas_type, strength",
    [
        (False, "epsilon", 20, "zero", 0.75),
        (True, "epsilon", 20, "zero", 0.6),
        (True, "v_prediction", 20, "zero", 0.3),
        # Below 15 steps lower_order_final counts the whole grid, not the steps that run.
        (False, "epsilon", 10, "sigma_min", 0.5),
    ],
)
def test_dpmpp_2m_img2img_matches_diffusers(
    schedule, use_karras_sigmas, prediction_type, num_steps, final_sigmas_type, strength
):
    start_step = img2img_start_step(num_steps, strength)
    x0, noise = clean_latents(), initial_noise(33)
    reference = _dpm_reference(schedule, prediction_type, use_karras_sigmas, final_sigmas_type)
    timesteps, x = diffusers_img2img_start(reference, num_steps, start_step, x0, noise)
    for t in timesteps:
        x = reference.step(dummy_model_torch(x, t), t, x).prev_sample

    options = {
        "num_steps": num_steps,
        "use_karras_sigmas": use_karras_sigmas,
        "prediction_type": prediction_type,
        "final_sigmas_type": final_sigmas_type,
    }
    x_start = start_sample("dpmpp_2m", schedule, x0, noise, start_step=start_step, **options)
    ours = dpmpp_2m_sample(dummy_model_jax, schedule, x_start, None, start_step=start_step, **options)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=IMG2IMG_RTOL, atol=IMG2IMG_ATOL)


@pytest.mark.parametrize(
    "spacing, steps_offset, use_karras_sigmas, prediction_type, strength",
    [
        ("leading", 1, False, "epsilon", 0.75),  # SDXL's scheduler config.
        ("linspace", 0, False, "v_prediction", 0.5),  # Fractional timesteps reach the model.
        ("leading", 1, True, "epsilon", 0.3),
    ],
)
def test_euler_img2img_matches_diffusers(spacing, steps_offset, use_karras_sigmas, prediction_type, strength):
    schedule = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    start_step = img2img_start_step(IMG2IMG_STEPS, strength)
    x0, noise = clean_latents(), initial_noise(34)
    reference = make_reference(EulerDiscreteScheduler, schedule,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
    )
    timesteps, x = diffusers_img2img_start(reference, IMG2IMG_STEPS, start_step, x0, noise)
    for t in timesteps:
        x = reference.step(dummy_model_torch(reference.scale_model_input(x, t), t), t, x).prev_sample

    options = {
        "num_steps": IMG2IMG_STEPS,
        "spacing": spacing,
        "steps_offset": steps_offset,
        "use_karras_sigmas": use_karras_sigmas,
        "prediction_type": prediction_type,
    }
    x_start = start_sample("euler", schedule, x0, noise, start_step=start_step, **options)
    ours = euler_sample(dummy_model_jax, schedule, x_start, None, start_step=start_step, **options)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=IMG2IMG_RTOL, atol=IMG2IMG_ATOL)


def test_euler_ancestral_img2img_matches_diffusers(monkeypatch, schedule):
    start_step = img2img_start_step(IMG2IMG_STEPS, 0.6)
    key = jax.random.key(35)
    step = {"index": 0}
    fold_in_noise(monkeypatch, scheduling_euler_ancestral_discrete, key, step)
    x0, noise = clean_latents(), initial_noise(36)
    reference = make_reference(
        EulerAncestralDiscreteScheduler, schedule, timestep_spacing="leading", steps_offset=1
    )
    timesteps, x = diffusers_img2img_start(reference, IMG2IMG_STEPS, start_step, x0, noise)
    for i, t in enumerate(timesteps, start=start_step):
        step["index"] = i
        x = reference.step(dummy_model_torch(reference.scale_model_input(x, t), t), t, x).prev_sample

    options = {"num_steps": IMG2IMG_STEPS, "spacing": "leading", "steps_offset": 1}
    x_start = start_sample("euler_ancestral", schedule, x0, noise, start_step=start_step, **options)
    ours = euler_ancestral_sample(dummy_model_jax, schedule, x_start, key, start_step=start_step, **options)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=IMG2IMG_RTOL, atol=IMG2IMG_ATOL)


def test_ddpm_img2img_matches_diffusers(monkeypatch, schedule):
    num_steps = 25
    start_step = img2img_start_step(num_steps, 0.5)
    key = jax.random.key(37)
    step = {"index": 0}
    fold_in_noise(monkeypatch, scheduling_ddpm, key, step)
    x0, noise = clean_latents(), initial_noise(38)
    reference = make_reference(DDPMScheduler, schedule, clip_sample=False)
    timesteps, x = diffusers_img2img_start(reference, num_steps, start_step, x0, noise)
    for i, t in enumerate(timesteps, start=start_step):
        step["index"] = i
        x = reference.step(dummy_model_torch(x, t), int(t), x).prev_sample

    x_start = start_sample("ddpm", schedule, x0, noise, start_step=start_step, num_steps=num_steps)
    ours = ddpm_sample(dummy_model_jax, schedule, x_start, key, num_steps=num_steps, start_step=start_step)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=IMG2IMG_RTOL, atol=IMG2IMG_ATOL)


def test_start_sample_matches_add_noise_levels(schedule):
    # Direct check of the noised start state, including a Karras level between training timesteps.
    x0, noise = clean_latents(), initial_noise(39)
    start_step = 7
    for name, scheduler_class, config in [
        ("ddim", DDIMScheduler, {}),
        ("dpmpp_2m", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        ("euler", EulerDiscreteScheduler, {"timestep_spacing": "leading", "steps_offset": 1}),
    ]:
        reference = make_reference(scheduler_class, schedule, **config)
        _, expected = diffusers_img2img_start(reference, IMG2IMG_STEPS, start_step, x0, noise)
        jaxgen_names = {"timestep_spacing": "spacing"}
        renamed = {jaxgen_names.get(option, option): value for option, value in config.items()}
        ours = start_sample(
            name, schedule, x0, noise, start_step=start_step, num_steps=IMG2IMG_STEPS, **renamed
        )
        np.testing.assert_allclose(
            np.asarray(ours), expected.numpy(), rtol=STEP_RTOL, atol=STEP_ATOL, err_msg=f"sampler {name}"
        )


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_start_step_zero_changes_nothing(schedule, name):
    x_T, key = initial_noise(40), jax.random.key(41)
    options = {"num_steps": 8}
    plain = sample(name, dummy_model_jax, schedule, x_T, key, **options)
    explicit = sample(name, dummy_model_jax, schedule, x_T, key, start_step=0, **options)
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(plain))

    # start_sample at step 0 returns the unit noise, so the img2img call sequence is plain sampling.
    x_start = start_sample(name, schedule, clean_latents(), x_T, start_step=0, **options)
    np.testing.assert_array_equal(np.asarray(x_start), np.asarray(x_T))
    through_start = sample(name, dummy_model_jax, schedule, x_start, key, start_step=0, **options)
    np.testing.assert_array_equal(np.asarray(through_start), np.asarray(plain))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_start_step_skips_model_calls(schedule, name):
    seen = []

    def recording_model(x, t, cond):
        del cond
        jax.debug.callback(lambda t: seen.append(np.asarray(t)[0]), t)
        return dummy_model_jax(x, t)

    num_steps, start_step = 10, 6
    options = {"num_steps": num_steps, "start_step": start_step}
    x_start = start_sample(name, schedule, clean_latents(), initial_noise(42), **options)
    sample(name, recording_model, schedule, x_start, jax.random.key(0), **options)
    jax.effects_barrier()
    assert len(seen) == num_steps - start_step
    if name in ("euler", "euler_ancestral"):
        expected, _ = make_euler_grid(schedule, num_steps)
    elif name == "dpmpp_2m":
        expected, _ = make_dpm_solver_grid(schedule, num_steps)
    else:
        expected = make_timesteps(T, num_steps)
    np.testing.assert_allclose(np.asarray(seen), np.asarray(expected)[start_step:], rtol=0, atol=0)


@pytest.mark.parametrize(
    "sampler, options",
    [
        (ddpm_sample, {"num_steps": 10}),
        (ddim_sample, {"num_steps": 10, "eta": 0.5}),
        (dpmpp_2m_sample, {"num_steps": 10, "use_karras_sigmas": True}),
        (euler_sample, {"num_steps": 10, "spacing": "leading", "steps_offset": 1}),
        (euler_ancestral_sample, {"num_steps": 10}),
    ],
)
def test_jitted_start_step_does_not_recompile(sampler, options):
    traces = {"count": 0}

    def counting_model(x, t, cond):
        traces["count"] += 1
        return dummy_model_jax(x, t) + cond[:, None, None, None]

    name = sampler.__name__.removesuffix("_sample")
    start = jax.jit(functools.partial(start_sample, name, start_step=4, **options))
    run = jax.jit(functools.partial(sampler, counting_model, start_step=4, **options))
    cond = jnp.zeros((SHAPE[0],))
    results = []
    for seed, schedule in enumerate(
        [make_schedule("linear"), make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)]
    ):
        x_start = start(schedule, clean_latents(43 + seed), initial_noise(45 + seed))
        results.append(run(schedule, x_start, jax.random.key(seed), cond + seed))
    assert traces["count"] == 1
    assert start._cache_size() == 1
    assert float(jnp.max(jnp.abs(results[0] - results[1]))) > 1e-3


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("start_step", [-1, 5])
def test_start_step_out_of_range_raises(schedule, name, start_step):
    with pytest.raises(ValueError, match=rf"start_step={start_step} is outside \[0, 5\)"):
        sample(
            name, dummy_model_jax, schedule, initial_noise(), jax.random.key(0), num_steps=5, start_step=start_step
        )
    with pytest.raises(ValueError, match=rf"start_step={start_step} is outside \[0, 5\)"):
        start_sample(name, schedule, clean_latents(), initial_noise(), start_step=start_step, num_steps=5)


def test_ddpm_full_chain_start_step_range(schedule):
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        start_sample("ddpm", schedule, clean_latents(), initial_noise(), start_step=1000)


@pytest.mark.parametrize("start_step", [2.0, True, jnp.int32(2)])
def test_start_step_must_be_python_int(schedule, start_step):
    with pytest.raises(TypeError, match="start_step must be a Python int"):
        ddim_sample(dummy_model_jax, schedule, initial_noise(), None, num_steps=5, start_step=start_step)


def test_start_sample_rejects_shape_mismatch(schedule):
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 3, 3, 2\) but noise has shape \(1, 3, 3, 2\)"):
        noise = initial_noise(shape=(1, 3, 3, 2))
        start_sample("ddim", schedule, clean_latents(), noise, start_step=1, num_steps=5)


def test_start_sample_rejects_unknown_option(schedule):
    with pytest.raises(TypeError, match="did you mean 'num_steps'"):
        start_sample("euler", schedule, clean_latents(), initial_noise(), start_step=1, num_step=5)


def test_start_sample_requires_num_steps(schedule):
    with pytest.raises(TypeError, match="missing option.*num_steps"):
        start_sample("dpmpp_2m", schedule, clean_latents(), initial_noise(), start_step=1)
