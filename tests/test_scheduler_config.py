"""Tests for jaxgen.diffusion.scheduler_config: diffusers scheduler configs to jaxgen samplers."""

import inspect
import json
import logging
import math

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from jaxgen.diffusion import make_schedule, sample, sampler_options
from jaxgen.diffusion.scheduler_config import (
    CLASS_DEFAULTS,
    KNOWN_KEYS,
    SUPPORTED_CLASSES,
    from_scheduler_config,
)

T = 1000
SHAPE = (2, 3, 3, 2)
# 20-step loops on a toy model. jaxgen computes alpha_bar by a float64 cumprod and diffusers in
# float32 (about 1e-7 apart), so the loops are not bit-identical: measured differences were about
# 1e-6 on values up to 6.
LOOP_ATOL = 1e-4
LOOP_RTOL = 1e-4

# Pipeline scheduler configs as published (scheduler/scheduler_config.json), including the keys of
# other scheduler classes that diffusers carries along and ignores.
SD15 = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
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


def toy_model_jax(x, t, cond=None):
    del cond
    return 0.6 * x + 0.4 * (t.astype(jnp.float32) / T)[:, None, None, None] - 0.05


def toy_model_torch(x, t):
    return 0.6 * x + 0.4 * (float(t) / T) - 0.05


def initial_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def saved_default_config(class_name, tmp_path):
    """Return the config.json that diffusers writes for the class with all defaults."""
    getattr(diffusers, class_name)().save_config(tmp_path)
    return json.loads((tmp_path / "scheduler_config.json").read_text())


# ----- the table of diffusers defaults -----------------------------------------------------------


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_defaults_table_matches_diffusers(class_name):
    parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    expected = {name: p.default for name, p in parameters.items() if name != "self"}
    assert CLASS_DEFAULTS[class_name] == expected


def test_known_keys_cover_compatible_schedulers():
    keys = set()
    for scheduler in KarrasDiffusionSchedulers:
        parameters = inspect.signature(getattr(diffusers, scheduler.name).__init__).parameters
        keys |= {name for name, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    keys.discard("self")
    assert sorted(keys - KNOWN_KEYS) == []


# ----- each class at its defaults -----------------------------------------------------------------

DEFAULT_MAPPINGS = {
    "DDIMScheduler": (
        "ddim",
        {"spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon", "clip_sample": True,
         "set_alpha_to_one": True},
    ),
    "DDPMScheduler": (
        "ddpm",
        {"spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon", "clip_sample": True,
         "variance_type": "fixed_small"},
    ),
    "PNDMScheduler": (
        "ddim",
        {"spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon", "clip_sample": False,
         "set_alpha_to_one": False},
    ),
    "EulerDiscreteScheduler": (
        "euler",
        {"spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon", "use_karras_sigmas": False,
         "final_sigmas_type": "zero"},
    ),
    "EulerAncestralDiscreteScheduler": (
        "euler_ancestral",
        {"spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon"},
    ),
    "DPMSolverMultistepScheduler": (
        "dpmpp_2m",
        {"spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon", "use_karras_sigmas": False,
         "lower_order_final": True, "final_sigmas_type": "zero"},
    ),
}


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_default_config_maps(class_name, tmp_path):
    setup = from_scheduler_config(saved_default_config(class_name, tmp_path))
    expected_sampler, expected_options = DEFAULT_MAPPINGS[class_name]
    assert setup.sampler == expected_sampler
    assert setup.options == expected_options
    assert setup.prediction_type == "epsilon"
    assert set(setup.options) <= set(sampler_options(setup.sampler))
    reference = make_schedule("linear")
    np.testing.assert_allclose(
        np.asarray(setup.schedule.alphas_cumprod), np.asarray(reference.alphas_cumprod), rtol=0, atol=0
    )


def test_pndm_logs_substitution(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="jaxgen.diffusion.scheduler_config"):
        from_scheduler_config(saved_default_config("PNDMScheduler", tmp_path))
    assert "PNDMScheduler has no jaxgen sampler; using deterministic DDIM" in caplog.text


# ----- published pipeline configs, run against diffusers --------------------------------------------


def _diffusers_loop(scheduler, x_T, num_steps):
    """Run a diffusers sampling loop as its pipelines do, including the initial noise scale."""
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = toy_model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize(
    "config, reference_class, expected_sampler",
    [
        # jaxgen runs SD 1.5's PNDM config as DDIM, so DDIM built from the same config is the reference.
        (SD15, diffusers.DDIMScheduler, "ddim"),
        (SD21, diffusers.DDIMScheduler, "ddim"),
        (SDXL, diffusers.EulerDiscreteScheduler, "euler"),
        (dict(SDXL, use_karras_sigmas=True, timestep_spacing="trailing"), diffusers.EulerDiscreteScheduler, "euler"),
        (
            dict(SD21, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True),
            diffusers.DPMSolverMultistepScheduler,
            "dpmpp_2m",
        ),
    ],
)
def test_pipeline_config_matches_diffusers_loop(config, reference_class, expected_sampler):
    schedule, sampler, options = from_scheduler_config(config)
    assert sampler == expected_sampler
    x_T = initial_noise(1)
    expected = _diffusers_loop(reference_class.from_config(config), x_T, 20)
    ours = sample(sampler, toy_model_jax, schedule, jnp.asarray(x_T), None, num_steps=20, **options)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=LOOP_RTOL, atol=LOOP_ATOL)


def test_sd15_config_maps_to_ddim_options():
    _, sampler, options = from_scheduler_config(SD15)
    assert sampler == "ddim"
    assert options == {
        "spacing": "leading",
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def test_sdxl_config_maps_to_euler_options():
    schedule, sampler, options = from_scheduler_config(SDXL)
    assert sampler == "euler"
    assert options == {
        "spacing": "leading",
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
    }
    reference = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod), np.asarray(reference.alphas_cumprod), rtol=0, atol=0
    )


# ----- options that are read, ignored or rejected ---------------------------------------------------


def test_karras_sigma_bounds_become_options():
    _, _, options = from_scheduler_config(dict(SDXL, use_karras_sigmas=True, sigma_min=0.03, sigma_max=14.0))
    assert options["sigma_min"] == 0.03
    assert options["sigma_max"] == 14.0


@pytest.mark.parametrize(
    "base, override",
    [
        # Each value changes nothing in diffusers for this config, so it maps to the base's setup.
        (SDXL, {"sigma_min": 0.03}),  # Sigma bounds without Karras sigmas.
        (SDXL, {"timestep_type": "continuous"}),  # Continuous timesteps only apply to v_prediction.
        (SD21, {"clip_sample_range": 2.0}),  # No clipping, so no clipping range.
        (SD21, {"dynamic_thresholding_ratio": 0.9}),  # No thresholding.
        (SD15, {"rescale_betas_zero_snr": True}),  # PNDMScheduler has no such option.
    ],
)
def test_values_without_effect_are_accepted(base, override):
    expected = from_scheduler_config(base)
    actual = from_scheduler_config(dict(base, **override))
    assert actual.sampler == expected.sampler
    assert actual.options == expected.options
    np.testing.assert_array_equal(
        np.asarray(actual.schedule.alphas_cumprod), np.asarray(expected.schedule.alphas_cumprod)
    )


def test_rescale_zero_snr_reaches_schedule():
    schedule, _, _ = from_scheduler_config(dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    assert float(schedule.alphas_cumprod[-1]) == 0.0


def test_trained_betas_build_schedule():
    betas = np.linspace(1e-4, 0.02, T).tolist()
    schedule, _, _ = from_scheduler_config(dict(SD21, trained_betas=betas, beta_schedule="unused"))
    reference = make_schedule("linear")
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod), np.asarray(reference.alphas_cumprod), rtol=1e-6, atol=0
    )


def test_trained_betas_wrong_length_rejected():
    with pytest.raises(ValueError, match=r"trained_betas has shape \(10,\), but num_train_timesteps=1000"):
        from_scheduler_config(dict(SD21, trained_betas=[0.01] * 10))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(SD21, thresholding=True), "DDIMScheduler config thresholding=True is not supported"),
        (dict(SD21, clip_sample=True, clip_sample_range=2.0), "clip_sample_range=2.0"),
        (dict(SD21, prediction_type="flow_prediction"), "prediction_type='flow_prediction'"),
        (dict(SD21, timestep_spacing="uniform"), "timestep_spacing='uniform'"),
        (dict(SD21, beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(SD21, _class_name="DDPMScheduler", variance_type="learned_range"), "variance_type='learned_range'"),
        (dict(SDXL, interpolation_type="log_linear"), "interpolation_type='log_linear'"),
        (dict(SDXL, use_exponential_sigmas=True), "use_exponential_sigmas=True"),
        (dict(SDXL, use_beta_sigmas=True), "use_beta_sigmas=True"),
        (dict(SDXL, prediction_type="v_prediction", timestep_type="continuous"), "timestep_type='continuous'"),
        (dict(SDXL, final_sigmas_type="max"), "final_sigmas_type='max'"),
        (dict(SD21, _class_name="DPMSolverMultistepScheduler", solver_order=3), "solver_order=3"),
        (
            dict(SD21, _class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
            "algorithm_type='sde-dpmsolver\\+\\+'",
        ),
        (dict(SD21, _class_name="DPMSolverMultistepScheduler", solver_type="heun"), "solver_type='heun'"),
        (dict(SD21, _class_name="DPMSolverMultistepScheduler", use_lu_lambdas=True), "use_lu_lambdas=True"),
        (dict(SD21, _class_name="DPMSolverMultistepScheduler", euler_at_final=True), "euler_at_final=True"),
        (
            dict(SD21, _class_name="DPMSolverMultistepScheduler", lambda_min_clipped=-5.1),
            "lambda_min_clipped=-5.1",
        ),
        (dict(SD21, _class_name="LMSDiscreteScheduler"), "_class_name 'LMSDiscreteScheduler' is not supported"),
        ({"beta_start": 0.1}, "_class_name None is not supported"),
        (dict(SD21, beta_shedule="linear"), "'beta_shedule'.*nearest known key is 'beta_schedule'"),
    ],
)
def test_unsupported_values_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        from_scheduler_config(config)


def test_rejection_names_supported_values():
    with pytest.raises(ValueError, match="use 'dpmsolver\\+\\+'"):
        from_scheduler_config(dict(SD21, _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver"))


def test_infinite_lambda_clip_from_json_accepted():
    # Python's json writes the default -inf as -Infinity and reads it back as a float.
    config = json.loads(json.dumps(dict(SD21, _class_name="DPMSolverMultistepScheduler", lambda_min_clipped=-math.inf)))
    assert from_scheduler_config(config).sampler == "dpmpp_2m"


def test_sd21_config_keeps_v_prediction():
    setup = from_scheduler_config(SD21)
    assert setup.prediction_type == "v_prediction"
    assert setup.options["prediction_type"] == "v_prediction"
