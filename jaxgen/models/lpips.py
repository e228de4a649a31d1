"""LPIPS perceptual distance (VGG16 version 0.1) as a Flax NNX module, channels-last.

Mirrors `lpips.LPIPS(net="vgg", version="0.1")` of the lpips package (0.1.4): both images are shifted and
scaled per channel, passed through the convolutional trunk of torchvision's VGG16, and compared at the
ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3. At each of those layers the features are
normalised to unit length along the channels, their squared difference is weighted per channel by a 1x1
convolution (linK) and averaged over the pixels, and the five averages are summed.

Parameter names follow the two files the weights come from, so `conversion.rules` maps them by name:

    features.<i>.weight / .bias    torchvision's vgg16().state_dict(), conv layers of `features`
    lin<k>.model.1.weight          the lpips package's weights/v0.1/vgg.pth (index 0 is lpips' Dropout)

`conversion.lpips_io.load_lpips` reads both files. The dropout before each linK is inactive in the lpips
package's eval mode and is not applied here.

Axis letters: B batch, H W height and width, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["LPIPS", "NetLinLayer", "VGG16_TAP_INDICES"]

# torchvision's vgg16 `features`: an int is a 3x3 conv with that many output channels, followed by a ReLU;
# "M" is a 2x2 max pool with stride 2. Indices in `features` count each conv, ReLU and pool as one layer.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of the ReLUs that LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)

# lpips 0.1.4 ScalingLayer: input x in [-1, 1] becomes (x - shift) / scale per RGB channel, which maps it
# close to the ImageNet normalisation that torchvision's VGG16 was trained with.
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor divides by (norm + eps).
NORMALIZE_EPS = 1e-10
MIN_IMAGE_SIDE = 16  # four 2x2 pools before relu5_3 leave it at least one pixel


class NetLinLayer(nnx.Module):
    """lpips' NetLinLayer: a 1x1 conv without bias from C channels to one, as `model.1`."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        # Index 0 is lpips' Dropout, which its eval mode (and this module) does not apply.
        self.model = nnx.List([None, nnx.Conv(channels, 1, kernel_size=(1, 1), use_bias=False, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.model[1](x)


def _unit_normalize(features: jax.Array) -> jax.Array:
    """Divide features [B, H, W, C] by (their L2 norm over C + 1e-10), as lpips.normalize_tensor does.

    The square root is taken of a value replaced by 1 where the sum of squares is 0, so a pixel whose
    features are all zero (common after a ReLU) gets a zero gradient instead of NaN. The forward value
    there is 0 either way.
    """
    sum_squares = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = sum_squares > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_squares, 1.0)), 0.0)
    return features / (norm + NORMALIZE_EPS)


class LPIPS(nnx.Module):
    """LPIPS distance between two batches of RGB images [B, H, W, 3] in [-1, 1], one value per example [B].

    Build it with random weights here and load real ones with `conversion.lpips_io.load_lpips`. The
    module is meant to stay frozen: a training task keeps it out of the optimised parameters.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        layers: list[nnx.Conv | None] = []
        in_channels = 3
        for entry in VGG16_LAYOUT:
            if entry == "M":
                layers.append(None)
                continue
            layers.append(nnx.Conv(in_channels, entry, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs))
            layers.append(None)  # ReLU
            in_channels = entry
        # `features` stops at relu5_3 (index 29); torchvision's last max pool (index 30) is not used.
        self.features = nnx.List(layers)
        self.lin0 = NetLinLayer(TAP_CHANNELS[0], rngs=rngs)
        self.lin1 = NetLinLayer(TAP_CHANNELS[1], rngs=rngs)
        self.lin2 = NetLinLayer(TAP_CHANNELS[2], rngs=rngs)
        self.lin3 = NetLinLayer(TAP_CHANNELS[3], rngs=rngs)
        self.lin4 = NetLinLayer(TAP_CHANNELS[4], rngs=rngs)

    def vgg_features(self, x: jax.Array) -> list[jax.Array]:
        """Return the five compared ReLU outputs of VGG16 for images x [B, H, W, 3] in [-1, 1]."""
        h = (x.astype(jnp.float32) - np.asarray(SCALING_SHIFT, np.float32)) / np.asarray(SCALING_SCALE, np.float32)
        taps = []
        pool_indices = _pool_indices()
        for index, layer in enumerate(self.features):
            if layer is not None:
                h = layer(h)
            elif index in pool_indices:
                h = nnx.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
            else:
                h = jax.nn.relu(h)
            if index in VGG16_TAP_INDICES:
                taps.append(h)
        return taps

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        _check_images(x0, "x0")
        _check_images(x1, "x1")
        if x0.shape != x1.shape:
            raise ValueError(f"x0 {x0.shape} and x1 {x1.shape} must have the same shape")
        heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        # One trunk pass over both batches: [2B, H, W, 3].
        features = self.vgg_features(jnp.concatenate([x0, x1], axis=0))
        batch = x0.shape[0]
        distance = jnp.zeros((batch,), jnp.float32)
        for head, feature in zip(heads, features):
            diff = jnp.square(_unit_normalize(feature[:batch]) - _unit_normalize(feature[batch:]))
            distance = distance + jnp.mean(head(diff), axis=(1, 2, 3))
        return distance


def _pool_indices() -> frozenset[int]:
    indices, index = set(), 0
    for entry in VGG16_LAYOUT:
        if entry == "M":
            indices.add(index)
            index += 1
        else:
            index += 2
    return frozenset(indices)


def _check_images(x: jax.Array, name: str) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} has shape {x.shape}; LPIPS expects RGB images [B, H, W, 3] (channels-last)")
    if min(x.shape[1:3]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{name} has spatial size {x.shape[1]}x{x.shape[2]}; LPIPS needs at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} for its fifth VGG16 stage; upsample the images first"
        )
