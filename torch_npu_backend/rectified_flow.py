"""Rectified-flow Euler sampling in torch, the twin of the sampler in `jaxgen.diffusion.rectified_flow`.

The grid, the timestep shift, the velocity conventions and the model's time input are jaxgen's:

- Grid: t_i = shift_timesteps(1 - i / N, shift) for i = 0, ..., N, float32, so t_0 = 1 (pure noise, up to one
  float32 rounding) and t_N = 0 (data). The unshifted points come from the same float32 `np.linspace` as jaxgen's.
- Shift: shift * t / (1 + (shift - 1) * t). Open-Sora 1.2 takes shift from the video's pixel size, which
  `jaxgen.diffusion.rectified_flow.resolution_shift` computes. Pass its value here as a float or a [B] tensor.
- Velocity conventions: "noise_minus_data" (v = eps - x_0 = dx/dt) and "data_minus_noise" (v = x_0 - eps, the
  target of Open-Sora 1.2's RFLOW).
- Model input: `model_fn(x, t * timestep_scale, cond)` with float32 times [B]. Open-Sora 1.2 uses
  timestep_scale 1000.

`stdit_velocity_fn` builds the model function of Open-Sora 1.2's RFLOW sampler for the STDiT3 twin in
`torch_npu_backend.stdit3`: classifier-free guidance over one batch of conditional and null captions, and the
first `in_channels` output channels as the velocity. So Open-Sora 1.2's text-to-video sampling is

    shift = float(resolution_shift(height, width, num_frames))
    velocity = stdit_velocity_fn(model, y, mask, None, 7.0, fps, height, width)
    with torch.inference_mode():
        z = rf_euler_sample(velocity, x_T, None, num_steps=30, shift=shift, velocity_convention="data_minus_noise")

The loop state is float32 whatever the dtype of x_T, because float64 is unavailable on Ascend NPUs. Results
then differ from jaxgen's float64 path for float64 input.

Shapes: B is the batch size. Samples are [B, ...], for STDiT3 channels-first video latents [B, C, T, H, W].
Times t are float32 [B]. Captions are [B, 1, L, E] with a text mask [B, L].

NOTE: Open-Sora 1.2's video-to-video mask (conditioning frames kept clean while sampling) and its
discrete-timestep option are not implemented, as in jaxgen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxgen.diffusion.rectified_flow import VELOCITY_CONVENTIONS

__all__ = [
    "TorchModelFn",
    "rf_euler_sample",
    "rf_euler_step",
    "rf_timestep_grid",
    "shift_timesteps",
    "stdit_velocity_fn",
]

# model_fn(x_t [B, ...], model time float32 [B], cond) -> velocity [B, ...].
TorchModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ----- input checks --------------------------------------------------------------------------------------


def _check_convention(velocity_convention: str) -> None:
    if velocity_convention not in VELOCITY_CONVENTIONS:
        raise ValueError(
            f"Unknown velocity_convention {velocity_convention!r}; use one of {', '.join(VELOCITY_CONVENTIONS)}."
        )


def _check_positive(name: str, value: float | torch.Tensor, hint: str) -> None:
    """Raise ValueError if a number or a tensor has an entry that is not positive and finite.

    A tensor on an accelerator is copied to the host for the check, which waits for the device once.
    """
    if isinstance(value, torch.Tensor):
        values = value.detach().to("cpu", torch.float64)
    else:
        values = torch.as_tensor(value, dtype=torch.float64)
    bad = values[~(torch.isfinite(values) & (values > 0))]
    if bad.numel():
        raise ValueError(f"{name} must be positive and finite, got {bad.reshape(-1)[0].item()}; {hint}")


def _check_int(name: str, value: Any, low: int, high: int | None, hint: str) -> None:
    """Raise unless value is a Python int in [low, high), or at least low when high is None."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {value!r}; {hint}")
    if value < low or (high is not None and value >= high):
        upper = "" if high is None else f" and below {high}"
        raise ValueError(f"{name} must be at least {low}{upper}, got {value}; {hint}")


def _per_example(value: float | torch.Tensor, batch_size: int, name: str, device: torch.device) -> torch.Tensor:
    """Broadcast a number or a [B] tensor to float32 [B] on `device`, naming the value if its shape is neither."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
    if tensor.shape not in (torch.Size([]), torch.Size([batch_size])):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}; pass a number or one value per example, shape ({batch_size},)."
        )
    return tensor.expand(batch_size)


def _to_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-example values [B] to [B, 1, ..., 1] so they broadcast against a sample [B, ...]."""
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


# ----- grid and Euler step -------------------------------------------------------------------------------


def shift_timesteps(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Shift timesteps t in [0, 1] to shift * t / (1 + (shift - 1) * t), in float32.

    The map keeps 0 and 1 fixed, is the identity for shift = 1 and moves t towards 1 (more noise) for
    shift > 1. t and shift broadcast against each other, for example t [N, 1] and shift [B].

    Raises:
      ValueError: shift is not positive and finite.
    """
    _check_positive("shift", shift, "1.0 leaves timesteps unchanged and resolution_shift gives Open-Sora 1.2's.")
    t = torch.as_tensor(t, dtype=torch.float32)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=t.device)
    return shift * t / (1.0 + (shift - 1.0) * t)


def rf_timestep_grid(
    num_steps: int, shift: float | torch.Tensor = 1.0, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the sampling grid t_0 = 1 > t_1 > ... > t_N = 0, float32 [N + 1] + shift's shape.

    The grid is shift_timesteps(1 - i / N, shift) for i = 0, ..., N, as jaxgen's rf_timestep_grid. A [B]
    shift gives one column per example, [N + 1, B]. The grid is on `device`, or on shift's device when
    `device` is None and shift is a tensor.

    Raises:
      TypeError: num_steps is not a Python int.
      ValueError: num_steps is below 1, or shift is not positive and finite.
    """
    _check_int("num_steps", num_steps, 1, None, "it sets the number of model calls.")
    if device is None and isinstance(shift, torch.Tensor):
        device = shift.device
    shift = torch.as_tensor(shift, dtype=torch.float32, device=device)
    base = torch.from_numpy(np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)).to(shift.device)
    return shift_timesteps(base.reshape((-1,) + (1,) * shift.ndim), shift)


def rf_euler_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    *,
    velocity_convention: str = "noise_minus_data",
) -> torch.Tensor:
    """Take one Euler step of dx/dt from time t to t_next: x_next = x_t + (t_next - t) * dx/dt.

    dx/dt is velocity for "noise_minus_data" and -velocity for "data_minus_noise". t and t_next are
    numbers or [B] tensors in [0, 1]. A sampler goes from t = 1 towards 0, so t_next - t is negative.
    The result has x_t's dtype.

    Raises:
      ValueError: velocity_convention is unknown.
    """
    _check_convention(velocity_convention)
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    t_next = torch.as_tensor(t_next, dtype=x_t.dtype, device=x_t.device)
    dt = _to_sample(t_next - t, x_t)
    if velocity_convention == "data_minus_noise":
        velocity = -velocity
    return x_t + dt * velocity.to(x_t.dtype)


def rf_euler_sample(
    model_fn: TorchModelFn,
    x_T: torch.Tensor,
    cond: Any = None,
    *,
    num_steps: int,
    shift: float | torch.Tensor = 1.0,
    timestep_scale: float = 1000.0,
    velocity_convention: str = "noise_minus_data",
    start_step: int = 0,
) -> torch.Tensor:
    """Sample a rectified-flow model with Euler's method from t = 1 (noise x_T) to t = 0.

    Step i calls ``model_fn(x, t_i * timestep_scale, cond)`` with float32 times [B] on the grid of
    rf_timestep_grid(num_steps, shift), then moves x to t_{i+1}. With velocity_convention="data_minus_noise",
    timestep_scale=1000 and shift=resolution_shift(height, width, num_frames), this is Open-Sora 1.2's RFLOW
    sampler. Guidance belongs in model_fn, as in stdit_velocity_fn.

    start_step > 0 skips the first grid steps. x_T is then the sample at t = grid[start_step].

    The loop state is float32 and the result has x_T's dtype. The loop records autograd history unless the
    caller runs it under torch.no_grad() or torch.inference_mode().

    Raises:
      TypeError: num_steps or start_step is not a Python int.
      ValueError: num_steps is below 1, start_step is outside [0, num_steps), shift is not a number or [B]
        or is not positive, timestep_scale is not positive, or velocity_convention is unknown.
    """
    _check_convention(velocity_convention)
    _check_positive("timestep_scale", timestep_scale, "Open-Sora 1.2 models take t * 1000.")
    _check_int("num_steps", num_steps, 1, None, "it sets the number of model calls.")
    _check_int("start_step", start_step, 0, num_steps, f"0 runs all {num_steps} steps.")
    shift = _per_example(shift, x_T.shape[0], "shift", x_T.device)
    grid = rf_timestep_grid(num_steps, shift)  # [N + 1, B]
    scale = torch.tensor(timestep_scale, dtype=torch.float32, device=x_T.device)

    x = x_T.to(torch.float32)
    for i in range(start_step, num_steps):
        t, t_next = grid[i], grid[i + 1]
        velocity = model_fn(x, t * scale, cond)
        x = rf_euler_step(velocity, x, t, t_next, velocity_convention=velocity_convention)
    return x.to(x_T.dtype)


# ----- Open-Sora 1.2's guided STDiT3 velocity ------------------------------------------------------------


def _repeat_for_both_halves(
    value: float | torch.Tensor, batch_size: int, name: str, device: torch.device
) -> torch.Tensor:
    """Return a number or a [B] tensor as float32 [2B]: the values of the conditional half, then of the null half."""
    per_example = _per_example(value, batch_size, name, device)
    return torch.cat([per_example, per_example])


def stdit_velocity_fn(
    model: nn.Module,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    null_y: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    fps: float | torch.Tensor,
    height: float | torch.Tensor,
    width: float | torch.Tensor,
) -> TorchModelFn:
    """Build the classifier-free-guided velocity function of Open-Sora 1.2's RFLOW sampler for an STDiT3 twin.

    Each call ``velocity(x, t, None)`` runs the model once on the doubled batch [x; x] at times [t; t]. Its
    captions are [y; null_y] and its text mask is [mask; mask]. So the null half keeps the prompt's mask, as
    in Open-Sora 1.2, which repeats the mask over the doubled batch. The velocity is the first in_channels
    output channels, because a pred_sigma model also outputs as many variance channels. The result is
    v_uncond + guidance_scale * (v_cond - v_uncond), float32 [B, in_channels, T, H, W].

    Args:
        model: a `torch_npu_backend.stdit3.STDiT3`, channels-first.
        y: caption features [B, 1, L, caption_channels].
        mask: [B, L], nonzero for the tokens to attend to, or None to attend to all L.
        null_y: the null caption, [B, 1, L, caption_channels] or [1, 1, L, caption_channels], or None
            for the model's learned one (`model.null_caption`), which Open-Sora 1.2 uses.
        guidance_scale: a number or [B]. 1 returns the conditional velocity and 0 the unconditional one.
        fps: frames per second, a number or [B].
        height, width: the video's pixel size, numbers or [B]. Only the first example's size counts, as in
            Open-Sora.

    Raises:
        ValueError: y is not [B, 1, L, E], null_y does not broadcast to y, or guidance_scale, fps, height or
            width is neither a number nor [B]. The returned function raises ValueError when x's batch size
            differs from y's or when it gets a condition, because the captions are already bound here.
    """
    if y.ndim != 4 or y.shape[1] != 1:
        raise ValueError(
            f"y has shape {tuple(y.shape)}; pass caption features [B, 1, L, E], adding the axis with y[:, None] "
            "if y is [B, L, E]."
        )
    batch_size, device = y.shape[0], y.device
    if null_y is None:
        null_y = model.null_caption(batch_size)
    try:
        null_y = null_y.to(device=device, dtype=y.dtype).expand_as(y)
    except RuntimeError as error:
        raise ValueError(
            f"null_y of shape {tuple(null_y.shape)} does not broadcast to y's shape {tuple(y.shape)}; pass one "
            "null caption per example or one shared by all, or None for the model's own."
        ) from error

    captions = torch.cat([y, null_y])
    both_mask = None if mask is None else torch.cat([mask, mask]).to(device)
    sizes = {
        name: _repeat_for_both_halves(value, batch_size, name, device)
        for name, value in (("fps", fps), ("height", height), ("width", width))
    }
    scale = _per_example(guidance_scale, batch_size, "guidance_scale", device)
    channels = model.config.in_channels

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if cond is not None:
            raise ValueError(
                "the STDiT3 velocity function binds its captions in stdit_velocity_fn, so it takes no condition; "
                f"pass cond=None to rf_euler_sample, got a {type(cond).__name__}."
            )
        if x.shape[0] != batch_size:
            raise ValueError(
                f"x has batch size {x.shape[0]} but the captions have {batch_size}; pass one caption per sample."
            )
        output = model(torch.cat([x, x]), torch.cat([t, t]), captions, both_mask, **sizes)
        v_cond, v_uncond = output[:, :channels].float().chunk(2)
        return v_uncond + _to_sample(scale, v_cond) * (v_cond - v_uncond)

    return velocity
