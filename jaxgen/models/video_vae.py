"""Open-Sora 1.2's video VAE as a Flax NNX module with Open-Sora's parameter names.

Mirrors `VideoAutoencoderPipeline` (opensora/models/vae/vae.py) and `VAE_Temporal`
(opensora/models/vae/vae_temporal.py) in hpcaitech/Open-Sora at tag v1.2.0. Attribute paths are the
keys of Open-Sora's state_dict (spatial_vae.module.encoder.conv_in, temporal_vae.encoder.conv_in.conv,
temporal_vae.decoder.block_res_blocks.0.1.norm1, ...), so `conversion.rules` converts checkpoints by name.

A clip is compressed in two stages:

1. `spatial_vae.module`, an `AutoencoderKL` (the SDXL VAE in Open-Sora 1.2), encodes every frame on its
   own, 8x smaller in H and W, and the latents are multiplied by `spatial_scaling_factor`. Open-Sora
   hardcodes 0.18215 there and ignores the scaling_factor of the AutoencoderKL config.
2. `temporal_vae`, a VAE of causal 3D convolutions over those latents, compresses time by
   `TemporalVAEConfig.time_downsample_factor` (4 in v1.2) and keeps H and W.

`encode` returns (z - shift) / scale per channel and `decode` inverts that first.

Frame-count rule: every num_frames >= 1 works. The temporal VAE encodes a chunk of n frames after
prepending (-n) % 4 zero frames, so it returns ceil(n / 4) latent frames, and its decoder drops the
decoded padding frames again. Chunks whose length is a multiple of 4 get no padding. With
`micro_frame_size` m set, the clip is cut into chunks of m frames (the last one may be shorter) that are
encoded and decoded independently, so num_frames T gives (T // m) * ceil(m / 4) + ceil((T % m) / 4)
latent frames. In v1.2, m = 17, so each full chunk gets 3 zero frames, and 17 frames give 5 latent frames,
51 give 15 and 1 gives 1. Because the chunks are independent, a clip longer than m encodes differently
than it would in one piece.

Axis letters: B batch, T frames, H W frame height and width, t latent frames, h w latent height and width,
C channels. Videos are channels-last [B, T, H, W, C] in [-1, 1].

Differences from Open-Sora 1.2:
- Channels-last tensors; Open-Sora uses [B, C, T, H, W].
- `encode` without a key returns the posterior means of both VAEs. Open-Sora always samples both.
- shift and scale are config values, not the `shift` and `scale` buffers in Open-Sora's state_dict.
  `conversion.opensora_io` checks and writes those two buffers.
- With micro_frame_size set, `encode_for_training` returns the temporal posterior of every chunk.
  Open-Sora's encode (cal_loss=True) returns the posterior of the last chunk only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from jaxgen.models.layers import pointwise_conv
from jaxgen.models.resnet import group_norm

__all__ = [
    "PRESETS",
    "CausalConv3d",
    "ResBlock",
    "SpatialVAE",
    "TemporalDecoder",
    "TemporalEncoder",
    "TemporalVAE",
    "TemporalVAEConfig",
    "VideoAutoencoder",
    "VideoVAEConfig",
    "parameter_count",
]

# Open-Sora builds its temporal GroupNorms with torch's default epsilon.
TEMPORAL_NORM_EPS = 1e-5
# Activation names of Open-Sora's get_activation_fn and the functions they select.
TEMPORAL_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"swish": jax.nn.silu, "relu": jax.nn.relu}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


# ----- configs --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
    """Hyperparameters of Open-Sora's VAE_Temporal, with its argument names and defaults.

    Open-Sora 1.2 uses `VAE_Temporal_SD`, which sets temporal_downsample=(False, True, True) and keeps the
    other defaults (see `PRESETS["v1.2"]`).

    Attributes:
        in_out_channels: channels of the input and output, the spatial VAE's latent channels.
        latent_embed_dim: channels between the encoder and quant_conv, and between post_quant_conv and
            the decoder; the encoder outputs twice as many (means and log-variances).
        embed_dim: channels of the latent z.
        filters: channels of the first level; level i has filters * channel_multipliers[i].
        num_res_blocks: ResBlocks per level, and in the middle stack `res_blocks`.
        channel_multipliers: one entry per level.
        temporal_downsample: one entry per level but the last; True halves the frame count after that
            level in the encoder and doubles it in the decoder.
        num_groups: GroupNorm groups.
        activation_fn: "swish" (SiLU) or "relu".
    """

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (True, True, False)
    num_groups: int = 32
    activation_fn: str = "swish"

    def __post_init__(self):
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "temporal_downsample", tuple(bool(flag) for flag in self.temporal_downsample))
        for name in ("in_out_channels", "latent_embed_dim", "embed_dim", "filters", "num_res_blocks", "num_groups"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"TemporalVAEConfig.{name} must be a positive int, got {value!r}.")
        if not self.channel_multipliers or not all(_is_positive_int(m) for m in self.channel_multipliers):
            raise ValueError(
                f"channel_multipliers must be a non-empty tuple of positive ints, got {self.channel_multipliers!r}."
            )
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries, but {len(self.channel_multipliers)} "
                f"channel_multipliers need {len(self.channel_multipliers) - 1}, one per level but the last."
            )
        for channels in self.level_channels:
            if channels % self.num_groups:
                raise ValueError(
                    f"level width {channels} (filters {self.filters} times a channel multiplier) is not divisible "
                    f"by num_groups {self.num_groups}; GroupNorm needs whole groups."
                )
        if self.activation_fn not in TEMPORAL_ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_fn {self.activation_fn!r}; use one of {sorted(TEMPORAL_ACTIVATIONS)}."
            )

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level: filters * channel_multipliers[i]."""
        return tuple(self.filters * multiplier for multiplier in self.channel_multipliers)

    @property
    def time_downsample_factor(self) -> int:
        """Input frames per latent frame: 2 ** (number of True entries in temporal_downsample)."""
        return 2 ** sum(self.temporal_downsample)

    def time_padding(self, num_frames: int) -> int:
        """Return the zero frames prepended to a chunk of num_frames frames: (-num_frames) % factor."""
        return -num_frames % self.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        """Return the latent frames of one chunk of num_frames frames: ceil(num_frames / factor)."""
        return _ceil_div(num_frames, self.time_downsample_factor)


@dataclasses.dataclass(frozen=True)
class VideoVAEConfig:
    """Hyperparameters of Open-Sora's VideoAutoencoderPipeline.

    Attributes:
        spatial: the per-frame AutoencoderKL (Open-Sora's `vae_2d`).
        temporal: the temporal VAE (Open-Sora's `vae_temporal`).
        shift, scale: latent normalisation, one value per latent channel or one for all;
            `encode` returns (z - shift) / scale.
        micro_batch_size: frames that the spatial VAE encodes or decodes at a time (None: all frames of the
            batch at once). Frames are independent, so it bounds memory without changing the result.
        micro_frame_size: frames per temporal chunk (None: the whole clip in one chunk). It changes the
            result for clips longer than one chunk; the module docstring gives the frame-count rule.
        spatial_scaling_factor: factor applied to the spatial latents. Open-Sora hardcodes 0.18215 and
            ignores `spatial.scaling_factor` (0.13025 for the SDXL VAE).
    """

    spatial: AutoencoderKLConfig
    temporal: TemporalVAEConfig
    shift: float | tuple[float, ...] = 0.0
    scale: float | tuple[float, ...] = 1.0
    micro_batch_size: int | None = None
    micro_frame_size: int | None = None
    spatial_scaling_factor: float = 0.18215

    def __post_init__(self):
        for name in ("shift", "scale"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value)
                if len(value) != self.temporal.embed_dim:
                    raise ValueError(
                        f"{name} has {len(value)} entries, but the latent has embed_dim={self.temporal.embed_dim} "
                        "channels; give one value per channel or a single float."
                    )
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        if any(not math.isfinite(s) or s == 0 for s in scales):
            raise ValueError(f"scale must be finite and non-zero, got {self.scale!r}.")
        if self.temporal.in_out_channels != self.spatial.latent_channels:
            raise ValueError(
                f"temporal.in_out_channels={self.temporal.in_out_channels} must equal spatial.latent_channels="
                f"{self.spatial.latent_channels}, because the temporal VAE encodes the spatial latents."
            )
        for name in ("micro_batch_size", "micro_frame_size"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        if not math.isfinite(self.spatial_scaling_factor) or self.spatial_scaling_factor == 0:
            raise ValueError(
                f"spatial_scaling_factor must be finite and non-zero, got {self.spatial_scaling_factor!r}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VideoVAEConfig:
        """Return the config of a preset in `PRESETS`, with some fields replaced.

        Raises:
            ValueError: the preset name is unknown; the message lists the known names.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown video VAE preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def spatial_downsample_factor(self) -> int:
        """Pixels per latent pixel along H and W."""
        return self.spatial.downsample_factor

    @property
    def micro_latent_frames(self) -> int | None:
        """Latent frames of one full temporal chunk (None without micro_frame_size)."""
        if self.micro_frame_size is None:
            return None
        return self.temporal.latent_frames(self.micro_frame_size)

    def check_frames(self, num_frames: int) -> None:
        """Raise a ValueError unless num_frames is an int >= 1."""
        if not _is_positive_int(num_frames):
            raise ValueError(
                f"num_frames must be an int >= 1, got {num_frames!r}; pass the frame count of the clip "
                "(1 for a single image)."
            )

    def latent_frames(self, num_frames: int) -> int:
        """Return the latent frames of a clip of num_frames frames (the module docstring gives the rule)."""
        self.check_frames(num_frames)
        if self.micro_frame_size is None:
            return self.temporal.latent_frames(num_frames)
        full_chunks, rest = divmod(num_frames, self.micro_frame_size)
        return full_chunks * self.micro_latent_frames + self.temporal.latent_frames(rest)

    def frames_for_latent_frames(self, latent_frames: int) -> range:
        """Return the clip lengths whose latents have latent_frames frames (empty when none has)."""
        # Each frame adds at most one latent frame and latent_frames(n) >= n / factor, so n <= factor * t.
        lengths = [n for n in range(1, self.temporal.time_downsample_factor * latent_frames + 1)
                   if self.latent_frames(n) == latent_frames]  # fmt: skip
        return range(lengths[0], lengths[-1] + 1) if lengths else range(0)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Return the latent size (t, h, w) of a clip of num_frames frames of height x width pixels.

        Raises:
            ValueError: num_frames < 1, or height or width is not a positive multiple of the spatial
                downsample factor.
        """
        factor = self.spatial_downsample_factor
        for name, size in (("height", height), ("width", width)):
            if not _is_positive_int(size) or size % factor:
                raise ValueError(
                    f"{name}={size!r} is not a positive multiple of {factor}, the spatial VAE's downsample factor; "
                    f"pad or resize the frames to a multiple of {factor}."
                )
        return self.latent_frames(num_frames), height // factor, width // factor


# The SDXL VAE that Open-Sora 1.2 loads (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, vae/config.json).
SDXL_VAE = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.13025,
    force_upcast=False,
)

PRESETS: dict[str, VideoVAEConfig] = {
    # OpenSoraVAE_V1_2 in opensora/models/vae/vae.py (tag v1.2.0), as its inference configs build it.
    "v1.2": VideoVAEConfig(
        spatial=SDXL_VAE,
        temporal=TemporalVAEConfig(temporal_downsample=(False, True, True)),
        shift=(-0.10, 0.34, 0.27, 0.98),
        scale=(3.85, 2.32, 2.33, 3.06),
        micro_batch_size=4,
        micro_frame_size=17,
    ),
    # A test-sized model for 32x32 RGB clips: 4x smaller in H and W, and in T.
    "tiny": VideoVAEConfig(
        spatial=AutoencoderKLConfig(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            mid_block_add_attention=False,
        ),
        temporal=TemporalVAEConfig(
            filters=16, num_res_blocks=1, channel_multipliers=(1, 2, 2), temporal_downsample=(True, True), num_groups=8
        ),
    ),
}


# ----- temporal VAE layers --------------------------------------------------------------------------------


class CausalConv3d(nnx.Module):
    """3D convolution over [B, T, H, W, C] that only looks back in time (Open-Sora's CausalConv3d).

    It pads kernel_t - time_stride zero frames at the front and none at the end, and pads H and W by half
    the kernel on both sides. So a stride-1 conv keeps T, and a stride-2 conv with a 3-frame kernel maps an
    even T to T / 2. The weights sit in `conv`, as in Open-Sora's keys (".conv.weight").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        time_stride: int = 1,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        kernel_t, kernel_h, kernel_w = kernel
        if kernel_h % 2 == 0 or kernel_w % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd kernel height and width, got kernel_size {kernel}.")
        padding = ((kernel_t - time_stride, 0), (kernel_h // 2, kernel_h // 2), (kernel_w // 2, kernel_w // 2))
        self.pointwise = kernel == (1, 1, 1) and time_stride == 1
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=kernel,
            strides=(time_stride, 1, 1),
            padding=padding,
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map x [B, T, H, W, C_in] to [B, T / time_stride, H, W, C_out]."""
        if self.pointwise:
            return pointwise_conv(self.conv, x)
        return self.conv(x)


class ResBlock(nnx.Module):
    """Pre-norm residual block of two 3x3x3 causal convolutions without bias (Open-Sora's ResBlock).

    `conv3`, a 1x1x1 convolution without bias, projects the shortcut when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        *,
        num_groups: int,
        activation: Callable[[jax.Array], jax.Array],
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.norm1 = group_norm(in_channels, num_groups, TEMPORAL_NORM_EPS, rngs=rngs)
        self.conv1 = CausalConv3d(in_channels, filters, 3, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = group_norm(filters, num_groups, TEMPORAL_NORM_EPS, rngs=rngs)
        self.conv2 = CausalConv3d(filters, filters, 3, use_bias=False, dtype=dtype, rngs=rngs)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, 1, use_bias=False, dtype=dtype, rngs=rngs)
        else:
            self.conv3 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map x [B, T, H, W, C_in] to [B, T, H, W, filters]."""
        h = self.conv1(self.activation(self.norm1(x)))
        h = self.conv2(self.activation(self.norm2(h)))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return shortcut + h


def _res_block_stack(
    in_channels: int, filters: int, config: TemporalVAEConfig, *, dtype: jnp.dtype | None, rngs: nnx.Rngs
) -> nnx.List:
    """Build num_res_blocks ResBlocks, the first mapping in_channels to filters."""
    activation = TEMPORAL_ACTIVATIONS[config.activation_fn]
    return nnx.List(
        [
            ResBlock(in_channels if i == 0 else filters, filters, num_groups=config.num_groups, activation=activation,
                     dtype=dtype, rngs=rngs)
            for i in range(config.num_res_blocks)
        ]
    )  # fmt: skip


class TemporalEncoder(nnx.Module):
    """Latents [B, T, H, W, in_out_channels] -> moments [B, T / factor, H, W, 2 * latent_embed_dim].

    T must be a multiple of the time downsample factor. Level i runs `block_res_blocks[i]`, then, except on
    the last level, `conv_blocks[i]`: a causal conv with time stride 2 where temporal_downsample[i] is set,
    else None (Open-Sora's nn.Identity, which has no weights). Then come `res_blocks`, `norm1`, the
    activation and the 1x1x1 `conv2`.
    """

    def __init__(self, config: TemporalVAEConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.activation = TEMPORAL_ACTIVATIONS[config.activation_fn]
        channels = config.level_channels
        self.conv_in = CausalConv3d(config.in_out_channels, config.filters, 3, use_bias=False, dtype=dtype,
                                    rngs=rngs)  # fmt: skip
        blocks = []
        conv_blocks = []
        previous = config.filters
        for level, level_channels in enumerate(channels):
            blocks.append(_res_block_stack(previous, level_channels, config, dtype=dtype, rngs=rngs))
            previous = level_channels
            if level < len(channels) - 1:
                if config.temporal_downsample[level]:
                    conv_blocks.append(
                        CausalConv3d(previous, previous, 3, time_stride=2, dtype=dtype, rngs=rngs)
                    )
                else:
                    conv_blocks.append(None)
        self.block_res_blocks = nnx.List(blocks)
        self.conv_blocks = nnx.List(conv_blocks)
        self.res_blocks = _res_block_stack(previous, previous, config, dtype=dtype, rngs=rngs)
        self.norm1 = group_norm(previous, config.num_groups, TEMPORAL_NORM_EPS, rngs=rngs)
        self.conv2 = CausalConv3d(previous, 2 * config.latent_embed_dim, 1, dtype=None, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks) and self.conv_blocks[level] is not None:
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        # conv2 computes in the dtype of the float32 norm output, so the moments stay float32.
        return self.conv2(self.activation(self.norm1(x)))


class TemporalDecoder(nnx.Module):
    """Latents [B, t, H, W, latent_embed_dim] -> [B, t * factor, H, W, in_out_channels].

    Mirrors the encoder: `conv1`, `res_blocks`, then the levels from the last to the first. After level
    i > 0, where temporal_downsample[i - 1] is set, `conv_blocks[i - 1]` doubles the channels and the
    extra channels become frames: "B T H W (C ts) -> B (T ts) H W C" with ts = 2. Then `norm1`, the
    activation and `conv_out`.
    """

    def __init__(self, config: TemporalVAEConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.activation = TEMPORAL_ACTIVATIONS[config.activation_fn]
        channels = config.level_channels
        self.conv1 = CausalConv3d(config.latent_embed_dim, channels[-1], 3, dtype=dtype, rngs=rngs)
        self.res_blocks = _res_block_stack(channels[-1], channels[-1], config, dtype=dtype, rngs=rngs)
        blocks: list[nnx.List | None] = [None] * len(channels)  # filled from the last level, as the decoder runs
        conv_blocks: list[CausalConv3d | None] = [None] * (len(channels) - 1)
        previous = channels[-1]
        for level in reversed(range(len(channels))):
            blocks[level] = _res_block_stack(previous, channels[level], config, dtype=dtype, rngs=rngs)
            previous = channels[level]
            if level > 0 and config.temporal_downsample[level - 1]:
                conv_blocks[level - 1] = CausalConv3d(previous, 2 * previous, 3, dtype=dtype, rngs=rngs)
        self.block_res_blocks = nnx.List(blocks)
        self.conv_blocks = nnx.List(conv_blocks)
        self.norm1 = group_norm(previous, config.num_groups, TEMPORAL_NORM_EPS, rngs=rngs)
        self.conv_out = CausalConv3d(previous, config.in_out_channels, 3, dtype=None, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0 and self.conv_blocks[level - 1] is not None:
                x = _depth_to_time(self.conv_blocks[level - 1](x))
        # conv_out computes in the dtype of the float32 norm output, so the last layer stays float32.
        return self.conv_out(self.activation(self.norm1(x)))


def _depth_to_time(x: jax.Array) -> jax.Array:
    """Map [B, T, H, W, 2C] to [B, 2T, H, W, C]; channel 2c + s becomes channel c of frame 2t + s."""
    b, t, h, w, c2 = x.shape
    x = x.reshape(b, t, h, w, c2 // 2, 2).transpose(0, 1, 5, 2, 3, 4)
    return x.reshape(b, 2 * t, h, w, c2 // 2)


class TemporalVAE(nnx.Module):
    """Open-Sora's VAE_Temporal: encoder -> quant_conv -> posterior, and post_quant_conv -> decoder.

    It works on one chunk of frames; `VideoAutoencoder` cuts clips into chunks.
    """

    def __init__(self, config: TemporalVAEConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.encoder = TemporalEncoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1, dtype=None, rngs=rngs)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1, dtype=dtype, rngs=rngs)
        self.decoder = TemporalDecoder(config, dtype=dtype, rngs=rngs)

    def moments(self, x: jax.Array) -> jax.Array:
        """Map a chunk x [B, n, h, w, C] to posterior moments [B, ceil(n / factor), h, w, 2 * embed_dim].

        (-n) % factor zero frames are prepended first, so the real frames are the last ones the causal
        convolutions see.
        """
        padding = self.config.time_padding(x.shape[1])
        if padding:
            x = jnp.pad(x, ((0, 0), (padding, 0), (0, 0), (0, 0), (0, 0)))
        return self.quant_conv(self.encoder(x)).astype(x.dtype)

    def encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
        """Encode a chunk x [B, n, h, w, C] into the posterior over z [B, ceil(n / factor), h, w, embed_dim]."""
        return DiagonalGaussianDistribution.from_moments(self.moments(x))

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Decode a chunk z [B, t, h, w, embed_dim] into [B, num_frames, h, w, C]; t = ceil(num_frames / factor)."""
        padding = self.config.time_padding(num_frames)
        x = self.decoder(self.post_quant_conv(z))
        return x[:, padding:].astype(z.dtype)


class SpatialVAE(nnx.Module):
    """Open-Sora's VideoAutoencoderKL, which contains the per-frame AutoencoderKL as `module` (hence the key names)."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.module = AutoencoderKL(config, dtype=dtype, rngs=rngs)


# ----- the pipeline ---------------------------------------------------------------------------------------


def _map_time_chunks(
    x: jax.Array,
    chunk: int,
    full_chunks: int,
    full_fn: Callable[[jax.Array], jax.Array],
    rest_fn: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Apply full_fn to the first full_chunks chunks of `chunk` frames of x [B, T, ...] and rest_fn to the rest.

    Returns the outputs [B, t_i, ...] joined along axis 1. Full chunks run one at a time in one compiled
    loop (jax.lax.map), so peak memory follows the chunk, not the clip.
    """
    batch = x.shape[0]
    rest = x.shape[1] - full_chunks * chunk
    outputs = []
    if full_chunks == 1:
        outputs.append(full_fn(x[:, :chunk]))
    elif full_chunks > 1:
        stacked = x[:, : full_chunks * chunk].reshape(batch, full_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
        mapped = jax.lax.map(full_fn, stacked)  # [chunks, B, t, ...]
        mapped = mapped.swapaxes(0, 1)
        outputs.append(mapped.reshape(batch, full_chunks * mapped.shape[2], *mapped.shape[3:]))
    if rest:
        outputs.append(rest_fn(x[:, full_chunks * chunk :]))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


class VideoAutoencoder(nnx.Module):
    """Open-Sora 1.2's VideoAutoencoderPipeline: a per-frame AutoencoderKL, then a temporal VAE.

    Args:
        config: the hyperparameters.
        dtype: compute dtype of the convolutions (None or float32 for full precision, bfloat16 for mixed
            precision). Parameters are float32 either way. Norms, the last conv of each encoder and decoder,
            and the quant_conv of both VAEs compute in float32.
        rngs: initialisation keys; weights loaded from a checkpoint replace them.
    """

    def __init__(self, config: VideoVAEConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.spatial_vae = SpatialVAE(config.spatial, dtype=dtype, rngs=rngs)
        self.temporal_vae = TemporalVAE(config.temporal, dtype=dtype, rngs=rngs)

    # ----- sizes and checks ----------------------------------------------------------------------------

    def check_frames(self, num_frames: int) -> None:
        """Raise a ValueError unless num_frames is an int >= 1."""
        self.config.check_frames(num_frames)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Return the latent size (t, h, w) of a clip; see `VideoVAEConfig.latent_size`."""
        return self.config.latent_size(num_frames, height, width)

    def _check_video(self, x: jax.Array) -> None:
        config = self.config
        shape = tuple(getattr(x, "shape", ()))
        channels = config.spatial.in_channels
        if len(shape) != 5:
            raise ValueError(
                f"x must be a channels-last video [B, T, H, W, C], got shape {shape or None}; add the batch axis "
                "with x[None], or the frame axis of images [B, H, W, C] with x[:, None]."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}; cast it first.")
        if shape[-1] != channels:
            hint = ""
            if shape[1] == channels:
                hint = " It looks channels-first [B, C, T, H, W]; transpose it with x.transpose(0, 2, 3, 4, 1)."
            raise ValueError(
                f"x has {shape[-1]} channels on its last axis, but the VAE expects {channels} (shape {shape} "
                f"read as [B, T, H, W, C]).{hint}"
            )
        self.config.latent_size(shape[1], shape[2], shape[3])

    def _check_latents(self, z: jax.Array, num_frames: int) -> None:
        config = self.config
        shape = tuple(getattr(z, "shape", ()))
        channels = config.temporal.embed_dim
        if len(shape) != 5:
            raise ValueError(f"z must be a channels-last latent [B, t, h, w, C], got shape {shape or None}.")
        if shape[-1] != channels:
            raise ValueError(
                f"z has {shape[-1]} channels on its last axis, but the VAE expects embed_dim={channels} (shape "
                f"{shape} read as [B, t, h, w, C])."
            )
        config.check_frames(num_frames)
        expected = config.latent_frames(num_frames)
        if shape[1] != expected:
            lengths = config.frames_for_latent_frames(shape[1])
            if not lengths:
                fix = f"no clip length gives {shape[1]}"
            elif len(lengths) == 1:
                fix = f"only clips of {lengths.start} frames have {shape[1]}"
            else:
                fix = f"clips of {lengths.start} to {lengths.stop - 1} frames have {shape[1]}"
            raise ValueError(
                f"z has {shape[1]} latent frames, but num_frames={num_frames} encodes to {expected} "
                f"(micro_frame_size={config.micro_frame_size}); pass the frame count of the encoded clip "
                f"({fix})."
            )

    # ----- the two stages ------------------------------------------------------------------------------

    def spatial_posterior(self, x: jax.Array) -> DiagonalGaussianDistribution:
        """Encode every frame of x [B, T, H, W, C]; returns the posterior over unscaled latents [B, T, h, w, c]."""
        self._check_video(x)
        b, t, h, w, c = x.shape
        posterior = self.spatial_vae.module.encode(x.reshape(b * t, h, w, c), slice_size=self.config.micro_batch_size)
        return jax.tree.map(lambda a: a.reshape(b, t, *a.shape[1:]), posterior)

    def spatial_decode(self, x_z: jax.Array) -> jax.Array:
        """Decode spatial latents x_z [B, T, h, w, c] (scaled by spatial_scaling_factor) into [B, T, H, W, C]."""
        b, t = x_z.shape[:2]
        frames = x_z.reshape(b * t, *x_z.shape[2:]) / self.config.spatial_scaling_factor
        x = self.spatial_vae.module.decode(frames, slice_size=self.config.micro_batch_size)
        return x.reshape(b, t, *x.shape[1:])

    def temporal_posterior(self, x_z: jax.Array) -> DiagonalGaussianDistribution:
        """Encode spatial latents x_z [B, T, h, w, c] chunk by chunk; returns the posterior over z [B, t, h, w, C]."""
        chunk = self.config.micro_frame_size
        if chunk is None:
            moments = self.temporal_vae.moments(x_z)
        else:
            moments = _map_time_chunks(
                x_z, chunk, x_z.shape[1] // chunk, self.temporal_vae.moments, self.temporal_vae.moments
            )
        return DiagonalGaussianDistribution.from_moments(moments)

    def temporal_decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Decode unnormalised latents z [B, t, h, w, C] chunk by chunk into spatial latents [B, num_frames, h, w, c].

        Raises:
            ValueError: z is not [B, t, h, w, embed_dim] with t = `latent_size(num_frames, ...)[0]`.
        """
        self._check_latents(z, num_frames)
        config = self.config
        if config.micro_frame_size is None:
            return self.temporal_vae.decode(z, num_frames)
        # Chunks follow the frame count: the rest chunk may have as many latent frames as a full one (17
        # frames in chunks of 6 give 2 + 2 + 2), and it decodes to fewer frames.
        full_chunks, rest_frames = divmod(num_frames, config.micro_frame_size)
        return _map_time_chunks(
            z,
            config.micro_latent_frames,
            full_chunks,
            lambda chunk: self.temporal_vae.decode(chunk, config.micro_frame_size),
            lambda chunk: self.temporal_vae.decode(chunk, rest_frames),
        )

    # ----- encoding and decoding -----------------------------------------------------------------------

    def normalize(self, z: jax.Array) -> jax.Array:
        """Map temporal latents to the diffusion model's scale: (z - shift) / scale per channel."""
        shift = jnp.asarray(self.config.shift, z.dtype)
        scale = jnp.asarray(self.config.scale, z.dtype)
        return (z - shift) / scale

    def denormalize(self, z: jax.Array) -> jax.Array:
        """Invert `normalize`: z * scale + shift."""
        shift = jnp.asarray(self.config.shift, z.dtype)
        scale = jnp.asarray(self.config.scale, z.dtype)
        return z * scale + shift

    def encode(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Encode a video x [B, T, H, W, C] in [-1, 1] into normalised latents [B, t, H / f, W / f, embed_dim].

        Args:
            x: channels-last video whose H and W are multiples of the spatial downsample factor f.
            key: None takes the posterior means of both VAEs. A PRNG key draws a sample from each
                posterior instead, as Open-Sora does.

        Returns:
            (z - shift) / scale, with t = `latent_size(T, H, W)[0]`.
        """
        spatial_key = temporal_key = None
        if key is not None:
            spatial_key, temporal_key = jax.random.split(key)
        x_z = self._spatial_latents(self.spatial_posterior(x), spatial_key)
        posterior = self.temporal_posterior(x_z)
        z = posterior.mode() if temporal_key is None else posterior.sample(temporal_key)
        return self.normalize(z)

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Decode normalised latents z [B, t, h, w, embed_dim] into a video [B, num_frames, h * f, w * f, C].

        num_frames is the frame count of the encoded clip; t must equal `latent_size(num_frames, ...)[0]`.
        The output is about [-1, 1].
        """
        self._check_latents(z, num_frames)
        return self.spatial_decode(self.temporal_decode(self.denormalize(z), num_frames))

    def _spatial_latents(self, posterior: DiagonalGaussianDistribution, key: jax.Array | None) -> jax.Array:
        z = posterior.mode() if key is None else posterior.sample(key)
        return z * self.config.spatial_scaling_factor

    # ----- training ------------------------------------------------------------------------------------

    def encode_for_training(
        self, x: jax.Array, key: jax.Array | None, *, train_spatial: bool = False
    ) -> tuple[DiagonalGaussianDistribution, DiagonalGaussianDistribution | None, jax.Array]:
        """Encode a video x [B, T, H, W, C] for a VAE loss, as Open-Sora's pipeline does with cal_loss=True.

        Args:
            x: channels-last video in [-1, 1].
            key: draws the spatial latents from the spatial posterior, as Open-Sora does (None: the means).
            train_spatial: False treats the spatial VAE as frozen (Open-Sora's freeze_vae_2d): x_z is
                behind jax.lax.stop_gradient and no spatial posterior is returned. True keeps the gradient
                through the spatial encoder and returns its posterior for a KL term.

        Returns:
            (temporal_posterior, spatial_posterior or None, x_z):
            - the posterior over unnormalised temporal latents [B, t, h, w, embed_dim];
            - the posterior over unscaled spatial latents [B, T, h, w, c];
            - x_z [B, T, h, w, c], the spatial latents (scaled by spatial_scaling_factor) that the temporal
              VAE encoded.
            Draw z from the temporal posterior and pass it to `decode_for_training(z, T)`. The posteriors'
            `kl()` sums over all but the batch axis, as Open-Sora's does.
        """
        spatial_posterior = self.spatial_posterior(x)
        x_z = self._spatial_latents(spatial_posterior, key)
        if not train_spatial:
            x_z = jax.lax.stop_gradient(x_z)
            spatial_posterior = None
        return self.temporal_posterior(x_z), spatial_posterior, x_z

    def decode_for_training(self, z: jax.Array, num_frames: int) -> tuple[jax.Array, jax.Array]:
        """Decode unnormalised temporal latents z [B, t, h, w, embed_dim], as Open-Sora does with cal_loss=True.

        Returns:
            (x_rec, x_z_rec): the video [B, num_frames, H, W, C] and the temporal VAE's reconstruction of
            the spatial latents [B, num_frames, h, w, c]. Open-Sora's stage 1 trains on |x_z - x_z_rec|,
            and its later stages on the pixels.
        """
        x_z = self.temporal_decode(z, num_frames)
        return self.spatial_decode(x_z), x_z


def parameter_count(config: VideoVAEConfig) -> dict[str, int]:
    """Count the parameters of a VideoAutoencoder from their shapes, allocating no weights.

    Returns:
        {"spatial": ..., "temporal": ..., "total": ...}: elements of the nnx.Param variables of
        spatial_vae, of temporal_vae and of both.
    """
    from conversion.diffusers_io import abstract_model  # conversion imports jaxgen, so import it here

    model = abstract_model(lambda rngs: VideoAutoencoder(config, rngs=rngs))

    def count(module: nnx.Module) -> int:
        return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))))

    spatial = count(model.spatial_vae)
    temporal = count(model.temporal_vae)
    return {"spatial": spatial, "temporal": temporal, "total": spatial + temporal}
