"""Timestep embeddings and activations shared by the diffusion models.

Names and formulas follow diffusers (`diffusers.models.embeddings`, version 0.42.1) so that
checkpoints convert by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ACTIVATIONS", "TimestepEmbedding", "Timesteps", "get_activation", "timestep_embedding"]


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# Activation names accepted by diffusers' `get_activation`, mapped to their JAX functions.
# torch's nn.GELU defaults to the exact erf form, hence approximate=False.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation function by its diffusers name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Embed timesteps [B] as sinusoids [B, dim], as in DDPM and diffusers' `get_timestep_embedding`.

    Frequency i of the dim // 2 frequencies is max_period ** (-i / (dim // 2 - downscale_freq_shift)).
    The output is [sin, cos] of timestep * frequency, or [cos, sin] when flip_sin_to_cos, padded
    with one zero column when dim is odd. Computed in float32 whatever the input dtype.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape [B], got {timesteps.shape}.")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    frequencies = jnp.exp(exponent)

    angles = scale * (timesteps.astype(jnp.float32)[:, None] * frequencies[None, :])
    if flip_sin_to_cos:
        embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    else:
        embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2 == 1:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection of timesteps [B] to [B, num_channels]."""

    def __init__(self, num_channels: int, *, flip_sin_to_cos: bool, downscale_freq_shift: float):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
        )


class TimestepEmbedding(nnx.Module):
    """Two-layer MLP on the sinusoidal embedding: linear_1, activation, linear_2."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)
        self.act = get_activation(act_fn)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))
