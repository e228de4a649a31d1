"""Encoder and decoder of the Stable Diffusion VAE with diffusers' attribute names, channels-last.

Mirrors `Encoder` and `Decoder` of `diffusers.models.autoencoders.vae` and the blocks they use
(`DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D` and its attention), diffusers 0.42.1.
No block takes a time embedding. diffusers fixes every norm epsilon of the VAE at 1e-6, and
the activation before conv_out at SiLU whatever act_fn is.

Axis letters: B batch, H height, W width, C channels, L pixels (H * W). Feature maps are
[B, H, W, C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.attention import dot_product_attention
from jaxgen.models.layers import dense
from jaxgen.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, group_norm

__all__ = ["AttentionBlock", "Decoder", "DownEncoderBlock2D", "Encoder", "UNetMidBlock2D", "UpDecoderBlock2D"]

VAE_NORM_EPS = 1e-6


def _conv3x3(in_channels: int, out_channels: int, *, dtype: jnp.dtype | None, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        in_channels, out_channels, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs
    )


def _resnet(
    in_channels: int, out_channels: int, *, groups: int, act_fn: str, dtype: jnp.dtype | None, rngs: nnx.Rngs
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels=None,
        groups=groups,
        eps=VAE_NORM_EPS,
        act_fn=act_fn,
        dtype=dtype,
        rngs=rngs,
    )


def _resnet_stack(
    in_channels: int, out_channels: int, num_layers: int, *, groups: int, act_fn: str, dtype: jnp.dtype | None,
    rngs: nnx.Rngs,
) -> nnx.List:
    """Build num_layers ResNet blocks, the first mapping in_channels to out_channels."""
    return nnx.List(
        [
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups=groups, act_fn=act_fn, dtype=dtype,
                    rngs=rngs)
            for i in range(num_layers)
        ]
    )


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all pixels, with GroupNorm and a residual connection.

    diffusers builds it as `Attention(..., residual_connection=True, bias=True)` with one head as
    wide as the channels. Older checkpoints name to_q, to_k, to_v and to_out.0 query, key, value
    and proj_attn; `conversion.rules.LEGACY_RENAMES` maps those names.
    """

    def __init__(self, channels: int, *, groups: int, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.group_norm = group_norm(channels, groups, VAE_NORM_EPS, rngs=rngs)
        self.to_q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        # diffusers' to_out[1] is a Dropout without parameters and has no counterpart here.
        self.to_out = nnx.List([nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map x [B, H, W, C] to [B, H, W, C]."""
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)  # [B, L, C]
        q = dense(self.to_q, tokens).reshape(b, h * w, 1, c)  # [B, L, N=1, D=C]
        k = dense(self.to_k, tokens).reshape(b, h * w, 1, c)
        v = dense(self.to_v, tokens).reshape(b, h * w, 1, c)
        out = dot_product_attention(q, k, v).reshape(b, h * w, c)
        out = dense(self.to_out[0], out).reshape(b, h, w, c)
        return (x + out).astype(x.dtype)


class DownEncoderBlock2D(nnx.Module):
    """ResNet blocks, then an optional stride-2 downsampler that pads only the bottom and right."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        groups: int,
        act_fn: str,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups=groups, act_fn=act_fn,
                                     dtype=dtype, rngs=rngs)
        if add_downsample:
            # padding=0 is diffusers' setting for the VAE: a (0, 1, 0, 1) pad, then a stride-2 conv.
            self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)])
        else:
            self.downsamplers = None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """ResNet blocks, then an optional nearest-neighbour 2x upsampler with a 3x3 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        groups: int,
        act_fn: str,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups=groups, act_fn=act_fn,
                                     dtype=dtype, rngs=rngs)
        if add_upsample:
            self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
        else:
            self.upsamplers = None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnets[0], then attentions[0] (when add_attention) and resnets[1], at constant width."""

    def __init__(
        self,
        channels: int,
        *,
        add_attention: bool,
        groups: int,
        act_fn: str,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [_resnet(channels, channels, groups=groups, act_fn=act_fn, dtype=dtype, rngs=rngs) for _ in range(2)]
        )
        if add_attention:
            self.attentions = nnx.List([AttentionBlock(channels, groups=groups, dtype=dtype, rngs=rngs)])
        else:
            self.attentions = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    """Image [B, H, W, C_in] -> posterior moments [B, H / f, W / f, 2 * latent_channels].

    f is 2 ** (len(block_out_channels) - 1). The last axis contains the means, then the log-variances.
    conv_out computes in the dtype of its float32 GroupNorm input, so the moments stay in float32
    under a bfloat16 compute dtype.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        channels = block_out_channels
        self.conv_in = _conv3x3(in_channels, channels[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    num_layers=layers_per_block,
                    add_downsample=i < len(channels) - 1,
                    groups=groups,
                    act_fn=act_fn,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(
            channels[-1], add_attention=mid_block_add_attention, groups=groups, act_fn=act_fn, dtype=dtype, rngs=rngs
        )
        self.conv_norm_out = group_norm(channels[-1], groups, VAE_NORM_EPS, rngs=rngs)
        self.conv_out = _conv3x3(channels[-1], 2 * latent_channels, dtype=None, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latents [B, h, w, latent_channels] -> image [B, h * f, w * f, C_out].

    Up block i mirrors down block n-1-i and has layers_per_block + 1 ResNet blocks. conv_out
    computes in the dtype of its float32 GroupNorm input, so the last layer stays in float32
    under a bfloat16 compute dtype.
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        reversed_channels = block_out_channels[::-1]
        self.conv_in = _conv3x3(latent_channels, reversed_channels[0], dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(
            reversed_channels[0],
            add_attention=mid_block_add_attention,
            groups=groups,
            act_fn=act_fn,
            dtype=dtype,
            rngs=rngs,
        )
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    num_layers=layers_per_block + 1,
                    add_upsample=i < len(reversed_channels) - 1,
                    groups=groups,
                    act_fn=act_fn,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(reversed_channels))
            ]
        )
        self.conv_norm_out = group_norm(block_out_channels[0], groups, VAE_NORM_EPS, rngs=rngs)
        self.conv_out = _conv3x3(block_out_channels[0], out_channels, dtype=None, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
