"""Torch twins of jaxgen's models, and the registries that build them and move weights between backends.

A twin is a torch module built from the same config as its jaxgen model, with the same parameter names.
Its state_dict keys are the jaxgen model's torch keys (`conversion.rules.torch_shapes`), except that a twin
without the jaxgen model's outermost module drops that module's name (`ModelTwin.torch_key_prefix`). So
`conversion.rules.nnx_to_torch` and `torch_to_nnx` move weights between the two backends with no per-model
code. Both directions are strict: a missing, unexpected or mis-shaped key raises
`conversion.rules.CheckpointMismatchError`, which names the key. Where diffusers or transformers implement
an architecture, the twin is their class.

Two registries:

- `MODEL_TWINS`, keyed by jaxgen model class, behind `torch_twin`, `jaxgen_twin`, `torch_state_dict` and
  `jaxgen_model_from_state_dict`. Add a model with `register_twin`.
- `TWINS`, keyed by (config.task, model config type), behind `build_torch_model` and `build_jaxgen_model`,
  which build the model of a whole training config.

| jaxgen model | torch twin | jaxgen config of a twin `module` |
| --- | --- | --- |
| AutoencoderKL | diffusers.AutoencoderKL | AutoencoderKLConfig.from_diffusers(module.config) |
| UNet2DConditionModel | diffusers.UNet2DConditionModel | UNet2DConditionConfig.from_diffusers(module.config) |
| CLIPTextModel | transformers.CLIPTextModel (torch_key_prefix "text_model.") | CLIPTextConfig.from_transformers(...) |
| CLIPTextModelWithProjection | transformers.CLIPTextModelWithProjection | CLIPTextConfig.from_transformers(...) |
| LabelConditionedUNet | LabelConditionedUNet below (diffusers UNet2DConditionModel + label_tokens) | module.config |

CLIPTextConfig.from_transformers reads `module.config.to_dict()`.

| task | model config | torch twin | jaxgen model |
| --- | --- | --- | --- |
| `diffusion` | UNet2DConditionConfig | LabelConditionedUNet | jaxgen.models.label_unet.LabelConditionedUNet |

Attention: twins built on diffusers models run attention through `NPUAttnProcessor`, which calls
npu_fusion_attention on an NPU and SDPA on CUDA and the CPU. The CLIP twins use transformers' "eager"
attention. With left padding and an attention mask, the first padding queries may attend to no key at all.
For those rows, eager attention and jaxgen both average every value, but the "sdpa" path of transformers
5.25.0 returns other values. Rows of real tokens are equal either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from flax import nnx
from torch import nn

from conversion.diffusers_io import abstract_model
from conversion.rules import CheckpointMismatchError, nnx_to_torch, torch_to_nnx
from jaxgen.config import Config
from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxgen.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxgen.models.label_unet import LabelConditionedUNet as JaxLabelConditionedUNet
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from torch_npu_backend.attention import NPUAttnProcessor
from torch_npu_backend.device import resolve_device

__all__ = [
    "CLIP_ATTENTION",
    "MODEL_TWINS",
    "TWINS",
    "LabelConditionedUNet",
    "ModelTwin",
    "TwinSpec",
    "build_jaxgen_model",
    "build_torch_model",
    "find_twin",
    "jaxgen_model_from_state_dict",
    "jaxgen_model_from_torch",
    "jaxgen_twin",
    "load_jaxgen_state",
    "register_twin",
    "torch_state_dict",
    "torch_twin",
    "twin_spec",
]

# transformers attention implementation of the CLIP twins. The module docstring explains the choice.
CLIP_ATTENTION = "eager"


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
        self.unet = diffusers.UNet2DConditionModel(**diffusers_config)
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


# ----- twins by jaxgen model class -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelTwin:
    """A jaxgen model class, the torch class of its twin, and how to build each from a jaxgen model config.

    Attributes:
        jaxgen_class: the Flax NNX model class. Its instances keep their config in `model.config`.
        torch_class: the torch module class of the twin.
        build_torch: builds the twin, with torch's initialisation, from a jaxgen model config.
        read_config: returns the jaxgen model config of a torch twin.
        build_jaxgen: builds the jaxgen model from a config and `nnx.Rngs`.
        torch_key_prefix: a module path ending in ".". Every torch key of the jaxgen model starts with
            it, and the twin's state_dict keys are those keys without it. "" means the keys are equal.
            transformers 5.25.0 builds CLIPTextModel without the `text_model` module that the published
            checkpoints and jaxgen have, so that twin uses "text_model.".
    """

    jaxgen_class: type[nnx.Module]
    torch_class: type[nn.Module]
    build_torch: Callable[[Any], nn.Module]
    read_config: Callable[[nn.Module], Any]
    build_jaxgen: Callable[[Any, nnx.Rngs], nnx.Module]
    torch_key_prefix: str = ""


# Keyed by jaxgen model class. Fill it with `register_twin`.
MODEL_TWINS: dict[type, ModelTwin] = {}


def register_twin(
    jaxgen_class: type[nnx.Module],
    torch_class: type[nn.Module],
    *,
    build_torch: Callable[[Any], nn.Module],
    read_config: Callable[[nn.Module], Any],
    build_jaxgen: Callable[[Any, nnx.Rngs], nnx.Module] | None = None,
    torch_key_prefix: str = "",
) -> ModelTwin:
    """Register `torch_class` as the torch twin of `jaxgen_class` and return the entry.

    Args:
        jaxgen_class: the jaxgen model class.
        torch_class: the twin's class; `jaxgen_twin` looks torch modules up by it.
        build_torch: builds the twin from a jaxgen model config.
        read_config: returns the jaxgen model config of a twin instance.
        build_jaxgen: builds the jaxgen model from a config and rngs; None calls
            `jaxgen_class(config, rngs=rngs)`.
        torch_key_prefix: see `ModelTwin.torch_key_prefix`.

    Raises:
        ValueError: either class is registered already, or the prefix does not end in ".".
    """
    if jaxgen_class in MODEL_TWINS:
        raise ValueError(
            f"{_class_name(jaxgen_class)} already has the torch twin "
            f"{_class_name(MODEL_TWINS[jaxgen_class].torch_class)}; a jaxgen model class has one twin."
        )
    for twin in MODEL_TWINS.values():
        if twin.torch_class is torch_class:
            raise ValueError(
                f"{_class_name(torch_class)} is already the twin of {_class_name(twin.jaxgen_class)}; "
                "jaxgen_twin could not tell which jaxgen model to build. Wrap one of them in its own class."
            )
    if torch_key_prefix and not torch_key_prefix.endswith("."):
        raise ValueError(f"torch_key_prefix {torch_key_prefix!r} must be a module path ending in '.'.")
    if build_jaxgen is None:

        def build_jaxgen(config: Any, rngs: nnx.Rngs) -> nnx.Module:
            return jaxgen_class(config, rngs=rngs)

    twin = ModelTwin(jaxgen_class, torch_class, build_torch, read_config, build_jaxgen, torch_key_prefix)
    MODEL_TWINS[jaxgen_class] = twin
    return twin


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules that register hand-written twins when imported. They are imported on the first lookup, so
# `torch_twin(stdit3_model)` works without importing torch_npu_backend.stdit3 first.
TWIN_MODULES = ("torch_npu_backend.stdit3", "torch_npu_backend.video_vae")


def _import_twin_modules() -> None:
    import importlib

    for name in TWIN_MODULES:
        importlib.import_module(name)


def find_twin(model: nnx.Module | nn.Module | type) -> ModelTwin:
    """Return the registry entry of a jaxgen model or torch twin, given an instance or a class.

    A class that is not registered itself uses the entry of its nearest registered base class.

    Raises:
        TypeError: neither the class nor a base class is registered. The message lists the registered pairs.
    """
    cls = model if isinstance(model, type) else type(model)
    _import_twin_modules()
    by_torch_class = {twin.torch_class: twin for twin in MODEL_TWINS.values()}
    for base in cls.__mro__:
        if base in MODEL_TWINS:
            return MODEL_TWINS[base]
        if base in by_torch_class:
            return by_torch_class[base]
    registered = ", ".join(
        f"{twin.jaxgen_class.__name__} <-> {_class_name(twin.torch_class)}" for twin in MODEL_TWINS.values()
    )
    raise TypeError(
        f"No torch twin is registered for {_class_name(cls)}; registered pairs: {registered}. "
        "Add one with torch_npu_backend.models.register_twin."
    )


def _jaxgen_twin_entry(model: nnx.Module | type) -> ModelTwin:
    cls = model if isinstance(model, type) else type(model)
    twin = find_twin(cls)
    if not issubclass(cls, twin.jaxgen_class):
        raise TypeError(
            f"{_class_name(cls)} is a torch twin; pass a jaxgen model, such as a {twin.jaxgen_class.__name__}."
        )
    return twin


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    value = value.detach().cpu()
    # numpy has no bfloat16, and torch_to_nnx casts to the jaxgen parameter dtype (float32) anyway.
    return (value.float() if value.is_floating_point() else value).numpy()


def torch_state_dict(model: nnx.Module) -> dict[str, torch.Tensor]:
    """Return the weights of a jaxgen model as the state_dict of its torch twin (float32 CPU tensors).

    Raises:
        TypeError: the model's class has no registered twin.
        ValueError: a torch key of the model lacks the registered `torch_key_prefix`.
    """
    twin = _jaxgen_twin_entry(model)
    prefix = twin.torch_key_prefix
    state_dict = {}
    for key, array in nnx_to_torch(nnx.state(model)).items():
        if not key.startswith(prefix):
            raise ValueError(
                f"{type(model).__name__} has the torch key {key!r}, which does not start with the registered "
                f"torch_key_prefix {prefix!r}; fix the prefix in its register_twin call."
            )
        state_dict[key[len(prefix) :]] = torch.from_numpy(array)
    return state_dict


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """Raise CheckpointMismatchError unless `state_dict` has exactly the keys and shapes of `module`'s."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shape_mismatches = [
        (key, tuple(value.shape), expected[key])
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    if missing or unexpected or shape_mismatches:
        raise CheckpointMismatchError(missing, unexpected, shape_mismatches)


def torch_twin(model: nnx.Module, *, device: torch.device | str | None = None) -> nn.Module:
    """Build the torch twin of a jaxgen model, with the same config and the same weights, in eval mode.

    Args:
        model: a jaxgen model whose class is registered in `MODEL_TWINS`.
        device: where to put the twin: a torch.device, or a name such as "npu", "cuda:1" or "cpu" that
            `torch_npu_backend.device.resolve_device` checks. None keeps it on the CPU.

    Raises:
        TypeError: the model's class has no registered twin.
        conversion.rules.CheckpointMismatchError: the model's weights do not fit the twin that its config
            builds. The message lists every missing, unexpected and mis-shaped key.
    """
    twin = _jaxgen_twin_entry(model)
    module = twin.build_torch(model.config)
    state_dict = torch_state_dict(model)
    _check_state_dict(state_dict, module)
    module.load_state_dict(state_dict, strict=True)
    if device is not None:
        module.to(resolve_device(device) if isinstance(device, str) else device)
    return module.eval()


def jaxgen_model_from_state_dict(
    jaxgen_class: type[nnx.Module], config: Any, state_dict: Mapping[str, torch.Tensor | np.ndarray]
) -> nnx.Module:
    """Build a jaxgen model from its config and a state_dict of its torch twin, strictly.

    Args:
        jaxgen_class: a registered jaxgen model class.
        config: its model config.
        state_dict: torch key -> tensor or array, with the keys of the twin's `state_dict()`.

    Raises:
        TypeError: the class has no registered twin.
        conversion.rules.CheckpointMismatchError: the state_dict does not fit the model. The message lists
            every missing, unexpected and mis-shaped key under the twin's names.
    """
    twin = _jaxgen_twin_entry(jaxgen_class)
    prefix = twin.torch_key_prefix
    arrays = {prefix + key: _to_numpy(value) for key, value in state_dict.items()}
    graphdef, abstract_state = nnx.split(abstract_model(lambda rngs: twin.build_jaxgen(config, rngs)))
    try:
        state = torch_to_nnx(arrays, abstract_state)
    except CheckpointMismatchError as error:
        if not prefix:
            raise
        # Report the keys as the caller wrote them, without the prefix added above.
        def strip(key: str) -> str:
            return key[len(prefix) :] if key.startswith(prefix) else key

        raise CheckpointMismatchError(
            [strip(key) for key in error.missing],
            [strip(key) for key in error.unexpected],
            [(strip(key), got, expected) for key, got, expected in error.shape_mismatches],
        ) from None
    return nnx.merge(graphdef, state)


def jaxgen_twin(module: nn.Module) -> nnx.Module:
    """Build the jaxgen model of a torch twin, with the config read from the module and the same weights.

    Raises:
        TypeError: the module's class is not a registered twin.
        ValueError: the module's config uses an option that the jaxgen model lacks; the message names it.
        conversion.rules.CheckpointMismatchError: the module's state_dict does not fit the model.
    """
    twin = find_twin(module)
    if not isinstance(module, twin.torch_class):
        raise TypeError(
            f"{_class_name(type(module))} is a jaxgen model; pass a torch module, such as a "
            f"{_class_name(twin.torch_class)}."
        )
    return jaxgen_model_from_state_dict(twin.jaxgen_class, twin.read_config(module), module.state_dict())


def _build_diffusers(diffusers_class: type) -> Callable[[Any], nn.Module]:
    def build(config: Any) -> nn.Module:
        module = diffusers_class.from_config(config.to_diffusers())
        module.set_attn_processor(NPUAttnProcessor())
        return module

    return build


def _build_clip_text(transformers_class: type) -> Callable[[CLIPTextConfig], nn.Module]:
    def build(config: CLIPTextConfig) -> nn.Module:
        hf_config = transformers.CLIPTextConfig.from_dict(config.to_transformers(), attn_implementation=CLIP_ATTENTION)
        return transformers_class(hf_config)

    return build


def _read_clip_text_config(module: nn.Module) -> CLIPTextConfig:
    return CLIPTextConfig.from_transformers(module.config.to_dict())


register_twin(
    AutoencoderKL,
    diffusers.AutoencoderKL,
    build_torch=_build_diffusers(diffusers.AutoencoderKL),
    read_config=lambda module: AutoencoderKLConfig.from_diffusers(module.config),
)
register_twin(
    UNet2DConditionModel,
    diffusers.UNet2DConditionModel,
    build_torch=_build_diffusers(diffusers.UNet2DConditionModel),
    read_config=lambda module: UNet2DConditionConfig.from_diffusers(module.config),
)
register_twin(
    CLIPTextModel,
    transformers.CLIPTextModel,
    build_torch=_build_clip_text(transformers.CLIPTextModel),
    read_config=_read_clip_text_config,
    torch_key_prefix="text_model.",
)
register_twin(
    CLIPTextModelWithProjection,
    transformers.CLIPTextModelWithProjection,
    build_torch=_build_clip_text(transformers.CLIPTextModelWithProjection),
    read_config=_read_clip_text_config,
)
register_twin(
    JaxLabelConditionedUNet,
    LabelConditionedUNet,
    build_torch=LabelConditionedUNet,
    read_config=lambda module: module.config,
)


# ----- twins by training config --------------------------------------------------------------------------


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


def jaxgen_model_from_torch(state_dict: Mapping[str, torch.Tensor | np.ndarray], config: Config) -> nnx.Module:
    """Build the config's jaxgen model filled with the weights of a torch twin's state_dict.

    Raises:
        conversion.rules.CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    abstract = abstract_model(lambda rngs: build_jaxgen_model(config, rngs))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(arrays, abstract_state))
