"""Torch twin of jaxgen's VideoAutoencoder (Open-Sora 1.2's video VAE), with Open-Sora's state_dict keys.

Written from the structure of `VideoAutoencoderPipeline` (opensora/models/vae/vae.py) and `VAE_Temporal`
(opensora/models/vae/vae_temporal.py) in hpcaitech/Open-Sora at tag v1.2.0; no maintained PyTorch package
implements the temporal VAE. `spatial_vae.module` is diffusers' AutoencoderKL, built from
`config.spatial.to_diffusers()`, with attention through `NPUAttnProcessor`. Tensors are channels-first,
[B, C, T, H, W], as in Open-Sora; jaxgen's model is channels-last.

Open-Sora's state_dict also contains the buffers `shift` and `scale`. Here they are non-persistent
buffers built from the config, so the state_dict contains exactly the jaxgen model's weights.
`conversion.opensora_io` checks and writes the two buffers of Open-Sora's files.

The frame-count rule and the other differences from Open-Sora are those of jaxgen.models.video_vae:
`encode` returns posterior means unless sample_posterior is set.

Importing this module registers the twin in `torch_npu_backend.models.MODEL_TWINS`.

Axis letters: B batch, C channels, T frames, H W frame height and width, t latent frames, h w latent size.
"""

from __future__ import annotations

import diffusers
import torch
import torch.nn.functional as F
from torch import nn

from jaxgen.models.video_vae import TEMPORAL_NORM_EPS, TemporalVAEConfig, VideoVAEConfig
from jaxgen.models.video_vae import VideoAutoencoder as JaxVideoAutoencoder
from torch_npu_backend.attention import NPUAttnProcessor
from torch_npu_backend.models import register_twin

__all__ = [
    "CausalConv3d",
    "ResBlock",
    "SpatialVAE",
    "TemporalDecoder",
    "TemporalEncoder",
    "TemporalVAE",
    "VideoAutoencoder",
]

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}


class CausalConv3d(nn.Module):
    """Conv3d on [B, C, T, H, W] after padding kernel_t - time_stride zero frames at the front only."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, time_stride: int = 1, bias: bool = True
    ):
        super().__init__()
        half = kernel_size // 2
        # F.pad order: W left/right, H top/bottom, T front/back.
        self.padding = (half, half, half, half, kernel_size - time_stride, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """norm1, activation, conv1, norm2, activation, conv2, plus the input (through conv3 if widths differ)."""

    def __init__(self, in_channels: int, filters: int, config: TemporalVAEConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation_fn]()
        self.norm1 = nn.GroupNorm(config.num_groups, in_channels, eps=TEMPORAL_NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(config.num_groups, filters, eps=TEMPORAL_NORM_EPS)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False) if in_channels != filters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.activation(self.norm1(x)))
        h = self.conv2(self.activation(self.norm2(h)))
        return (x if self.conv3 is None else self.conv3(x)) + h


def _res_block_stack(in_channels: int, filters: int, config: TemporalVAEConfig) -> nn.ModuleList:
    return nn.ModuleList(
        [ResBlock(in_channels if i == 0 else filters, filters, config) for i in range(config.num_res_blocks)]
    )


class TemporalEncoder(nn.Module):
    """[B, in_out_channels, T, H, W] -> moments [B, 2 * latent_embed_dim, T / factor, H, W]; T a multiple of factor."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation_fn]()
        channels = config.level_channels
        self.conv_in = CausalConv3d(config.in_out_channels, config.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        previous = config.filters
        for level, level_channels in enumerate(channels):
            self.block_res_blocks.append(_res_block_stack(previous, level_channels, config))
            previous = level_channels
            if level < len(channels) - 1:
                if config.temporal_downsample[level]:
                    self.conv_blocks.append(CausalConv3d(previous, previous, 3, time_stride=2))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = _res_block_stack(previous, previous, config)
        self.norm1 = nn.GroupNorm(config.num_groups, previous, eps=TEMPORAL_NORM_EPS)
        self.conv2 = CausalConv3d(previous, 2 * config.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.activation(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """[B, latent_embed_dim, t, H, W] -> [B, in_out_channels, t * factor, H, W]."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation_fn]()
        channels = config.level_channels
        self.conv1 = CausalConv3d(config.latent_embed_dim, channels[-1], 3)
        self.res_blocks = _res_block_stack(channels[-1], channels[-1], config)
        blocks: list[nn.ModuleList | None] = [None] * len(channels)
        conv_blocks: list[nn.Module] = [nn.Identity() for _ in range(len(channels) - 1)]
        previous = channels[-1]
        for level in reversed(range(len(channels))):
            blocks[level] = _res_block_stack(previous, channels[level], config)
            previous = channels[level]
            if level > 0 and config.temporal_downsample[level - 1]:
                conv_blocks[level - 1] = CausalConv3d(previous, 2 * previous, 3)
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(conv_blocks)
        self.norm1 = nn.GroupNorm(config.num_groups, previous, eps=TEMPORAL_NORM_EPS)
        self.conv_out = CausalConv3d(previous, config.in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0 and isinstance(self.conv_blocks[level - 1], CausalConv3d):
                x = self.conv_blocks[level - 1](x)
                b, c2, t, h, w = x.shape
                # "B (C ts) T H W -> B C (T ts) H W" with ts = 2.
                x = x.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return self.conv_out(self.activation(self.norm1(x)))


class TemporalVAE(nn.Module):
    """Open-Sora's VAE_Temporal on one chunk of frames."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = TemporalEncoder(config)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior (mean, logvar) of a chunk [B, C, n, h, w], each [B, embed_dim, ceil(n / f), h, w]."""
        x = F.pad(x, (0, 0, 0, 0, self.config.time_padding(x.shape[2]), 0))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Decode a chunk z [B, embed_dim, t, h, w] into [B, C, num_frames, h, w]."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.config.time_padding(num_frames) :]


class SpatialVAE(nn.Module):
    """Open-Sora's VideoAutoencoderKL: diffusers' AutoencoderKL as `module`, applied to each frame."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        self.module = diffusers.AutoencoderKL.from_config(config.spatial.to_diffusers())
        self.module.set_attn_processor(NPUAttnProcessor())
        self.micro_batch_size = config.micro_batch_size
        self.scaling_factor = config.spatial_scaling_factor

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply fn to the frames of x [B, C, T, H, W], micro_batch_size frames at a time."""
        b, _, t = x.shape[:3]
        frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B * T, C, H, W]
        size = self.micro_batch_size or frames.shape[0]
        out = torch.cat([fn(frames[i : i + size]) for i in range(0, frames.shape[0], size)])
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    def encode(self, x: torch.Tensor, *, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        def encode_frames(frames: torch.Tensor) -> torch.Tensor:
            posterior = self.module.encode(frames).latent_dist
            return posterior.sample(generator) if sample_posterior else posterior.mode()

        return self._frames(x, encode_frames) * self.scaling_factor

    def decode(self, x_z: torch.Tensor) -> torch.Tensor:
        return self._frames(x_z / self.scaling_factor, lambda frames: self.module.decode(frames).sample)


class VideoAutoencoder(nn.Module):
    """Open-Sora's VideoAutoencoderPipeline: SpatialVAE per frame, then TemporalVAE per micro_frame_size chunk."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        self.config = config
        self.spatial_vae = SpatialVAE(config)
        self.temporal_vae = TemporalVAE(config.temporal)
        self.register_buffer("shift", _channel_values(config.shift), persistent=False)
        self.register_buffer("scale", _channel_values(config.scale), persistent=False)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.config.latent_size(num_frames, height, width)

    def encode(self, x: torch.Tensor, *, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        """Encode x [B, C, T, H, W] into normalised latents [B, embed_dim, t, h, w]; means unless sample_posterior."""
        config = self.config
        if x.ndim != 5 or x.shape[1] != config.spatial.in_channels:
            raise ValueError(
                f"x must be a channels-first video [B, {config.spatial.in_channels}, T, H, W], got shape "
                f"{tuple(x.shape)}; permute a channels-last video with x.permute(0, 4, 1, 2, 3)."
            )
        config.latent_size(x.shape[2], x.shape[3], x.shape[4])
        x_z = self.spatial_vae.encode(x, sample_posterior=sample_posterior, generator=generator)
        chunk = config.micro_frame_size or x_z.shape[2]
        latents = []
        for start in range(0, x_z.shape[2], chunk):
            mean, logvar = self.temporal_vae.encode(x_z[:, :, start : start + chunk])
            if sample_posterior:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
                mean = mean + torch.exp(0.5 * logvar) * noise
            latents.append(mean)
        return (torch.cat(latents, dim=2) - self.shift) / self.scale

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Decode normalised latents z [B, embed_dim, t, h, w] into a video [B, C, num_frames, H, W]."""
        config = self.config
        expected = config.latent_frames(num_frames)
        if z.ndim != 5 or z.shape[1] != config.temporal.embed_dim or z.shape[2] != expected:
            raise ValueError(
                f"z must be [B, {config.temporal.embed_dim}, {expected}, h, w] for num_frames={num_frames}, got "
                f"shape {tuple(z.shape)}; pass the frame count of the encoded clip."
            )
        z = z * self.scale + self.shift
        chunk = config.micro_latent_frames or expected
        frames_per_chunk = config.micro_frame_size or num_frames
        remaining = num_frames
        x_z = []
        for start in range(0, expected, chunk):
            x_z.append(self.temporal_vae.decode(z[:, :, start : start + chunk], min(frames_per_chunk, remaining)))
            remaining -= frames_per_chunk
        return self.spatial_vae.decode(torch.cat(x_z, dim=2))


def _channel_values(value: float | tuple[float, ...]) -> torch.Tensor:
    """Return shift or scale as a tensor that broadcasts over [B, C, T, H, W]."""
    tensor = torch.tensor(value, dtype=torch.float32)
    return tensor[None, :, None, None, None] if tensor.ndim else tensor


register_twin(
    JaxVideoAutoencoder, VideoAutoencoder, build_torch=VideoAutoencoder, read_config=lambda module: module.config
)
