"""Discrete-time variance-preserving noise schedules.

Symbols: T is the number of training timesteps and t in [0, T) the integer timestep. beta_t is the
per-step noise variance, alpha_t = 1 - beta_t, and alpha_bar_t (``alphas_cumprod``) = prod_{s<=t} alpha_s.
The forward process is x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps, so
sigma_t = sqrt(1 - alpha_bar_t) and SNR_t = alpha_bar_t / (1 - alpha_bar_t).

The values are computed in float64 NumPy and cast to float32, following the formulas of diffusers 0.42
(``DDPMScheduler`` and friends), which compute them in float32 torch. The two agree to about 1e-6.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Largest beta of the cosine schedule (Nichol & Dhariwal 2021), which keeps alpha_t away from zero.
_COSINE_MAX_BETA = 0.999
# Offset s of the cosine schedule (Nichol & Dhariwal 2021). Without it the first betas would be near
# (pi / 2T)^2, about 2.5e-6 for T = 1000.
_COSINE_OFFSET = 0.008


@flax.struct.dataclass
class NoiseSchedule:
    """Variance-preserving noise schedule; a pytree, so jitted samplers take it as a traced argument.

    Every field is a float32 array of shape [T]. T is static (it is the array length), the values are
    not, so a jitted function does not recompile when a schedule of the same length is swapped in.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        """Number T of training timesteps (a static Python int)."""
        return self.betas.shape[0]

    @property
    def sqrt_alphas_cumprod(self) -> jax.Array:
        """Signal scale alpha_t = sqrt(alpha_bar_t) [T]."""
        return jnp.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> jax.Array:
        """Noise scale sigma_t = sqrt(1 - alpha_bar_t) [T]."""
        return jnp.sqrt(1.0 - self.alphas_cumprod)

    @property
    def snr(self) -> jax.Array:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) [T]; inf where alpha_bar_t == 1."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Gather (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t of any shape."""
        alpha_bar = self.alphas_cumprod[t]
        return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def _cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """Compute the betas of the cosine schedule (Nichol & Dhariwal 2021) in float64."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        u_start = i / num_train_timesteps
        u_end = (i + 1) / num_train_timesteps
        betas.append(min(1.0 - alpha_bar(u_end) / alpha_bar(u_start), _COSINE_MAX_BETA))
    return np.asarray(betas, dtype=np.float64)


def rescale_betas_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that alpha_bar_{T-1} == 0 while alpha_bar_0 is kept (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first value is
    unchanged. The betas are then recovered from the new cumulative product, in float64.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    sqrt_alpha_bar = np.sqrt(alphas_cumprod)
    first = sqrt_alpha_bar[0]
    last = sqrt_alpha_bar[-1]

    # 1. Shift so that the last value is exactly zero.
    sqrt_alpha_bar = sqrt_alpha_bar - last
    # 2. Scale so that the first value is back to its original value.
    sqrt_alpha_bar = sqrt_alpha_bar * first / (first - last)
    # 3. Undo the square root and the cumulative product.
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def make_schedule(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    rescale_zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Build a NoiseSchedule of one of the kinds in SCHEDULE_KINDS.

    Args:
      kind: "linear" (Ho et al. 2020, betas evenly spaced from beta_start to beta_end),
        "scaled_linear" (Stable Diffusion: sqrt(betas) evenly spaced, then squared) or
        "squaredcos_cap_v2" (cosine, Nichol & Dhariwal 2021, betas capped at 0.999; ignores
        beta_start and beta_end).
      num_train_timesteps: number T of training timesteps.
      beta_start: first beta of the linear kinds.
      beta_end: last beta of the linear kinds.
      rescale_zero_terminal_snr: rescale so that the last timestep has SNR 0 (Lin et al. 2023). The
        last alpha_bar is then exactly 0, which ε-prediction cannot invert at that timestep; use
        v-prediction with such schedules.

    Raises:
      ValueError: kind is unknown or num_train_timesteps < 1.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}.")
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"Unknown schedule kind {kind!r}; use one of {', '.join(SCHEDULE_KINDS)}.")

    if rescale_zero_terminal_snr:
        betas = rescale_betas_zero_terminal_snr(betas)

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, dtype=jnp.float32),
        alphas=jnp.asarray(alphas, dtype=jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
    )
