"""Torch twins of jaxgen's models, and the registry that builds the twin a config describes.

A twin has the parameter names of its jaxgen model's torch keys (`conversion.rules.torch_shapes`), so
`conversion.rules.nnx_to_torch` and `torch_to_nnx` move weights between the two backends with no
per-model code. `build_torch_model(config)` looks the twin up by the config's task and model config
type. To add a model, register a `TwinSpec` in `TWINS`.

| task | model config | torch twin | jaxgen model |
| --- | --- | --- | --- |
| `diffusion` | UNet2DConditionConfig | LabelConditionedUNet (diffusers UNet2DConditionModel + label_tokens) | jaxgen.models.label_unet.LabelConditionedUNet |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from flax import nnx
from torch import nn

from conversion.diffusers_io import abstract_model
from conversion.rules import nnx_to_torch, torch_to_nnx
from jaxgen.config import Config
from jaxgen.models.label_unet import LabelConditionedUNet as JaxLabelConditionedUNet
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig
from torch_npu_backend.attention import NPUAttnProcessor

__all__ = [
    "TWINS",
    "LabelConditionedUNet",
    "TwinSpec",
    "build_jaxgen_model",
    "build_torch_model",
    "jaxgen_model_from_torch",
    "load_jaxgen_state",
    "twin_spec",
]


class LabelConditionedUNet(nn.Module):
    """Torch twin of jaxgen's LabelConditionedUNet: a diffusers UNet2DConditionModel conditioned on a class label.

    The label enters twice, as in the jaxgen model: `unet.class_embedding` adds a label vector to the
    timestep embedding, and `label_tokens` turns the label into a one-token sequence for cross-attention.
    The last label (`num_class_embeds - 1`) is the learned null class for classifier-free guidance.
    Attention runs through `NPUAttnProcessor`, so it uses npu_fusion_attention on an NPU and SDPA elsewhere.
    """

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        if not config.num_class_embeds:
            raise ValueError("LabelConditionedUNet needs num_class_embeds (the classes plus one null class)")
        if not config.cross_attention_dim:
            raise ValueError("LabelConditionedUNet needs cross_attention_dim for its label token")
        self.config = config
        diffusers_config = {key: value for key, value in config.to_diffusers().items() if not key.startswith("_")}
        self.unet = UNet2DConditionModel(**diffusers_config)
        self.unet.set_attn_processor(NPUAttnProcessor())
        self.label_tokens = nn.Embedding(config.num_class_embeds, config.cross_attention_dim)

    @property
    def null_label(self) -> int:
        """The label of the learned unconditional (null) class."""
        return self.config.num_class_embeds - 1

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the model output for noisy images [B, C, H, W] at integer timesteps [B] given labels [B]."""
        context = self.label_tokens(labels)[:, None, :]  # [B, 1, D]
        return self.unet(sample, timestep, encoder_hidden_states=context, class_labels=labels).sample


@dataclasses.dataclass(frozen=True)
class TwinSpec:
    """How to build a torch twin and the jaxgen model whose weights it shares, from a whole config."""

    build_torch: Callable[[Config], nn.Module]
    build_jaxgen: Callable[[Config, nnx.Rngs], nnx.Module]


# Keyed by (config.task, type(config.model)).
TWINS: dict[tuple[str, type], TwinSpec] = {
    ("diffusion", UNet2DConditionConfig): TwinSpec(
        build_torch=lambda config: LabelConditionedUNet(config.model),
        build_jaxgen=lambda config, rngs: JaxLabelConditionedUNet(config.model, rngs=rngs),
    ),
}


def twin_spec(config: Config) -> TwinSpec:
    """Return the registered twin of the config's task and model config type.

    Raises:
        ValueError: no twin is registered for that pair; the message lists the registered pairs.
    """
    key = (config.task, type(config.model))
    if key not in TWINS:
        known = ", ".join(f"task {task!r} with {model_type.__name__}" for task, model_type in TWINS)
        raise ValueError(
            f"no torch model is registered for task {config.task!r} with model config "
            f"{type(config.model).__name__}; registered: {known}. Add a TwinSpec to torch_npu_backend.models.TWINS"
        )
    return TWINS[key]


def build_torch_model(config: Config) -> nn.Module:
    """Build the torch twin of the model `config` describes, with torch's default initialisation."""
    return twin_spec(config).build_torch(config)


def build_jaxgen_model(config: Config, rngs: nnx.Rngs) -> nnx.Module:
    """Build the jaxgen model whose weights the config's torch twin shares."""
    return twin_spec(config).build_jaxgen(config, rngs)


def load_jaxgen_state(model: nn.Module, state: nnx.State) -> None:
    """Copy the nnx.Param and nnx.BatchStat variables of a jaxgen state into a torch twin, strictly.

    Raises:
        RuntimeError: from `load_state_dict`, naming missing and unexpected keys and wrong shapes.
    """
    state_dict = {key: torch.from_numpy(value) for key, value in nnx_to_torch(state).items()}
    model.load_state_dict(state_dict, strict=True)


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach().cpu()
    # numpy has no bfloat16, and torch_to_nnx casts to the jaxgen parameter dtype (float32) anyway.
    return (value.float() if value.is_floating_point() else value).numpy()


def jaxgen_model_from_torch(state_dict: Mapping[str, torch.Tensor | np.ndarray], config: Config) -> nnx.Module:
    """Build the config's jaxgen model filled with the weights of a torch twin's state_dict.

    Raises:
        conversion.rules.CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    abstract = abstract_model(lambda rngs: build_jaxgen_model(config, rngs))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(arrays, abstract_state))
