"""Flax NNX models whose parameter names follow the public checkpoints."""

from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxgen.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
]
