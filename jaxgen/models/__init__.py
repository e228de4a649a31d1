"""Flax NNX models whose parameter names follow the public checkpoints."""

from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel"]
