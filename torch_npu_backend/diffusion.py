"""Diffusion training objective of the PyTorch backend: the noise schedule, q(x_t | x_0) and the losses.

This mirrors `jaxgen.diffusion.forward` in torch, channels-first. The schedule is built by jaxgen's own
`make_schedule` and copied into torch tensors, so both backends train against the same float32
alpha_bar values.

Shapes: B is the batch size, images are [B, C, H, W], t is int64 [B].
Symbols: alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), so
x_t = alpha_t * x_0 + sigma_t * eps, and the velocity (Salimans & Ho 2022) is v = alpha_t * eps - sigma_t * x_0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from jaxgen.config import Config
from jaxgen.diffusion.forward import check_prediction_type
from jaxgen.diffusion.schedules import make_schedule

__all__ = [
    "NoiseDraw",
    "TorchNoiseSchedule",
    "diffusion_loss",
    "draw_noise",
    "drop_labels",
    "q_sample",
    "schedule_from_config",
    "step_generator",
    "training_loss",
    "velocity_target",
]


@dataclasses.dataclass(frozen=True)
class TorchNoiseSchedule:
    """A variance-preserving noise schedule as float32 torch tensors of shape [T]."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        """Number T of training timesteps."""
        return self.betas.shape[0]

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) [T], inf where alpha_bar_t == 1."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def to(self, device: torch.device | str) -> TorchNoiseSchedule:
        """Return the schedule with its tensors on `device`."""
        return TorchNoiseSchedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t of any shape."""
        alpha_bar = self.alphas_cumprod[t]
        return torch.sqrt(alpha_bar), torch.sqrt(1.0 - alpha_bar)


def schedule_from_config(config: Config) -> TorchNoiseSchedule:
    """Build the noise schedule of a diffusion config on the CPU, with jaxgen's `make_schedule`."""
    d = config.diffusion
    schedule = make_schedule(
        d.schedule,
        num_train_timesteps=d.num_train_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        rescale_zero_terminal_snr=d.rescale_zero_terminal_snr,
    )
    return TorchNoiseSchedule(
        betas=torch.from_numpy(np.array(schedule.betas, dtype=np.float32)),
        alphas_cumprod=torch.from_numpy(np.array(schedule.alphas_cumprod, dtype=np.float32)),
    )


def _per_example(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example [B] coefficient so that it broadcasts against x [B, ...]."""
    return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))


def q_sample(schedule: TorchNoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with the given noise (Ho et al. 2020)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return _per_example(alpha, x0) * x0 + _per_example(sigma, x0) * noise


def velocity_target(schedule: TorchNoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """Compute the v-prediction target v = alpha_t * eps - sigma_t * x_0 (Salimans & Ho 2022)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return _per_example(alpha, x0) * noise - _per_example(sigma, x0) * x0


def _min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Weight each example's loss by min-SNR-gamma (Hang et al. 2023), as jaxgen's `min_snr_weight` does."""
    if prediction_type == "epsilon":
        return gamma / torch.clamp(snr, min=gamma)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(
    schedule: TorchNoiseSchedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Compute the per-example mean squared error [B] of a diffusion model's output, in float32.

    The target is the noise for "epsilon", `velocity_target` for "v_prediction" and x0 for "sample". With
    min_snr_gamma, each example is weighted by its min-SNR-gamma weight, as in jaxgen's `diffusion_loss`.

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

    error = (model_output.float() - target.float()) ** 2
    per_example = error.reshape(error.shape[0], -1).mean(dim=1)
    if min_snr_gamma is None:
        return per_example
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive (5.0 is the usual value), got {min_snr_gamma}.")
    return _min_snr_weight(schedule.snr[t], min_snr_gamma, prediction_type) * per_example


def drop_labels(labels: torch.Tensor, null_label: int, drop_prob: float, uniform: torch.Tensor) -> torch.Tensor:
    """Replace labels[i] by null_label where uniform[i] < drop_prob (condition dropout for classifier-free guidance).

    `uniform` is one U[0, 1) draw per example, [B], from `draw_noise`.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1] (0.1 is common), got {drop_prob}.")
    return torch.where(uniform < drop_prob, torch.full_like(labels, null_label), labels)


def training_loss(
    model: nn.Module,
    schedule: TorchNoiseSchedule,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Compute the scalar diffusion loss of a label-conditioned model from given noise and timesteps.

    `labels` are used as given, so apply `drop_labels` first. This is the body of jaxgen's
    DiffusionTask.loss_fn with the random draws taken out, which lets a test feed both backends the
    same noise and timesteps.
    """
    x_t = q_sample(schedule, images, t, noise)
    # The loss is computed in float32 also when the model runs under bfloat16 or float16 autocast.
    output = model(x_t, t, labels).float()
    per_example = diffusion_loss(schedule, output, images, noise, t, prediction_type=prediction_type,
                                 min_snr_gamma=min_snr_gamma)
    return per_example.mean()


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """The random inputs of one training step for a whole batch, on the CPU."""

    drop_uniform: torch.Tensor  # float32 [B], U[0, 1): the label of example i is dropped where < cond_drop_prob
    timesteps: torch.Tensor  # int64 [B] in [0, T)
    noise: torch.Tensor  # float32 [B, C, H, W], standard normal

    def slice(self, start: int, stop: int) -> NoiseDraw:
        """Return the draws of examples [start, stop)."""
        return NoiseDraw(self.drop_uniform[start:stop], self.timesteps[start:stop], self.noise[start:stop])


def step_generator(seed: int, step: int) -> torch.Generator:
    """Return a CPU generator seeded from (seed, step), so the draws of a step do not depend on earlier steps.

    The 64-bit seed comes from numpy's SeedSequence([seed, step]), which mixes both integers, so nearby
    (seed, step) pairs give unrelated streams.
    """
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


def draw_noise(generator: torch.Generator, batch_size: int, image_shape: tuple[int, ...],
               num_train_timesteps: int) -> NoiseDraw:
    """Draw the condition-dropout uniforms, timesteps and noise of a whole batch, in that order.

    Every process of a distributed run draws the whole batch from the same generator and keeps its slice,
    so the draws do not depend on the number of processes. They are drawn on the CPU, so they do not
    depend on the device either.
    """
    drop_uniform = torch.rand((batch_size,), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *image_shape), generator=generator)
    return NoiseDraw(drop_uniform, timesteps, noise)
