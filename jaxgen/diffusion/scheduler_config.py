"""Map a diffusers scheduler_config.json to a jaxgen noise schedule, sampler name and sampler options.

`from_scheduler_config(config)` reads the dict of a pipeline's scheduler/scheduler_config.json and
returns a `SchedulerSetup`: the NoiseSchedule, the name that `samplers.sample` dispatches on, and
the keyword options for it. num_steps is not part of a scheduler config, so the caller adds it:

    setup = from_scheduler_config(json.loads(path.read_text()))
    x0 = sample(setup.sampler, model_fn, setup.schedule, x_T, key, cond, num_steps=30, **setup.options)

Supported classes and the sampler each maps to (diffusers 0.42.1 keys and defaults):

    DDIMScheduler                     "ddim" (eta 0)
    DDPMScheduler                     "ddpm"
    PNDMScheduler                     "ddim" (eta 0), with a logged warning: jaxgen has no PNDM
    EulerDiscreteScheduler            "euler"
    EulerAncestralDiscreteScheduler   "euler_ancestral"
    DPMSolverMultistepScheduler       "dpmpp_2m" (dpmsolver++, order 2, midpoint only)

Each key of the class is read at its value, or at the diffusers default when the config lacks it.
A value that jaxgen does not implement raises a ValueError that names the key and the value, unless
diffusers ignores that key in the given config too (dynamic_thresholding_ratio without
thresholding, for example). Saved configs often carry keys of other scheduler classes (SDXL's
Euler config has clip_sample and skip_prk_steps), which diffusers ignores; so does this function.
Keys that belong to no diffusers scheduler raise with the nearest known key. Keys starting with
"_" are metadata and are skipped.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.forward import PREDICTION_TYPES
from jaxgen.diffusion.samplers import FINAL_SIGMAS_TYPES, SPACINGS, VARIANCE_TYPES
from jaxgen.diffusion.schedules import (
    SCHEDULE_KINDS,
    NoiseSchedule,
    make_schedule,
    rescale_betas_zero_terminal_snr,
)

__all__ = ["SUPPORTED_CLASSES", "SchedulerSetup", "from_scheduler_config"]

logger = logging.getLogger(__name__)


class SchedulerSetup(NamedTuple):
    """Noise schedule, sampler name and sampler options of one scheduler config, a 3-tuple when unpacked."""

    schedule: NoiseSchedule
    sampler: str  # A key of samplers.SAMPLERS.
    options: dict[str, Any]  # Keyword options for that sampler, prediction_type included, num_steps not.

    @property
    def prediction_type(self) -> str:
        """Model output type ("epsilon", "v_prediction" or "sample"), the value of options["prediction_type"]."""
        return self.options["prediction_type"]


# Constructor arguments and defaults of each supported class in diffusers 0.42.1.
_SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
_THRESHOLDING_DEFAULTS: dict[str, Any] = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_SCHEDULE_DEFAULTS,
        **_THRESHOLDING_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "DDPMScheduler": {
        **_SCHEDULE_DEFAULTS,
        **_THRESHOLDING_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {
        **_SCHEDULE_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    },
    "EulerDiscreteScheduler": {
        **_SCHEDULE_DEFAULTS,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverMultistepScheduler": {
        **_SCHEDULE_DEFAULTS,
        **_THRESHOLDING_DEFAULTS,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
}
SUPPORTED_CLASSES = tuple(CLASS_DEFAULTS)

# Constructor arguments of the other schedulers that diffusers lists as compatible with Stable
# Diffusion (KarrasDiffusionSchedulers in 0.42.1). diffusers keeps them in saved configs when a
# pipeline switches scheduler class and ignores them when loading another class.
OTHER_SCHEDULER_KEYS = frozenset(
    {
        "disable_corrector",
        "predict_x0",
        "rho",
        "shift_terminal",
        "sigma_data",
        "sigma_schedule",
        "solver_p",
    }
)
KNOWN_KEYS = frozenset().union(*CLASS_DEFAULTS.values(), OTHER_SCHEDULER_KEYS)


class _ConfigValues:
    """The values of one class's keys; records which keys the mapping has looked at."""

    def __init__(self, class_name: str, config: Mapping[str, Any]):
        defaults = CLASS_DEFAULTS[class_name]
        self.class_name = class_name
        self.values = {key: config.get(key, default) for key, default in defaults.items()}
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.values[key]

    def skip(self, *keys: str) -> None:
        """Mark keys as handled whose value changes nothing in diffusers for this config."""
        for key in keys:
            if key not in self.values:
                raise KeyError(f"{key!r} is not a {self.class_name} config key.")
        self.read.update(keys)

    def require(self, key: str, allowed: tuple[Any, ...], reason: str) -> Any:
        """Return the value of key, or raise a ValueError naming it when it is not in allowed."""
        value = self[key]
        if value not in allowed:
            choices = ", ".join(repr(choice) for choice in allowed)
            raise ValueError(
                f"{self.class_name} config {key}={value!r} is not supported by jaxgen ({reason}); use "
                f"{choices}."
            )
        return value

    def check_all_read(self) -> None:
        unread = sorted(set(self.values) - self.read)
        if unread:
            raise AssertionError(f"The {self.class_name} mapping ignores config keys {unread}.")


def from_scheduler_config(config: Mapping[str, Any]) -> SchedulerSetup:
    """Map a diffusers scheduler_config.json dict to (NoiseSchedule, sampler name, sampler options).

    Raises:
      ValueError: _class_name is missing or not in SUPPORTED_CLASSES, a key is unknown to every
        diffusers scheduler, or a key has a value that jaxgen does not implement.
    """
    class_name = config.get("_class_name")
    if class_name not in CLASS_DEFAULTS:
        raise ValueError(
            f"Scheduler config _class_name {class_name!r} is not supported; jaxgen maps "
            f"{', '.join(SUPPORTED_CLASSES)}."
        )
    _check_keys_known(config)
    values = _ConfigValues(class_name, config)
    schedule = _schedule(values)
    sampler, options = _MAPPERS[class_name](values)
    values.check_all_read()
    return SchedulerSetup(schedule, sampler, options)


def _check_keys_known(config: Mapping[str, Any]) -> None:
    for key in config:
        if key.startswith("_") or key in KNOWN_KEYS:
            continue
        nearest = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.0)
        raise ValueError(
            f"Unknown scheduler config key {key!r}: no diffusers scheduler has it; the nearest known key "
            f"is {nearest[0]!r}."
        )


# ----- noise schedule --------------------------------------------------------------------------


def _schedule(values: _ConfigValues) -> NoiseSchedule:
    num_train_timesteps = values["num_train_timesteps"]
    trained_betas = values["trained_betas"]
    kind = values["beta_schedule"]
    # PNDMScheduler has no rescale_betas_zero_snr, so diffusers never rescales its betas.
    rescale = values["rescale_betas_zero_snr"] if "rescale_betas_zero_snr" in values.values else False

    if trained_betas is not None:
        values.skip("beta_schedule", "beta_start", "beta_end")  # diffusers uses trained_betas as given.
        return _schedule_from_betas(trained_betas, num_train_timesteps, rescale)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"{values.class_name} config beta_schedule={kind!r} is not supported by jaxgen; use one of "
            f"{', '.join(SCHEDULE_KINDS)} or give trained_betas."
        )
    return make_schedule(
        kind,
        num_train_timesteps=num_train_timesteps,
        beta_start=values["beta_start"],
        beta_end=values["beta_end"],
        rescale_zero_terminal_snr=rescale,
    )


def _schedule_from_betas(trained_betas: Any, num_train_timesteps: int, rescale: bool) -> NoiseSchedule:
    betas = np.asarray(trained_betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
        raise ValueError(
            f"trained_betas has shape {betas.shape}, but num_train_timesteps={num_train_timesteps}; give "
            "one beta per training timestep."
        )
    if rescale:
        betas = rescale_betas_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    return NoiseSchedule(
        betas=jnp.asarray(betas, dtype=jnp.float32),
        alphas=jnp.asarray(alphas, dtype=jnp.float32),
        alphas_cumprod=jnp.asarray(np.cumprod(alphas), dtype=jnp.float32),
    )


# ----- per-class options -----------------------------------------------------------------------


def _common_options(values: _ConfigValues) -> dict[str, Any]:
    """Read the options every supported class has: spacing, steps_offset and prediction_type."""
    return {
        "spacing": values.require("timestep_spacing", SPACINGS, "unknown timestep spacing"),
        "steps_offset": values["steps_offset"],
        "prediction_type": values.require("prediction_type", PREDICTION_TYPES, "unknown prediction type"),
    }


def _reject_thresholding(values: _ConfigValues) -> None:
    values.require("thresholding", (False,), "dynamic thresholding is not implemented")
    values.skip("dynamic_thresholding_ratio", "sample_max_value")  # Only read with thresholding.


def _clip_sample(values: _ConfigValues) -> bool:
    clip_sample = bool(values["clip_sample"])
    if clip_sample:
        values.require("clip_sample_range", (1.0,), "samplers clip x0 to [-1, 1] only")
    else:
        values.skip("clip_sample_range")
    return clip_sample


def _ddim(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    _reject_thresholding(values)
    options = _common_options(values)
    if options["spacing"] == "linspace":
        _warn_ddim_linspace()
    options["clip_sample"] = _clip_sample(values)
    options["set_alpha_to_one"] = bool(values["set_alpha_to_one"])
    return "ddim", options


def _warn_ddim_linspace() -> None:
    logger.warning(
        "DDIM with timestep_spacing='linspace': jaxgen's ddim_sample steps to the next grid timestep, "
        "while diffusers' DDIMScheduler steps to t - T // N, so the two differ on this grid."
    )


def _pndm(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    values.skip("skip_prk_steps")  # No Runge-Kutta warm-up in DDIM.
    options = _common_options(values)
    logger.warning(
        "PNDMScheduler has no jaxgen sampler; using deterministic DDIM on the same schedule and timestep "
        "grid (spacing=%r, steps_offset=%d). Samples differ from diffusers' PNDM, which takes "
        "fourth-order linear multistep steps.",
        options["spacing"],
        options["steps_offset"],
    )
    if options["spacing"] == "linspace":
        _warn_ddim_linspace()
    # PNDM never clips x0.
    options["clip_sample"] = False
    options["set_alpha_to_one"] = bool(values["set_alpha_to_one"])
    return "ddim", options


def _ddpm(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    _reject_thresholding(values)
    options = _common_options(values)
    options["clip_sample"] = _clip_sample(values)
    options["variance_type"] = values.require(
        "variance_type", VARIANCE_TYPES, "learned and log variances are not implemented"
    )
    return "ddpm", options


def _euler_sigma_options(values: _ConfigValues) -> dict[str, Any]:
    values.require("use_exponential_sigmas", (False,), "exponential sigmas are not implemented")
    values.require("use_beta_sigmas", (False,), "beta sigmas are not implemented")
    options: dict[str, Any] = {"use_karras_sigmas": bool(values["use_karras_sigmas"])}
    for key in ("sigma_min", "sigma_max"):
        # diffusers reads these bounds only for Karras (or exponential or beta) sigmas.
        if options["use_karras_sigmas"] and values[key] is not None:
            options[key] = float(values[key])
        else:
            values.skip(key)
    return options


def _euler(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    options = _common_options(values)
    values.require("interpolation_type", ("linear",), "log_linear interpolation is not implemented")
    if options["prediction_type"] == "v_prediction":
        values.require(
            "timestep_type", ("discrete",), "continuous timesteps 0.25 * log(sigma) are not implemented"
        )
    else:
        values.skip("timestep_type")  # diffusers uses continuous timesteps only with v_prediction.
    options.update(_euler_sigma_options(values))
    options["final_sigmas_type"] = values.require(
        "final_sigmas_type", FINAL_SIGMAS_TYPES, "unknown final sigma type"
    )
    return "euler", options


def _euler_ancestral(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    return "euler_ancestral", _common_options(values)


def _dpm_solver(values: _ConfigValues) -> tuple[str, dict[str, Any]]:
    _reject_thresholding(values)
    options = _common_options(values)
    values.require("solver_order", (2,), "only DPM-Solver++(2M) is implemented")
    values.require("algorithm_type", ("dpmsolver++",), "only DPM-Solver++(2M) is implemented")
    values.require("solver_type", ("midpoint",), "only the midpoint form is implemented")
    values.require("euler_at_final", (False,), "the last step is first-order DPM-Solver++")
    values.require("use_lu_lambdas", (False,), "Lu lambda spacing is not implemented")
    values.require("use_exponential_sigmas", (False,), "exponential sigmas are not implemented")
    values.require("use_beta_sigmas", (False,), "beta sigmas are not implemented")
    values.require("variance_type", (None,), "learned variances are not implemented")
    values.require("lambda_min_clipped", (-math.inf,), "lambda clipping is not implemented")
    values.require("use_flow_sigmas", (False,), "flow-matching sigmas are not implemented")
    values.require("use_dynamic_shifting", (False,), "dynamic shifting is not implemented")
    values.skip("flow_shift", "time_shift_type")  # Only read with flow sigmas or dynamic shifting.
    options["use_karras_sigmas"] = bool(values["use_karras_sigmas"])
    options["lower_order_final"] = bool(values["lower_order_final"])
    options["final_sigmas_type"] = values.require(
        "final_sigmas_type", FINAL_SIGMAS_TYPES, "unknown final sigma type"
    )
    return "dpmpp_2m", options


_MAPPERS: dict[str, Callable[[_ConfigValues], tuple[str, dict[str, Any]]]] = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "DPMSolverMultistepScheduler": _dpm_solver,
}
