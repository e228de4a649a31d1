"""PatchGAN discriminator with the layer layout of taming-transformers' NLayerDiscriminator, channels-last.

Each output logit scores one overlapping patch of the input as real (positive) or reconstructed (negative).
The layers sit in one list, `main`, at the indices of the torch `nn.Sequential` of taming-transformers
(taming/modules/discriminator/model.py), so `conversion.rules` maps `main.<i>.weight` by name:

    main.0   conv 4x4 stride 2, bias            main.1   LeakyReLU(0.2)
    per extra layer n = 1 .. num_layers - 1:   conv 4x4 stride 2, no bias, norm, LeakyReLU(0.2)
    then:                                      conv 4x4 stride 1, no bias, norm, LeakyReLU(0.2)
    last:                                      conv 4x4 stride 1 to one channel, bias

Every conv pads by 1 pixel. Layer n has base_channels * min(2 ** n, 8) channels. An image of side S gives
logits of side S / 2 ** num_layers - 2.

Normalisation: taming-transformers uses BatchNorm. Here it is GroupNorm, because BatchNorm's running
statistics are state that jaxgen's train step does not write back. GroupNorm also does not couple the
examples of a batch, so scoring real and reconstructed images in separate calls gives each the same
normalisation. A checkpoint trained with BatchNorm therefore does not load (its running_mean and running_var
keys are reported as unexpected).

Axis letters: B batch, H W height and width, C channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.resnet import group_norm

__all__ = ["NLayerDiscriminator", "NLayerDiscriminatorConfig"]

# taming-transformers: LeakyReLU slope and the init of its conv weights (normal, mean 0).
LEAKY_RELU_SLOPE = 0.2
CONV_INIT_STD = 0.02
NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
MAX_CHANNEL_MULTIPLIER = 8


@dataclasses.dataclass(frozen=True)
class NLayerDiscriminatorConfig:
    """PatchGAN size; taming-transformers calls these input_nc, ndf and n_layers."""

    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3
    norm_num_groups: int = 32

    def __post_init__(self):
        for name in ("in_channels", "base_channels", "num_layers", "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"discriminator {name}={value!r} is invalid; use a positive int")
        for channels in self.normalized_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"discriminator layer width {channels} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}; pick norm_num_groups dividing base_channels * 2"
                )

    @property
    def normalized_channels(self) -> tuple[int, ...]:
        """Output channels of the layers followed by a norm (layers 1 .. num_layers)."""
        return tuple(
            self.base_channels * min(2**n, MAX_CHANNEL_MULTIPLIER) for n in range(1, self.num_layers + 1)
        )


def _conv(in_channels: int, out_channels: int, stride: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        kernel_init=nnx.initializers.normal(CONV_INIT_STD),
        rngs=rngs,
    )


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: images [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1].

    `main` contains the layers at taming-transformers' indices, and None marks a LeakyReLU.
    """

    def __init__(self, config: NLayerDiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = config
        layers: list[nnx.Module | None] = [_conv(config.in_channels, config.base_channels, 2, use_bias=True,
                                                 rngs=rngs), None]
        channels = config.base_channels
        for n, out_channels in enumerate(config.normalized_channels, start=1):
            stride = 2 if n < config.num_layers else 1
            layers += [
                _conv(channels, out_channels, stride, use_bias=False, rngs=rngs),
                group_norm(out_channels, config.norm_num_groups, NORM_EPS, rngs=rngs),
                None,
            ]
            channels = out_channels
        layers.append(_conv(channels, 1, 1, use_bias=True, rngs=rngs))
        self.main = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"discriminator input has shape {x.shape}; expected [B, H, W, {self.config.in_channels}] "
                "(channels-last)"
            )
        min_side = 3 * 2**self.config.num_layers  # the smallest side that leaves one logit per axis
        if min(x.shape[1:3]) < min_side:
            raise ValueError(
                f"discriminator input of side {min(x.shape[1:3])} is too small for num_layers="
                f"{self.config.num_layers}; use images of side >= {min_side} or fewer layers"
            )
        h = x
        for layer in self.main:
            h = jax.nn.leaky_relu(h, LEAKY_RELU_SLOPE) if layer is None else layer(h)
        return h.astype(jnp.float32)
