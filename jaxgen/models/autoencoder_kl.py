"""Stable Diffusion's KL-regularised VAE as a Flax NNX module with diffusers' names.

`AutoencoderKL` mirrors `diffusers.AutoencoderKL` (version 0.42.1): attribute paths are
diffusers' module paths (encoder.down_blocks.0.resnets.1.conv1, decoder.mid_block.attentions.0.to_q,
quant_conv, ...), so `conversion.rules` converts checkpoints by name, and the config fields are
diffusers' config.json keys. It loads the vae/ folder of Stable Diffusion 1.x, 2.x, XL and 3.

Images are channels-last [B, H, W, C] in [-1, 1]; latents are [B, H / f, W / f, latent_channels]
with f = 2 ** (len(block_out_channels) - 1).

Axis letters: B batch, H W image height and width, h w latent height and width, C channels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxgen.models.config_dict import config_kwargs
from jaxgen.models.embeddings import ACTIVATIONS
from jaxgen.models.vae_blocks import Decoder, Encoder

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution"]

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)

# diffusers clamps the posterior log-variance to this range before taking exponentials.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """VAE hyperparameters; field names and defaults are diffusers' AutoencoderKL config.

    Latent normalisation, as diffusers' pipelines apply it (see `AutoencoderKL.normalize_latents`):
    with latents_mean and latents_std set (some SDXL fine-tunes), z' = (z - mean) * scaling_factor
    / std per channel; otherwise z' = (z - shift_factor) * scaling_factor, where shift_factor None
    means 0 (SD 1.x, 2.x and XL) and SD 3 sets it.

    In diffusers' AutoencoderKL, `sample_size` only sets the default tile size, and `force_upcast` makes diffusers'
    pipelines run the VAE in float32. Both are kept for checkpoint configs and change nothing
    here; the `dtype` argument of `AutoencoderKL` sets the compute dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._validate()

    @property
    def num_downsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each spatial axis."""
        return 2**self.num_downsamplers

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels is empty; give one channel count per down block.")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length."
            )
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for block_type in getattr(self, name):
                if block_type not in allowed:
                    raise ValueError(f"Unsupported entry {block_type!r} in {name}; use one of {allowed}.")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        for channels in self.block_out_channels:
            if not isinstance(channels, int) or channels <= 0 or channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"block_out_channels entry {channels!r} must be a positive int divisible by norm_num_groups "
                    f"{self.norm_num_groups}, because GroupNorm needs whole groups."
                )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"Unsupported act_fn {self.act_fn!r}; use one of {sorted(ACTIVATIONS)}.")
        if not math.isfinite(self.scaling_factor) or self.scaling_factor == 0:
            raise ValueError(f"scaling_factor must be finite and non-zero, got {self.scaling_factor!r}.")
        self._validate_latent_statistics()

    def _validate_latent_statistics(self) -> None:
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError(
                f"latents_mean ({self.latents_mean!r}) and latents_std ({self.latents_std!r}) must be set "
                "together or both be None."
            )
        if self.latents_mean is None:
            return
        if self.shift_factor is not None:
            raise ValueError(
                f"shift_factor={self.shift_factor!r} and latents_mean/latents_std are both set, and no diffusers "
                "pipeline defines how to combine them; keep one of the two."
            )
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.latent_channels:
                raise ValueError(
                    f"{name} has {len(values)} entries, but latent_channels is {self.latent_channels}; give one "
                    "value per latent channel."
                )
        if any(value == 0 for value in self.latents_std):
            raise ValueError(f"latents_std must not contain 0, got {self.latents_std!r}.")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Build a config from a diffusers config.json dict.

        Keys starting with "_" (such as _class_name) are ignored. Every other AutoencoderKL key of
        diffusers 0.42.1 is a field, so an unknown key raises a ValueError naming the nearest field.
        """
        kwargs = config_kwargs(cls, config, model_name="AutoencoderKL",
                               convert=lambda value: tuple(value) if isinstance(value, list) else value)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """Return a config.json dict that diffusers' AutoencoderKL accepts."""
        config: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            config[field.name] = list(value) if isinstance(value, tuple) else value
        return config


@struct.dataclass
class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior q(z | x) over latents [B, h, w, C].

    A pytree, so it passes through jax.jit. Build it with `from_moments`, which clips the
    log-variance to [-30, 20] as diffusers does.
    """

    mean: jax.Array  # [B, h, w, C]
    logvar: jax.Array  # [B, h, w, C]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussianDistribution:
        """Split moments [B, h, w, 2C] into the mean (first C channels) and the log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Draw z = mean + std * eps with eps ~ N(0, I) from `key` (reparameterised, so differentiable)."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> jax.Array:
        """Return KL(self || other) per example, [B], summed over h, w and C (other None: N(0, I))."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=axes)

    def nll(self, sample: jax.Array) -> jax.Array:
        """Return the negative log-density of `sample` [B, h, w, C] per example, [B], in nats."""
        axes = tuple(range(1, self.mean.ndim))
        terms = jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axes)


def _map_slices(fn: Callable[[jax.Array], jax.Array], x: jax.Array, slice_size: int | None) -> jax.Array:
    """Apply fn to x [B, ...] at most slice_size examples at a time (None: the whole batch at once).

    jax.lax.map runs the slices in sequence inside one compiled loop, so peak memory follows
    slice_size rather than B.
    """
    if slice_size is None:
        return fn(x)
    if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size <= 0:
        raise ValueError(f"slice_size must be a positive int or None, got {slice_size!r}.")
    if slice_size >= x.shape[0]:
        return fn(x)
    return jax.lax.map(lambda item: fn(item[None])[0], x, batch_size=slice_size)


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Return the start offsets of tiles of tile_size that cover [0, length), stepping tile_size - overlap.

    The last tile is moved back to end at `length`, so every tile has the same size (and one
    compiled decoder serves all) and may overlap its neighbour by more than `overlap`.
    """
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((length - tile_size) / stride) + 1
    return [min(index * stride, length - tile_size) for index in range(count)]


def _blend_weights_1d(starts: list[int], size: int) -> list[np.ndarray]:
    """Return per-tile weights along one axis that fade linearly across each overlap with a neighbour.

    Where two neighbours overlap by o pixels, one tile's weights rise (1, ..., o) / (o + 1) while
    the other's fall, so the two sum to 1 there. Weights stay positive, and `blend_tiles` divides
    by their sum in case more than two tiles overlap.
    """
    weights = []
    for index, start in enumerate(starts):
        weight = np.ones(size, np.float32)
        ramp_positions = np.arange(1, size + 1, dtype=np.float32)
        if index > 0:
            overlap = starts[index - 1] + size - start
            weight = np.minimum(weight, ramp_positions / (overlap + 1))
        if index < len(starts) - 1:
            overlap = start + size - starts[index + 1]
            weight = np.minimum(weight, ramp_positions[::-1] / (overlap + 1))
        weights.append(weight)
    return weights


def blend_tiles(
    tiles: jax.Array, row_starts: list[int], col_starts: list[int], height: int, width: int
) -> jax.Array:
    """Blend tiles [R * K, B, th, tw, C], laid out row-major at the given offsets, into [B, H, W, C].

    Each output pixel is the weighted mean of the tiles that cover it, with the linear weights of
    `_blend_weights_1d` along each axis.
    """
    _, batch, tile_h, tile_w, channels = tiles.shape
    row_weights = _blend_weights_1d(row_starts, tile_h)
    col_weights = _blend_weights_1d(col_starts, tile_w)
    weighted_sum = jnp.zeros((batch, height, width, channels), jnp.float32)
    weight_total = np.zeros((height, width), np.float32)  # The weights are static, so numpy sums them.
    index = 0
    for row, row_weight in zip(row_starts, row_weights):
        for col, col_weight in zip(col_starts, col_weights):
            weight = np.outer(row_weight, col_weight)  # [th, tw]
            weighted_sum = weighted_sum.at[:, row : row + tile_h, col : col + tile_w].add(
                tiles[index].astype(jnp.float32) * weight[None, :, :, None]
            )
            weight_total[row : row + tile_h, col : col + tile_w] += weight
            index += 1
    return (weighted_sum / weight_total[None, :, :, None]).astype(tiles.dtype)


class AutoencoderKL(nnx.Module):
    """KL VAE: encoder -> quant_conv -> posterior, and post_quant_conv -> decoder.

    Args:
        config: the hyperparameters.
        dtype: compute dtype of convolutions and linear layers (None or float32 for full precision,
            bfloat16 for mixed precision). Parameters are float32 either way; norms, the attention
            softmax, the encoder's and decoder's conv_out and quant_conv compute in float32.
        rngs: initialisation keys; weights loaded from a checkpoint replace them.
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        common = dict(
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            groups=config.norm_num_groups,
            act_fn=config.act_fn,
            mid_block_add_attention=config.mid_block_add_attention,
            dtype=dtype,
            rngs=rngs,
        )
        self.encoder = Encoder(config.in_channels, config.latent_channels, **common)
        self.decoder = Decoder(config.latent_channels, config.out_channels, **common)
        moments = 2 * config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nnx.Conv(moments, moments, kernel_size=(1, 1), padding="VALID", rngs=rngs)
        else:
            self.quant_conv = None
        if config.use_post_quant_conv:
            self.post_quant_conv = nnx.Conv(
                config.latent_channels, config.latent_channels, kernel_size=(1, 1), padding="VALID", dtype=dtype,
                rngs=rngs,
            )
        else:
            self.post_quant_conv = None

    # ----- encoding and decoding ---------------------------------------------------------

    def encode(self, x: jax.Array, *, slice_size: int | None = None) -> DiagonalGaussianDistribution:
        """Encode images x [B, H, W, in_channels] in [-1, 1] into the posterior over latents.

        Args:
            x: images whose H and W are divisible by `config.downsample_factor`.
            slice_size: encode at most this many images at a time to bound memory (None: all).

        Returns:
            The posterior with mean and log-variance [B, H / f, W / f, latent_channels] in the dtype
            of x.
        """
        self._check_images(x)
        moments = _map_slices(self._moments, x, slice_size)
        return DiagonalGaussianDistribution.from_moments(moments.astype(x.dtype))

    def _moments(self, x: jax.Array) -> jax.Array:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def decode(
        self,
        z: jax.Array,
        *,
        slice_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> jax.Array:
        """Decode latents z [B, h, w, latent_channels] (unnormalised, as `encode` returns them).

        Args:
            z: latents of any spatial size.
            slice_size: decode at most this many examples at a time to bound memory (None: all).
            tile_size: decode tiles of tile_size x tile_size latent pixels one at a time and blend
                them, to bound memory on large images (None: decode the whole image at once).
                Tiles see only their own pixels, so the result differs from an untiled decode near
                tile borders, and more so with fewer overlapping pixels.
            tile_overlap: latent pixels shared by neighbouring tiles, blended linearly; defaults to
                tile_size // 4. Only used with tile_size.

        Returns:
            Images [B, h * f, w * f, out_channels], about [-1, 1], in the dtype of z.
        """
        self._check_latents(z)
        if tile_size is None:
            if tile_overlap is not None:
                raise ValueError(f"tile_overlap={tile_overlap!r} needs tile_size; set tile_size or drop tile_overlap.")
            return _map_slices(self._decode_batch, z, slice_size).astype(z.dtype)
        return self._decode_tiled(z, tile_size, tile_overlap, slice_size).astype(z.dtype)

    def _decode_batch(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_tiled(
        self, z: jax.Array, tile_size: int, tile_overlap: int | None, slice_size: int | None
    ) -> jax.Array:
        if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size <= 0:
            raise ValueError(f"tile_size must be a positive int of latent pixels, got {tile_size!r}.")
        overlap = tile_size // 4 if tile_overlap is None else tile_overlap
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile_size:
            raise ValueError(
                f"tile_overlap must be an int in [0, tile_size) = [0, {tile_size}), got {tile_overlap!r}."
            )
        _, h, w, _ = z.shape
        tile_h, tile_w = min(tile_size, h), min(tile_size, w)
        row_starts = tile_starts(h, tile_size, overlap)
        col_starts = tile_starts(w, tile_size, overlap)
        tiles = jnp.stack(
            [z[:, row : row + tile_h, col : col + tile_w] for row in row_starts for col in col_starts]
        )  # [tiles, B, tile_h, tile_w, C]
        # One tile at a time in one compiled loop: memory follows the tile, not the image.
        decoded = jax.lax.map(lambda tile: _map_slices(self._decode_batch, tile, slice_size), tiles)

        factor = self.config.downsample_factor
        return blend_tiles(
            decoded,
            [row * factor for row in row_starts],
            [col * factor for col in col_starts],
            h * factor,
            w * factor,
        )

    def __call__(
        self, x: jax.Array, *, sample_posterior: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """Reconstruct images x [B, H, W, in_channels] through the posterior's mode or a sample of it.

        A sample needs sample_posterior=True and a PRNG key; a key without sample_posterior is
        rejected rather than ignored.
        """
        if sample_posterior and key is None:
            raise ValueError("sample_posterior=True needs a PRNG key; pass key=jax.random.key(seed).")
        if not sample_posterior and key is not None:
            raise ValueError("key is only used with sample_posterior=True; set it or drop the key.")
        posterior = self.encode(x)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ----- latent normalisation of the diffusion pipelines --------------------------------

    def normalize_latents(self, z: jax.Array) -> jax.Array:
        """Map VAE latents [B, h, w, C] to the scale the diffusion model works in (see the config doc)."""
        config = self.config
        if config.latents_mean is not None:
            mean = jnp.asarray(config.latents_mean, z.dtype)
            std = jnp.asarray(config.latents_std, z.dtype)
            return (z - mean) * config.scaling_factor / std
        shift = 0.0 if config.shift_factor is None else config.shift_factor
        return (z - shift) * config.scaling_factor

    def denormalize_latents(self, z: jax.Array) -> jax.Array:
        """Invert `normalize_latents`."""
        config = self.config
        if config.latents_mean is not None:
            mean = jnp.asarray(config.latents_mean, z.dtype)
            std = jnp.asarray(config.latents_std, z.dtype)
            return z * std / config.scaling_factor + mean
        shift = 0.0 if config.shift_factor is None else config.shift_factor
        return z / config.scaling_factor + shift

    def latents_from_images(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Encode images [B, H, W, C] in [-1, 1] into normalised latents for a diffusion model.

        With a key the latents are a posterior sample, as diffusers' img2img pipelines draw them;
        without one they are the posterior mean.
        """
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.normalize_latents(z)

    def images_from_latents(self, z: jax.Array, **decode_options: Any) -> jax.Array:
        """Decode normalised latents into images about [-1, 1], passing decode_options to `decode`."""
        return self.decode(self.denormalize_latents(z), **decode_options)

    # ----- input checks ------------------------------------------------------------------

    def _check_images(self, x: jax.Array) -> None:
        config = self.config
        shape = _check_rank4_float(x, "x", "[B, H, W, C] image")
        _, h, w, c = shape
        if c != config.in_channels:
            raise ValueError(
                f"x has {c} channels on its last axis, but the VAE expects in_channels={config.in_channels} "
                f"(shape {tuple(shape)} read as [B, H, W, C]).{_nchw_hint(shape, config.in_channels)}"
            )
        factor = config.downsample_factor
        if h % factor != 0 or w % factor != 0:
            raise ValueError(
                f"x spatial size {h}x{w} is not divisible by {factor} (2 ** {config.num_downsamplers} "
                f"downsamplers); pad or resize the images to a multiple of {factor}."
            )

    def _check_latents(self, z: jax.Array) -> None:
        config = self.config
        shape = _check_rank4_float(z, "z", "[B, h, w, C] latent")
        if shape[-1] != config.latent_channels:
            raise ValueError(
                f"z has {shape[-1]} channels on its last axis, but the VAE expects latent_channels="
                f"{config.latent_channels} (shape {tuple(shape)} read as [B, h, w, C])."
                f"{_nchw_hint(shape, config.latent_channels)}"
            )


def _check_rank4_float(array: jax.Array, name: str, layout: str) -> tuple[int, ...]:
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{name} must be a {layout} array (channels-last), got shape {shape}; add the batch axis with "
            f"{name}[None] or transpose NCHW input with {name}.transpose(0, 2, 3, 1)."
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}; cast it first.")
    return tuple(shape)


def _nchw_hint(shape: tuple[int, ...], channels: int) -> str:
    if shape[1] == channels:
        return " The input looks NCHW; transpose it with x.transpose(0, 2, 3, 1)."
    return ""
