"""Class-conditional sampling in torch with jaxgen's contract: diffusers schedulers set up as jaxgen's samplers.

`make_scheduler(diffusion, sample)` builds the diffusers scheduler that computes what
`jaxgen.diffusion.samplers.sample(sampler_name(sample), ..., **sampler_options(sample))` computes for the
same configs, and `sample` runs its whole loop with classifier-free guidance. `make_sample_fn(config, model)`
returns `draw(x_T, labels, guidance_scale, generator=None)`, the torch counterpart of the function that
`jaxgen.sampling.make_sample_fn` builds.

Shapes: B is the batch size. Images are [B, C, H, W] (channels-first) and labels are int64 [B].

What makes the two backends agree:
  - Betas: the scheduler gets jaxgen's own float32 betas as `trained_betas`, so no beta formula is computed
    twice. diffusers then reads neither beta_schedule nor beta_start nor beta_end, and leaves beta_schedule at
    "linear". One side effect is intended: DPM-Solver++ rounds its Karras timesteps as jaxgen does. diffusers
    truncates them when beta_schedule is "squaredcos_cap_v2".
  - alpha_bar: diffusers takes the cumulative product in float32 and jaxgen in float64, so alpha_bar differs
    by about 1e-7 relative. With zero terminal SNR the betas are jaxgen's rescaled ones. DPM-Solver++ also gets
    rescale_betas_zero_snr=True: rescaling again leaves the betas as they are up to float32 rounding, and it
    makes diffusers replace the final alpha_bar of 0 by 2**-24, as jaxgen does.
  - Options: each sampler option comes from `jaxgen.sampling.sampler_options(sample)` over the defaults of
    the jaxgen sampler's signature. So a default that changes in jaxgen changes here too.
  - Timestep grids: `make_scheduler` compares the scheduler's grid with `jaxgen.diffusion.samplers.make_timesteps`
    and raises ValueError where they differ. One such case is DDIM with "linspace" spacing, because
    diffusers' DDIM steps to t - T // N and jaxgen's DDIM to the next grid timestep.
  - Clipping: DDPM and DDIM clip x0 with clip_sample, and DDIM recomputes eps from the clipped x0
    (use_clipped_model_output), as jaxgen.sampling does. DPM-Solver++ clips with diffusers' dynamic
    thresholding at sample_max_value=1.0, whose threshold is clamped to [1, 1], so it clips to [-1, 1].

Randomness: stochastic steps (DDPM, DDIM with eta > 0) draw their noise from the torch generator passed in,
or from torch's global generator when it is None. jaxgen draws from JAX keys instead, so those samplers
agree with jaxgen in distribution only. DDIM with eta = 0 and DPM-Solver++ draw nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from jaxgen import sampling as jaxgen_sampling
from jaxgen.config import Config, DiffusionConfig, SampleConfig
from jaxgen.diffusion import samplers as jaxgen_samplers
from jaxgen.diffusion.forward import check_prediction_type
from jaxgen.diffusion.schedules import make_schedule
from torch_npu_backend.device import is_npu
from torch_npu_backend.precision import check_no_float64

__all__ = [
    "SAMPLERS",
    "SamplerSettings",
    "make_sample_fn",
    "make_scheduler",
    "sample",
    "sampler_settings",
]

# SampleConfig.sampler values that both jaxgen.sampling and this module run.
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras")
# diffusers' dynamic thresholding clamps its per-sample threshold to [1, sample_max_value], so a maximum of 1
# turns it into clipping to [-1, 1].
_CLIP_RANGE = 1.0


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Step count and DDIM step options of one `sample` run, the settings that the scheduler config lacks."""

    # Number of scheduler steps. For DDPM it is num_train_timesteps, because jaxgen runs the whole chain.
    num_steps: int
    eta: float = 0.0  # DDIM noise scale, 0 for the other samplers.
    use_clipped_model_output: bool = False  # DDIM: recompute eps from the clipped x0.


def _jaxgen_options(diffusion: DiffusionConfig, sample_config: SampleConfig) -> tuple[str, dict[str, Any]]:
    """Return jaxgen's sampler name and every keyword option it runs with: its defaults, then the config's."""
    if sample_config.sampler not in SAMPLERS:
        raise ValueError(
            f"sample.sampler={sample_config.sampler!r} is not supported by the torch backend; use one of "
            f"{', '.join(SAMPLERS)}, the samplers that jaxgen.sampling runs from a SampleConfig"
        )
    name = jaxgen_sampling.sampler_name(sample_config)
    parameters = inspect.signature(jaxgen_samplers.SAMPLERS[name]).parameters.values()
    options = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    options.update(jaxgen_sampling.sampler_options(sample_config))
    options["prediction_type"] = diffusion.prediction_type
    return name, options


def sampler_settings(diffusion: DiffusionConfig, sample_config: SampleConfig) -> SamplerSettings:
    """Return the step count and per-step options that jaxgen's sampler uses for these configs.

    Raises:
        ValueError: sample_config.sampler is not one of SAMPLERS, or sample_config.eta is outside [0, 1].
    """
    if not 0.0 <= sample_config.eta <= 1.0:
        raise ValueError(f"eta={sample_config.eta} is invalid; use a value in [0, 1] (0 is deterministic DDIM, "
                         "1 is DDPM-like)")
    name, options = _jaxgen_options(diffusion, sample_config)
    if name == "ddpm":
        num_steps = options["num_steps"] or diffusion.num_train_timesteps
        return SamplerSettings(num_steps=num_steps)
    if name == "ddim":
        return SamplerSettings(num_steps=options["num_steps"], eta=float(options["eta"]),
                               use_clipped_model_output=bool(options["use_clipped_model_output"]))
    return SamplerSettings(num_steps=options["num_steps"])


def _trained_betas(diffusion: DiffusionConfig) -> list[float]:
    """Return jaxgen's float32 betas as a list, rescaled when diffusion.rescale_zero_terminal_snr is set."""
    schedule = make_schedule(
        diffusion.schedule,
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        rescale_zero_terminal_snr=diffusion.rescale_zero_terminal_snr,
    )
    return np.asarray(schedule.betas, dtype=np.float32).tolist()


def _schedule_config(diffusion: DiffusionConfig, options: dict[str, Any]) -> dict[str, Any]:
    """Return the scheduler config keys that set the noise schedule, the grid and the prediction type."""
    return {
        "num_train_timesteps": diffusion.num_train_timesteps,
        "trained_betas": _trained_betas(diffusion),
        "prediction_type": options["prediction_type"],
        "timestep_spacing": options["spacing"],
        "steps_offset": options["steps_offset"],
    }


def _ddpm_scheduler(diffusion: DiffusionConfig, options: dict[str, Any]) -> DDPMScheduler:
    return DDPMScheduler(
        **_schedule_config(diffusion, options),
        rescale_betas_zero_snr=False,  # The trained betas are rescaled already.
        variance_type=options["variance_type"],
        clip_sample=bool(options["clip_sample"]),
        clip_sample_range=_CLIP_RANGE,
    )


def _ddim_scheduler(diffusion: DiffusionConfig, options: dict[str, Any]) -> DDIMScheduler:
    return DDIMScheduler(
        **_schedule_config(diffusion, options),
        rescale_betas_zero_snr=False,  # The trained betas are rescaled already.
        clip_sample=bool(options["clip_sample"]),
        clip_sample_range=_CLIP_RANGE,
        set_alpha_to_one=bool(options["set_alpha_to_one"]),
    )


def _dpm_solver_scheduler(diffusion: DiffusionConfig, options: dict[str, Any]) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        **_schedule_config(diffusion, options),
        # Sets the final alpha_bar to 2**-24 in place of 0; the betas are rescaled already, so they stay.
        rescale_betas_zero_snr=diffusion.rescale_zero_terminal_snr,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        use_karras_sigmas=bool(options["use_karras_sigmas"]),
        lower_order_final=bool(options["lower_order_final"]),
        final_sigmas_type=options["final_sigmas_type"],
        thresholding=bool(options["clip_sample"]),
        sample_max_value=_CLIP_RANGE,
    )


_BUILDERS: dict[str, Callable[[DiffusionConfig, dict[str, Any]], SchedulerMixin]] = {
    "ddpm": _ddpm_scheduler,
    "ddim": _ddim_scheduler,
    "dpmpp_2m": _dpm_solver_scheduler,
}


def _expected_timesteps(name: str, num_train_timesteps: int, num_steps: int, options: dict[str, Any]) -> np.ndarray:
    convention = "dpm_solver" if name == "dpmpp_2m" else "ddim"
    return jaxgen_samplers.make_timesteps(num_train_timesteps, num_steps, options["spacing"],
                                          options["steps_offset"], convention=convention)


def _check_grid(name: str, scheduler: SchedulerMixin, diffusion: DiffusionConfig, options: dict[str, Any],
                num_steps: int) -> None:
    """Raise ValueError unless the scheduler visits jaxgen's timesteps and steps between them as jaxgen does.

    DPM-Solver++ with Karras sigmas is not checked: its levels fall between training timesteps, and both
    backends round the interpolated timestep (see the module docstring).
    """
    if name == "dpmpp_2m" and options["use_karras_sigmas"]:
        return
    num_train_timesteps = diffusion.num_train_timesteps
    expected = _expected_timesteps(name, num_train_timesteps, num_steps, options)
    actual = scheduler.timesteps.cpu().numpy()
    grid = f"spacing={options['spacing']!r} with num_steps={num_steps} and num_train_timesteps={num_train_timesteps}"
    if not np.array_equal(actual, expected):
        raise ValueError(
            f"diffusers' {type(scheduler).__name__} builds another timestep grid than jaxgen's {name} for {grid} "
            f"(diffusers {actual.tolist()[:6]}..., jaxgen {expected.tolist()[:6]}...); choose another "
            "sample.spacing or sample.num_steps"
        )
    if name == "ddim":
        # diffusers' DDIM steps from t to t - T // N, and jaxgen's to the next grid timestep (-1 at the end).
        diffusers_previous = actual - num_train_timesteps // num_steps
        diffusers_previous[diffusers_previous < 0] = -1
        jaxgen_previous = np.append(expected[1:], -1)
        if not np.array_equal(diffusers_previous, jaxgen_previous):
            raise ValueError(
                f"diffusers' DDIMScheduler steps from t to t - {num_train_timesteps // num_steps}, which for {grid} "
                "is not the next timestep of the grid as in jaxgen's DDIM; use sample.spacing='leading', or "
                "'trailing' with a num_steps that divides num_train_timesteps"
            )


def make_scheduler(diffusion: DiffusionConfig, sample: SampleConfig) -> SchedulerMixin:
    """Build the diffusers scheduler that computes what jaxgen's sampler computes for these configs.

    | sample.sampler | scheduler |
    | --- | --- |
    | ddpm | DDPMScheduler, all training timesteps |
    | ddim | DDIMScheduler; `sample` passes eta and use_clipped_model_output to each step |
    | dpmpp_2m | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, midpoint) |
    | dpmpp_2m_karras | the same with use_karras_sigmas=True |

    The scheduler comes back with its timesteps set for `sampler_settings(diffusion, sample).num_steps`
    on the CPU. `sample` sets them again on the device of x_T.

    Raises:
        ValueError: sample.sampler is not one of SAMPLERS, or an option is invalid for jaxgen's sampler, such as
            an unknown spacing or prediction type or more steps than training timesteps. Also raised where
            diffusers' scheduler cannot follow jaxgen's timestep grid for that spacing and step count.
    """
    name, options = _jaxgen_options(diffusion, sample)
    num_steps = sampler_settings(diffusion, sample).num_steps
    # jaxgen's checks first, so an invalid option fails with jaxgen's message. make_timesteps checks the
    # spacing, steps_offset and num_steps.
    check_prediction_type(options["prediction_type"])
    _expected_timesteps(name, diffusion.num_train_timesteps, num_steps, options)

    scheduler = _BUILDERS[name](diffusion, options)
    scheduler.set_timesteps(num_steps)
    _check_grid(name, scheduler, diffusion, options, num_steps)
    return scheduler


def _guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   null_labels: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Run the model once on the batch, or once on [cond; null] with classifier-free guidance."""
    if null_labels is None:
        return model(x, t, labels)
    batch = x.shape[0]
    output = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]))
    out_cond, out_uncond = output[:batch], output[batch:]
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _model_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return default if parameter is None else parameter.dtype


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: SchedulerMixin,
    x_T: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float | None,
    null_label: int,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Run a diffusers scheduler's whole reverse loop from x_T, with classifier-free guidance, and return x_0.

    Each step calls `model(x_t [2B, C, H, W], t [2B], labels [2B])` once on the conditional and the null half
    of the batch and combines out_uncond + guidance_scale * (out_cond - out_uncond), as
    jaxgen.diffusion.guidance.cfg_model_fn does. With guidance_scale None the model runs once on `labels` alone.
    The loop runs on x_T's device. Its state is float32, or float64 when x_T is float64, as in jaxgen's
    samplers. The model gets its inputs in its parameters' dtype, and the result has x_T's dtype. x_0 is not
    clipped here, but `make_sample_fn` clips it.

    NOTE: only the CPU path has run. On CUDA and NPU the schedulers index CPU tables with device timesteps, as
    diffusers' pipelines do, and DPM-Solver++ clipping calls torch.quantile, which is untested on NPU.

    Args:
        model: a label-conditioned denoiser such as torch_npu_backend.models.LabelConditionedUNet.
        scheduler: from `make_scheduler`. Its timesteps and multistep state are reset here, so one scheduler
            serves many calls, one at a time.
        x_T: unit-variance noise [B, C, H, W].
        labels: class labels int64 [B].
        num_steps: number of scheduler steps, `sampler_settings(...).num_steps`.
        guidance_scale: s in out_uncond + s * (out_cond - out_uncond), or None for no guidance.
        null_label: the label of the learned unconditional class.
        generator: source of the noise of DDPM and DDIM with eta > 0; None uses torch's global generator.
        eta: DDIM's noise scale in [0, 1]; must be 0 for the other schedulers.
        use_clipped_model_output: DDIM only: recompute eps from the clipped x0.

    Raises:
        ValueError: labels do not match x_T's batch, eta is outside [0, 1], or eta or use_clipped_model_output
            is set for a scheduler other than DDIMScheduler.
        TypeError: a tensor or the model is float64 and x_T is on an NPU.
    """
    if labels.shape != (x_T.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but x_T has batch size {x_T.shape[0]}; pass one "
                         "label per image")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
    # Every scheduler's step takes a generator; only stochastic steps draw from it.
    step_options: dict[str, Any] = {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):
        step_options.update(eta=eta, use_clipped_model_output=use_clipped_model_output)
    elif eta != 0.0 or use_clipped_model_output:
        raise ValueError(f"eta={eta} and use_clipped_model_output={use_clipped_model_output} are DDIM options, but "
                         f"the scheduler is {type(scheduler).__name__}; leave them at 0.0 and False")

    device = x_T.device
    if is_npu(device):
        check_no_float64({"model": model, "x_T": x_T}, "sample inputs")
    state_dtype = torch.promote_types(x_T.dtype, torch.float32)
    model_dtype = _model_dtype(model, state_dtype)
    labels = labels.to(device)
    null_labels = None if guidance_scale is None else torch.full_like(labels, null_label)

    scheduler.set_timesteps(num_steps, device=device)
    x = x_T.to(state_dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).to(model_dtype)
        t_batch = t.expand(x.shape[0])
        output = _guided_output(model, model_input, t_batch, labels, null_labels, guidance_scale).to(state_dtype)
        x = scheduler.step(output, t, x, **step_options).prev_sample
    return x.to(x_T.dtype)


def make_sample_fn(
    config: Config, model: nn.Module, sample_config: SampleConfig | None = None
) -> Callable[..., torch.Tensor]:
    """Build `draw(x_T, labels, guidance_scale, generator=None) -> x_0`, torch's jaxgen.sampling.make_sample_fn.

    `draw` takes noise x_T [B, C, H, W] and labels int64 [B] on the model's device and returns images
    [B, C, H, W] clipped to [-1, 1]. It always runs the guided, batched forward, also for scales 0 and 1, as
    jaxgen's function does by default. The sampler comes from `sample_config`, or `config.sample` when None.
    The model is switched to eval mode. The null label is the model's `null_label`, or
    config.model.num_class_embeds - 1 for a model without one.

    Raises:
        ValueError: from `make_scheduler`, for a sampler or an option that it cannot set up.
    """
    sample_config = config.sample if sample_config is None else sample_config
    scheduler = make_scheduler(config.diffusion, sample_config)
    settings = sampler_settings(config.diffusion, sample_config)
    null_label = getattr(model, "null_label", None)
    if null_label is None:
        null_label = config.model.num_class_embeds - 1
    model.eval()

    def draw(x_T: torch.Tensor, labels: torch.Tensor, guidance_scale: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
        x_0 = sample(model, scheduler, x_T, labels, num_steps=settings.num_steps, guidance_scale=float(guidance_scale),
                     null_label=null_label, generator=generator, eta=settings.eta,
                     use_clipped_model_output=settings.use_clipped_model_output)
        return x_0.clamp(-1.0, 1.0)

    return draw
