"""Down, mid and up blocks of the conditional U-Net with diffusers' attribute names.

Mirrors `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D` and
`CrossAttnUpBlock2D` from diffusers 0.42.1 (`diffusers.models.unets.unet_2d_blocks`).

Axis letters: B batch, H height, W width, C channels, S context tokens, E context features,
T time-embedding features. Feature maps are [B, H, W, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxgen.models.transformer_2d import Transformer2DModel

__all__ = [
    "BlockSettings",
    "TransformerLayers",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "DownBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
]


# Transformer depth of a cross-attention block: one depth for every layer of the block, or one
# depth per layer (diffusers' nested transformer_layers_per_block lists).
TransformerLayers = int | tuple[int, ...]


@dataclass(frozen=True)
class BlockSettings:
    """Settings that every block of one U-Net shares."""

    temb_channels: int
    norm_num_groups: int
    norm_eps: float
    act_fn: str
    resnet_time_scale_shift: str
    cross_attention_dim: int
    use_linear_projection: bool
    dtype: jnp.dtype | None


def _resnet(in_channels: int, out_channels: int, settings: BlockSettings, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels=settings.temb_channels,
        groups=settings.norm_num_groups,
        eps=settings.norm_eps,
        act_fn=settings.act_fn,
        time_embedding_norm=settings.resnet_time_scale_shift,
        dtype=settings.dtype,
        rngs=rngs,
    )


def _per_layer(transformer_layers: TransformerLayers, num_layers: int) -> tuple[int, ...]:
    """Expand a block's transformer depth to one depth per layer."""
    if isinstance(transformer_layers, int):
        return (transformer_layers,) * num_layers
    if len(transformer_layers) != num_layers:
        raise ValueError(
            f"The block has {num_layers} layers but {len(transformer_layers)} transformer depths "
            f"{tuple(transformer_layers)}; give one depth per layer or a single int."
        )
    return tuple(transformer_layers)


def _transformer(
    channels: int, heads: int, num_layers: int, settings: BlockSettings, rngs: nnx.Rngs
) -> Transformer2DModel:
    # diffusers' `attention_head_dim` config value is the number of heads; the width of each head
    # is the block's channel count divided by it.
    return Transformer2DModel(
        channels,
        heads=heads,
        dim_head=channels // heads,
        num_layers=num_layers,
        cross_attention_dim=settings.cross_attention_dim,
        norm_num_groups=settings.norm_num_groups,
        use_linear_projection=settings.use_linear_projection,
        dtype=settings.dtype,
        rngs=rngs,
    )


class DownBlock2D(nnx.Module):
    """ResNet blocks, then an optional stride-2 downsampler; returns every output for the skips."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        settings: BlockSettings,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([])
        for i in range(num_layers):
            self.resnets.append(_resnet(in_channels if i == 0 else out_channels, out_channels, settings, rngs))
        self.downsamplers = _downsamplers(out_channels, add_downsample, downsample_padding, settings, rngs)

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Return the block output and the skip tensors, one per resnet plus one after downsampling."""
        del context  # No cross-attention in this block.
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(nnx.Module):
    """Pairs of (ResNet block, Transformer2DModel), then an optional stride-2 downsampler."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        transformer_layers: TransformerLayers,
        heads: int,
        add_downsample: bool,
        downsample_padding: int,
        settings: BlockSettings,
        rngs: nnx.Rngs,
    ):
        depths = _per_layer(transformer_layers, num_layers)
        self.resnets = nnx.List([])
        self.attentions = nnx.List([])
        for i in range(num_layers):
            self.resnets.append(_resnet(in_channels if i == 0 else out_channels, out_channels, settings, rngs))
            self.attentions.append(_transformer(out_channels, heads, depths[i], settings, rngs))
        self.downsamplers = _downsamplers(out_channels, add_downsample, downsample_padding, settings, rngs)

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Return the block output and the skip tensors, one per layer plus one after downsampling."""
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


def _downsamplers(
    channels: int, add_downsample: bool, padding: int, settings: BlockSettings, rngs: nnx.Rngs
) -> nnx.List | None:
    if not add_downsample:
        return None
    return nnx.List([Downsample2D(channels, padding=padding, dtype=settings.dtype, rngs=rngs)])


class UNetMidBlock2DCrossAttn(nnx.Module):
    """ResNet block, then (Transformer2DModel, ResNet block) pairs at the lowest resolution."""

    has_cross_attention = True

    def __init__(
        self,
        channels: int,
        *,
        transformer_layers: TransformerLayers,
        heads: int,
        settings: BlockSettings,
        rngs: nnx.Rngs,
        num_layers: int = 1,
    ):
        depths = _per_layer(transformer_layers, num_layers)
        self.resnets = nnx.List([_resnet(channels, channels, settings, rngs)])
        self.attentions = nnx.List([])
        for i in range(num_layers):
            self.attentions.append(_transformer(channels, heads, depths[i], settings, rngs))
            self.resnets.append(_resnet(channels, channels, settings, rngs))

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, list(self.resnets)[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UpBlock2D(nnx.Module):
    """ResNet blocks on the input concatenated with one skip each, then an optional 2x upsampler.

    in_channels is the channel count of the deepest skip this block consumes, prev_output_channels
    that of the block's input; the names follow diffusers.
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        settings: BlockSettings,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([])
        for i in range(num_layers):
            resnet_in = _up_resnet_in_channels(i, num_layers, in_channels, prev_output_channels, out_channels)
            self.resnets.append(_resnet(resnet_in, out_channels, settings, rngs))
        self.upsamplers = _upsamplers(out_channels, add_upsample, settings, rngs)

    def __call__(
        self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array | None = None
    ) -> jax.Array:
        """Consume len(self.resnets) skips, last one first, and return the block output."""
        del context  # No cross-attention in this block.
        skips = list(skips)
        for resnet in self.resnets:
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class CrossAttnUpBlock2D(nnx.Module):
    """Like UpBlock2D with a Transformer2DModel after each ResNet block."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        transformer_layers: TransformerLayers,
        heads: int,
        add_upsample: bool,
        settings: BlockSettings,
        rngs: nnx.Rngs,
    ):
        depths = _per_layer(transformer_layers, num_layers)
        self.resnets = nnx.List([])
        self.attentions = nnx.List([])
        for i in range(num_layers):
            resnet_in = _up_resnet_in_channels(i, num_layers, in_channels, prev_output_channels, out_channels)
            self.resnets.append(_resnet(resnet_in, out_channels, settings, rngs))
            self.attentions.append(_transformer(out_channels, heads, depths[i], settings, rngs))
        self.upsamplers = _upsamplers(out_channels, add_upsample, settings, rngs)

    def __call__(
        self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array | None = None
    ) -> jax.Array:
        """Consume len(self.resnets) skips, last one first, and return the block output."""
        skips = list(skips)
        for resnet, attention in zip(self.resnets, self.attentions):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            x = attention(x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _up_resnet_in_channels(
    index: int, num_layers: int, in_channels: int, prev_output_channels: int, out_channels: int
) -> int:
    # Input channels plus skip channels: the first resnet takes the previous block's output, and
    # the last one takes the skip saved before the matching down block ran.
    input_channels = prev_output_channels if index == 0 else out_channels
    skip_channels = in_channels if index == num_layers - 1 else out_channels
    return input_channels + skip_channels


def _upsamplers(channels: int, add_upsample: bool, settings: BlockSettings, rngs: nnx.Rngs) -> nnx.List | None:
    if not add_upsample:
        return None
    return nnx.List([Upsample2D(channels, dtype=settings.dtype, rngs=rngs)])
