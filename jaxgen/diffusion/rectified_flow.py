"""Rectified flow: the straight-line forward process, training timesteps, the velocity loss and an Euler sampler.

Forward process (Liu et al. 2022, "Flow Straight and Fast", and Esser et al. 2024, "Scaling
Rectified Flow Transformers"): x_t = (1 - t) * x_0 + t * eps with t in [0, 1], so t = 0 is data and t = 1 is pure
noise. The ODE dx/dt = eps - x_0 moves along that line, and the model learns its velocity.

Velocity conventions (``velocity_convention``):
  "noise_minus_data"  v = eps - x_0 = dx/dt, the default. diffusers 0.42's
                      FlowMatchEulerDiscreteScheduler (Stable Diffusion 3) uses this sign.
  "data_minus_noise"  v = x_0 - eps = -dx/dt. Open-Sora 1.2's RFLOW trains on this target
                      (``x_start - noise`` in opensora/schedulers/rf/rectified_flow.py, tag v1.2.0), so a
                      model with Open-Sora 1.2 weights needs this setting.

What the model receives: ``model_fn(x_t, t * timestep_scale, cond)`` with the time as float32 [B].
Open-Sora 1.2 scales t by num_timesteps = 1000, so its model receives a float in [0, 1000] (1000 is
pure noise), not an integer index. rf_euler_sample applies timestep_scale (1000 by default) itself. For
training, rf_sample_timesteps returns t in [0, 1] and the caller passes t * 1000 to the model.

Timestep shift: shift_timesteps maps t to shift * t / (1 + (shift - 1) * t), which moves timesteps
towards the noise end for shift > 1 and is the identity for shift = 1. Open-Sora 1.2 sets shift from
the video size (see resolution_shift) and applies it both to training timesteps and to the sampling
grid. Its sampling always uses scale 1 (resolution_shift's scale argument), and its v1.2.0 training
configs keep the default of 1 as well.

Open-Sora 1.2 settings: velocity_convention="data_minus_noise", timestep_scale=1000 and
shift=resolution_shift(height, width, num_frames) with the pixel size of the generated video.
Open-Sora's STDiT outputs twice the latent channels and its sampler keeps the first half, so a
model_fn for it must return only that half, the velocity.

Shapes: B is the batch size. x_0, x_t, eps and velocities are [B, ...] (video [B, T, H, W, C]),
t is float [B] (or a scalar where stated), and shift is a scalar or [B].

NOTE: Open-Sora 1.2's video-to-video mask (conditioning frames kept clean while sampling) and its
discrete-timestep option are not implemented here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.forward import broadcast_to_sample
from jaxgen.diffusion.samplers import ModelFn, _check_choice, _check_start_step, _state_dtype

VELOCITY_CONVENTIONS = ("noise_minus_data", "data_minus_noise")
TIMESTEP_SAMPLING_METHODS = ("uniform", "logit_normal")

# Open-Sora 1.2's reference size for the timestep shift: 512 x 512 pixels and one latent frame.
OPENSORA_BASE_RESOLUTION = 512 * 512
OPENSORA_BASE_NUM_FRAMES = 1
# Open-Sora 1.2's video VAE turns every 17 pixel frames into 5 latent frames, and its timestep shift
# counts latent frames as num_frames // 17 * 5.
OPENSORA_FRAMES_PER_CHUNK = 17
OPENSORA_LATENT_FRAMES_PER_CHUNK = 5


# ----------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------


def _concrete_values(value: Any) -> np.ndarray | None:
    """Return value as a NumPy array, or None when it is traced and has no concrete value yet."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_positive(name: str, value: Any, hint: str) -> None:
    """Raise ValueError if a concrete value (scalar or array) has an entry that is not positive and finite."""
    values = _concrete_values(value)
    if values is None:
        return
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ValueError(f"{name} must be positive and finite, got {bad.ravel()[0]}; {hint}")


def _expand_leading(mask: jax.Array, x: jax.Array, name: str) -> jax.Array:
    """Reshape a mask over x's leading axes (for example [B] or a frame mask [B, T]) to broadcast against x."""
    mask = jnp.asarray(mask)
    if mask.ndim == 0 or mask.shape != x.shape[: mask.ndim]:
        raise ValueError(
            f"{name} has shape {mask.shape}, which does not match the leading axes of the sample's shape "
            f"{x.shape}; pass a mask of shape [B] or [B, T] (frames), or one of the sample's full shape."
        )
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _per_example(value: Any, batch_size: int, name: str) -> jax.Array:
    """Broadcast a scalar or [B] value to [B] float32, naming the value if its shape is neither."""
    value = jnp.asarray(value, dtype=jnp.float32)
    if value.shape not in ((), (batch_size,)):
        raise ValueError(
            f"{name} has shape {value.shape}; pass a scalar or one value per example, shape ({batch_size},)."
        )
    return jnp.broadcast_to(value, (batch_size,))


# ----------------------------------------------------------------------------------------------
# Forward process and training target.
# ----------------------------------------------------------------------------------------------


def rf_add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Compute x_t = (1 - t) * x_0 + t * eps, the point at time t on the straight path from data to noise.

    t is a scalar or [B] in [0, 1]. mask, if given, is boolean over x0's leading axes, for example a
    frame mask [B, T] for video [B, T, H, W, C]. Entries where it is False keep x_0 unnoised. Open-Sora
    1.2 does this for the conditioning frames of image- and video-conditioned training.

    Raises:
      ValueError: x0 and noise differ in shape, or mask does not match x0's leading axes.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {x0.shape} but noise has shape {noise.shape}; pass equal shapes.")
    t = broadcast_to_sample(jnp.asarray(t, dtype=jnp.result_type(x0, noise)), x0)
    x_t = (1.0 - t) * x0 + t * noise
    if mask is None:
        return x_t
    return jnp.where(_expand_leading(mask, x0, "mask").astype(bool), x_t, x0)


def rf_velocity_target(
    x0: jax.Array, noise: jax.Array, *, velocity_convention: str = "noise_minus_data"
) -> jax.Array:
    """Compute the velocity target: eps - x_0 ("noise_minus_data") or x_0 - eps ("data_minus_noise")."""
    _check_choice("velocity_convention", velocity_convention, VELOCITY_CONVENTIONS)
    if velocity_convention == "noise_minus_data":
        return noise - x0
    return x0 - noise


def rf_loss(
    model_output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    *,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    velocity_convention: str = "noise_minus_data",
) -> jax.Array:
    """Compute the per-example mean squared error [B] between the model's velocity and the target.

    The squared error is averaged over all axes but the batch axis, in float32. mask, if given, is a
    boolean or 0/1 array over the sample's leading axes (for example frames [B, T]) or of its full
    shape. The mean then runs only over the entries where it is set, as Open-Sora 1.2's loss does over
    the noised frames. An example whose mask is all zero gets loss 0. weights, a scalar or [B],
    multiply each example's loss. Average the result over the batch for a scalar loss.

    Raises:
      ValueError: shapes of model_output, x0 and noise differ, or mask or weights have an invalid
        shape, or velocity_convention is unknown.
    """
    if model_output.shape != x0.shape:
        raise ValueError(
            f"model_output has shape {model_output.shape} but x0 has shape {x0.shape}; the model must "
            "return one velocity per sample entry (drop any learned-variance channels first)."
        )
    target = rf_velocity_target(x0, noise, velocity_convention=velocity_convention)
    error = (model_output.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    batch_size = error.shape[0]

    if mask is None:
        per_example = jnp.mean(error.reshape(batch_size, -1), axis=1)
    else:
        mask = _expand_leading(mask, error, "mask").astype(jnp.float32)
        mask = jnp.broadcast_to(mask, error.shape)
        total = jnp.sum((error * mask).reshape(batch_size, -1), axis=1)
        count = jnp.sum(mask.reshape(batch_size, -1), axis=1)
        per_example = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

    if weights is None:
        return per_example
    return _per_example(weights, batch_size, "weights") * per_example


# ----------------------------------------------------------------------------------------------
# Timestep shift and training timesteps.
# ----------------------------------------------------------------------------------------------


def shift_timesteps(t: jax.Array, shift: float | jax.Array) -> jax.Array:
    """Shift timesteps t in [0, 1] to shift * t / (1 + (shift - 1) * t).

    The map keeps 0 and 1 fixed, is the identity for shift = 1 and moves t towards 1 (more noise)
    for shift > 1. t and shift broadcast against each other (for example t [N, 1] and shift [B]).

    Raises:
      ValueError: a concrete shift is not positive and finite.
    """
    _check_positive("shift", shift, "1.0 leaves timesteps unchanged and resolution_shift gives Open-Sora 1.2's.")
    t = jnp.asarray(t)
    shift = jnp.asarray(shift, dtype=jnp.promote_types(t.dtype, jnp.float32))
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    height: float | jax.Array,
    width: float | jax.Array,
    num_frames: int | jax.Array,
    *,
    base_resolution: float = OPENSORA_BASE_RESOLUTION,
    base_num_frames: float = OPENSORA_BASE_NUM_FRAMES,
    scale: float = 1.0,
    frames_per_chunk: int = OPENSORA_FRAMES_PER_CHUNK,
    latent_frames_per_chunk: int = OPENSORA_LATENT_FRAMES_PER_CHUNK,
) -> jax.Array:
    """Compute Open-Sora 1.2's size-dependent timestep shift for videos of the given pixel size.

    shift = sqrt(height * width / base_resolution) * sqrt(latent_frames / base_num_frames) * scale,
    where latent_frames is 1 for an image (num_frames == 1) and otherwise
    num_frames // frames_per_chunk * latent_frames_per_chunk (17 pixel frames to 5 latent frames in
    Open-Sora 1.2's VAE). This is Open-Sora's timestep_transform ratio (tag v1.2.0). The shift is 1 at
    512 x 512 pixels and one frame. height, width and num_frames are scalars or [B] arrays, and the
    result has their broadcast shape, float32.

    Open-Sora decides between image and video from the first example of the batch, but this function
    decides per example. The two agree on batches where all examples have the same size.

    Raises:
      ValueError: a concrete height, width, num_frames, base size or scale is not positive, or a
        concrete num_frames between 2 and frames_per_chunk - 1 gives no latent frames.
    """
    for name, value in (
        ("height", height),
        ("width", width),
        ("num_frames", num_frames),
        ("base_resolution", base_resolution),
        ("base_num_frames", base_num_frames),
        ("scale", scale),
        ("frames_per_chunk", frames_per_chunk),
        ("latent_frames_per_chunk", latent_frames_per_chunk),
    ):
        _check_positive(name, value, "pass the video's size in pixels and frames.")
    frames = _concrete_values(num_frames)
    if frames is not None:
        too_short = frames[(frames > 1) & (frames < frames_per_chunk)]
        if too_short.size:
            raise ValueError(
                f"num_frames={int(too_short.ravel()[0])} gives 0 latent frames with {frames_per_chunk} pixel "
                f"frames per latent chunk, so the shift would be 0; use 1 frame (an image) or at least "
                f"{frames_per_chunk}."
            )

    height = jnp.asarray(height, jnp.float32)
    width = jnp.asarray(width, jnp.float32)
    num_frames = jnp.asarray(num_frames)
    # NOTE: a traced num_frames between 2 and frames_per_chunk - 1 is not rejected and gives shift 0.
    latent_frames = jnp.where(
        num_frames == 1, 1, num_frames // frames_per_chunk * latent_frames_per_chunk
    ).astype(jnp.float32)
    space_ratio = jnp.sqrt(height * width / base_resolution)
    time_ratio = jnp.sqrt(latent_frames / base_num_frames)
    return space_ratio * time_ratio * scale


def rf_sample_timesteps(
    key: jax.Array,
    batch_size: int,
    *,
    method: str = "uniform",
    mean: float | jax.Array = 0.0,
    std: float | jax.Array = 1.0,
    shift: float | jax.Array = 1.0,
) -> jax.Array:
    """Draw training timesteps t in [0, 1], float32 [B], then apply shift_timesteps(t, shift).

    Methods:
      "uniform": t ~ U[0, 1).
      "logit_normal": t = sigmoid(u) with u ~ N(mean, std^2) (Esser et al. 2024), the method of
        Open-Sora 1.2's training configs with mean 0 and std 1. mean and std apply only here.
    shift is a scalar or [B], for example resolution_shift of each example's size. Open-Sora 1.2
    also shifts after drawing. Pass t * 1000 to an Open-Sora model.

    Raises:
      ValueError: method is unknown, or a concrete std or shift is not positive, or shift is not a
        scalar or [B].
    """
    _check_choice("method", method, TIMESTEP_SAMPLING_METHODS)
    _check_positive("std", std, "1.0 is Open-Sora 1.2's value.")
    shift = _per_example(shift, batch_size, "shift")
    if method == "uniform":
        t = jax.random.uniform(key, (batch_size,), jnp.float32)
    else:
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))
    return shift_timesteps(t, shift)


# ----------------------------------------------------------------------------------------------
# Euler sampler.
# ----------------------------------------------------------------------------------------------


def rf_timestep_grid(num_steps: int, shift: float | jax.Array = 1.0) -> jax.Array:
    """Return the sampling grid t_0 = 1 > t_1 > ... > t_N = 0, float32 [N + 1] + shift's shape.

    The grid is shift_timesteps(1 - i / N, shift) for i = 0, ..., N, the points of Open-Sora 1.2's
    RFLOW sampler (which lists the first N and steps from the last to 0). A [B] shift gives one
    column per example, [N + 1, B].

    Raises:
      ValueError: num_steps is below 1 or a concrete shift is not positive.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(
            f"num_steps must be a Python int of at least 1 (it sets the loop length), got {num_steps!r}."
        )
    shift = jnp.asarray(shift, jnp.float32)
    base = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    return shift_timesteps(jnp.asarray(base).reshape((-1,) + (1,) * shift.ndim), shift)


def rf_euler_step(
    velocity: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_next: jax.Array,
    *,
    velocity_convention: str = "noise_minus_data",
) -> jax.Array:
    """Take one Euler step of dx/dt from time t to t_next: x_next = x_t + (t_next - t) * dx/dt.

    dx/dt is velocity for "noise_minus_data" and -velocity for "data_minus_noise". t and t_next are
    scalars or [B] in [0, 1]. A sampler goes from t = 1 towards 0, so t_next - t is negative.
    """
    _check_choice("velocity_convention", velocity_convention, VELOCITY_CONVENTIONS)
    dt = broadcast_to_sample(jnp.asarray(t_next - t, x_t.dtype), x_t)
    if velocity_convention == "data_minus_noise":
        velocity = -velocity
    return x_t + dt * velocity.astype(x_t.dtype)


def rf_euler_sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    key: jax.Array | None = None,
    cond: Any = None,
    *,
    num_steps: int,
    shift: float | jax.Array = 1.0,
    timestep_scale: float = 1000.0,
    velocity_convention: str = "noise_minus_data",
    start_step: int = 0,
) -> jax.Array:
    """Sample a rectified-flow model with Euler's method from t = 1 (noise x_T) to t = 0.

    Step i calls ``model_fn(x, t_i * timestep_scale, cond)`` with float32 times [B] on the grid of
    rf_timestep_grid(num_steps, shift), then moves x to t_{i+1}. With velocity_convention=
    "data_minus_noise", timestep_scale=1000 and shift=resolution_shift(height, width, num_frames)
    this is Open-Sora 1.2's RFLOW sampler. Guidance belongs in model_fn, for example
    cfg_model_fn(model_fn, 7.0, null_cond) for Open-Sora 1.2's default scale.

    key is unused because the Euler ODE sampler adds no noise, and it may be None. The argument keeps
    the argument order of the samplers in samplers.py. The loop is one lax.scan, so
    ``jax.jit(functools.partial(rf_euler_sample, model_fn, num_steps=30))(x_T, None, cond)`` compiles
    one program, and shift may be traced. The loop state is float32 (float64 for float64 input) and
    the result has x_T's dtype.

    start_step > 0 skips the first grid steps. x_T is then the sample at t = grid[start_step], which
    rf_add_noise(x0, noise, rf_timestep_grid(num_steps, shift)[start_step]) builds from clean data.

    Raises:
      ValueError: num_steps is below 1, shift is not a scalar or [B] or is not positive,
        timestep_scale is not positive, velocity_convention is unknown, or start_step is outside
        [0, num_steps).
      TypeError: start_step is not a Python int.
    """
    del key  # The Euler ODE sampler is deterministic.
    _check_choice("velocity_convention", velocity_convention, VELOCITY_CONVENTIONS)
    _check_positive("timestep_scale", timestep_scale, "Open-Sora 1.2 models take t * 1000.")
    grid = rf_timestep_grid(num_steps, _per_example(shift, x_T.shape[0], "shift"))  # [N + 1, B]
    _check_start_step(start_step, num_steps)
    x = x_T.astype(_state_dtype(x_T))

    def body(x, step_times):
        t, t_next = step_times  # [B] each.
        velocity = model_fn(x, t * jnp.asarray(timestep_scale, jnp.float32), cond)
        x_next = rf_euler_step(velocity, x, t, t_next, velocity_convention=velocity_convention)
        return x_next.astype(x.dtype), None

    x, _ = jax.lax.scan(body, x, (grid[start_step:-1], grid[start_step + 1 :]))
    return x.astype(x_T.dtype)
