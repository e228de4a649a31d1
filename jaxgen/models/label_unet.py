"""A class-conditional U-Net: diffusers' UNet2DConditionModel conditioned on an integer label.

The label enters twice, as diffusers does for class-conditional models plus a cross-attention context:
`unet.class_embedding` adds a label vector to the timestep embedding, and `label_tokens` turns the label into
a one-token sequence that the cross-attention blocks attend to. The last label (`num_class_embeds - 1`) is the
learned null class used for classifier-free guidance. Everything under `unet` keeps diffusers' names.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel


class LabelConditionedUNet(nnx.Module):
    """A UNet2DConditionModel whose condition is a class label in [0, num_class_embeds)."""

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs):
        if not config.num_class_embeds:
            raise ValueError("LabelConditionedUNet needs num_class_embeds (the classes plus one null class)")
        if not config.cross_attention_dim:
            raise ValueError("LabelConditionedUNet needs cross_attention_dim for its label token")
        self.config = config
        self.unet = UNet2DConditionModel(config, rngs=rngs)
        self.label_tokens = nnx.Embed(config.num_class_embeds, config.cross_attention_dim, rngs=rngs)

    @property
    def null_label(self) -> int:
        """The label of the learned unconditional (null) class."""
        return self.config.num_class_embeds - 1

    def __call__(self, sample: jax.Array, timestep: jax.Array, labels: jax.Array) -> jax.Array:
        """Predict the model output for noisy images [B, H, W, C] at integer timesteps [B] given labels [B]."""
        context = self.label_tokens(labels)[:, None, :]  # [B, 1, D]
        return self.unet(sample, timestep, encoder_hidden_states=context, class_labels=labels)
