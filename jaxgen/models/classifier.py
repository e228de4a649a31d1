"""Small CNN digit classifiers: a plain one and a noise-aware one for classifier guidance.

`DigitClassifier` maps clean images to class logits and exposes its penultimate activations
for the Fréchet distance. `NoisyClassifier` models p(y | x_t, t): the same backbone with a
sinusoidal timestep embedding added inside every block, in the manner of the encoder used for
classifier guidance by Dhariwal and Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis".
Both use SiLU, GroupNorm and strided convolutions with no max-pooling, so gradients with respect
to the input are smooth.

Shape vocabulary: B batch, H W height and width, C channels, F feature_dim, K num_classes,
E timestep embedding width. Images are channels-last [B, H, W, C] with values in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DigitClassifierConfig:
    """Hyperparameters of `DigitClassifier`.

    `channels` lists the width of each resolution level. Every level after the first halves H
    and W with a stride-2 convolution, so `image_size` must be divisible by
    2 ** (len(channels) - 1). Each width must be divisible by `norm_groups`.
    """

    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 64
    norm_groups: int = 8
    dropout: float = 0.0

    def __post_init__(self):
        _validate_backbone_config(self)


@dataclasses.dataclass(frozen=True)
class NoisyClassifierConfig:
    """Hyperparameters of `NoisyClassifier`.

    The backbone fields mean the same as in `DigitClassifierConfig`. `time_embed_dim` is the
    width E of the sinusoidal embedding and of the MLP that follows it, `max_period` sets its
    lowest frequency, and `num_timesteps` is the number of diffusion steps, so t lies in
    [0, num_timesteps).
    """

    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 64
    norm_groups: int = 8
    dropout: float = 0.0
    time_embed_dim: int = 64
    max_period: float = 10000.0
    num_timesteps: int = 1000

    def __post_init__(self):
        _validate_backbone_config(self)
        if self.time_embed_dim <= 0 or self.time_embed_dim % 2 != 0:
            raise ValueError(
                f"time_embed_dim={self.time_embed_dim} is invalid; use a positive even number."
            )
        if self.max_period <= 1.0:
            raise ValueError(f"max_period={self.max_period} is invalid; use a value above 1.")
        if self.num_timesteps <= 0:
            raise ValueError(
                f"num_timesteps={self.num_timesteps} is invalid; use a positive integer."
            )


def _validate_backbone_config(config: DigitClassifierConfig | NoisyClassifierConfig) -> None:
    """Raise ValueError naming the first backbone field that cannot build a model."""
    for name in ("image_size", "in_channels", "num_classes", "feature_dim", "norm_groups"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid; use a positive integer.")
    if not isinstance(config.channels, tuple) or not config.channels:
        raise ValueError(
            f"channels={config.channels!r} is invalid; use a non-empty tuple such as (32, 64)."
        )
    for width in config.channels:
        if not isinstance(width, int) or width <= 0 or width % config.norm_groups != 0:
            raise ValueError(
                f"channels={config.channels} contains {width!r}; every width must be a positive "
                f"multiple of norm_groups={config.norm_groups}."
            )
    reduction = 2 ** (len(config.channels) - 1)
    if config.image_size % reduction != 0:
        raise ValueError(
            f"image_size={config.image_size} is not divisible by {reduction}, the downsampling "
            f"factor of {len(config.channels)} levels; change image_size or channels."
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout} is invalid; use a rate in [0, 1).")


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Embed timesteps [B] as [B, dim] sinusoids: cosines first, then sines.

    Frequencies fall geometrically from 1 towards 1 / max_period. This is the layout of
    `timestep_embedding` in OpenAI's guided-diffusion and of diffusers' `get_timestep_embedding`
    with flip_sin_to_cos=True and downscale_freq_shift=0. `dim` must be even.
    """
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]  # [B, dim / 2]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _validate_images(images: jax.Array, config, argument: str) -> None:
    """Raise ValueError unless `images` is [B, image_size, image_size, in_channels]."""
    expected = f"[B, {config.image_size}, {config.image_size}, {config.in_channels}]"
    if images.ndim != 4:
        raise ValueError(
            f"{argument} has shape {tuple(images.shape)} (rank {images.ndim}); expected a "
            f"channels-last batch {expected}."
        )
    _, height, width, channels = images.shape
    if (height, width) != (config.image_size, config.image_size) or channels != config.in_channels:
        raise ValueError(
            f"{argument} has shape {tuple(images.shape)}; expected {expected}. Resize the images "
            f"or build the model with matching image_size and in_channels."
        )


def _validate_batch_vector(values: jax.Array, batch_size: int, argument: str) -> None:
    """Raise ValueError unless `values` is an integer vector [B]."""
    if values.shape != (batch_size,):
        raise ValueError(
            f"{argument} has shape {tuple(values.shape)}; expected ({batch_size},), one entry per "
            f"image in the batch."
        )
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(f"{argument} has dtype {values.dtype}; expected an integer dtype.")


class ConvBlock(nnx.Module):
    """3x3 convolution, optional per-channel timestep shift, GroupNorm and SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        strides: int = 1,
        norm_groups: int,
        time_embed_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=strides, rngs=rngs)
        self.norm = nnx.GroupNorm(out_channels, num_groups=norm_groups, rngs=rngs)
        if time_embed_dim is None:
            self.time_proj = None
        else:
            self.time_proj = nnx.Linear(time_embed_dim, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array, time_embedding: jax.Array | None = None) -> jax.Array:
        h = self.conv(x)  # [B, H, W, C]
        if self.time_proj is not None:
            h = h + self.time_proj(nnx.silu(time_embedding))[:, None, None, :]
        return nnx.silu(self.norm(h))


class _Backbone(nnx.Module):
    """Convolution levels, global average pool and a feature layer, shared by both classifiers.

    Level i is a ConvBlock at width channels[i]. Levels after the first start with a stride-2
    ConvBlock that halves H and W.
    """

    def __init__(self, config, *, time_embed_dim: int | None, rngs: nnx.Rngs):
        groups = config.norm_groups
        self.stem = nnx.Conv(config.in_channels, config.channels[0], (3, 3), rngs=rngs)
        blocks = []
        previous = config.channels[0]
        for level, width in enumerate(config.channels):
            if level > 0:
                blocks.append(
                    ConvBlock(previous, previous, strides=2, norm_groups=groups,
                              time_embed_dim=time_embed_dim, rngs=rngs)
                )
            blocks.append(
                ConvBlock(previous, width, norm_groups=groups, time_embed_dim=time_embed_dim,
                          rngs=rngs)
            )
            previous = width
        self.blocks = nnx.List(blocks)
        self.feature = nnx.Linear(previous, config.feature_dim, rngs=rngs)

    def __call__(self, images: jax.Array, time_embedding: jax.Array | None) -> jax.Array:
        h = self.stem(images)
        for block in self.blocks:
            h = block(h, time_embedding)
        pooled = jnp.mean(h, axis=(1, 2))  # [B, C]
        return nnx.silu(self.feature(pooled))  # [B, F]


class DigitClassifier(nnx.Module):
    """CNN that maps clean images [B, H, W, C] in [-1, 1] to class logits [B, K].

    With config.dropout > 0, dropout is active until `model.eval()` is called, as for any NNX
    Dropout layer.
    """

    def __init__(self, config: DigitClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = _Backbone(config, time_embed_dim=None, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.logits = nnx.Linear(config.feature_dim, config.num_classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """Compute the penultimate activations [B, F] used for the Fréchet distance."""
        _validate_images(images, self.config, "images")
        return self.backbone(images, None)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Compute class logits [B, K]."""
        return self.logits(self.dropout(self.features(images)))


class NoisyClassifier(nnx.Module):
    """Noise-aware classifier p(y | x_t, t) for classifier guidance.

    The timestep embedding passes through a two-layer SiLU MLP, and every ConvBlock adds its
    own linear projection of it to the convolution output before normalisation. Dropout
    behaves as in `DigitClassifier`.
    """

    def __init__(self, config: NoisyClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        width = config.time_embed_dim
        self.time_mlp_in = nnx.Linear(width, width, rngs=rngs)
        self.time_mlp_out = nnx.Linear(width, width, rngs=rngs)
        self.backbone = _Backbone(config, time_embed_dim=width, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.logits = nnx.Linear(config.feature_dim, config.num_classes, rngs=rngs)

    def features(self, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Compute the penultimate activations [B, F] of noisy images x_t at timesteps t [B]."""
        _validate_images(x_t, self.config, "x_t")
        t = jnp.asarray(t)
        _validate_batch_vector(t, x_t.shape[0], "t")
        sinusoids = timestep_embedding(t, self.config.time_embed_dim, self.config.max_period)
        time_embedding = self.time_mlp_out(nnx.silu(self.time_mlp_in(sinusoids)))  # [B, E]
        return self.backbone(x_t, time_embedding)

    def __call__(self, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Compute class logits [B, K] of noisy images x_t at integer timesteps t [B]."""
        return self.logits(self.dropout(self.features(x_t, t)))

    def log_prob(self, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        """Compute log p(y | x_t, t) [B] for integer labels y [B] in [0, num_classes).

        The gradient of its sum with respect to x_t is the classifier-guidance direction.
        """
        _validate_images(x_t, self.config, "x_t")
        y = jnp.asarray(y)
        _validate_batch_vector(y, x_t.shape[0], "y")
        log_probs = jax.nn.log_softmax(self(x_t, t), axis=-1)  # [B, K]
        return jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
