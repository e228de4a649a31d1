"""Read and write diffusers model folders (config.json plus weights) for jaxgen models.

A diffusers model folder, such as the unet/ or vae/ subfolder of a Stable Diffusion pipeline, contains
config.json and diffusion_pytorch_model.safetensors (or .bin, or shards listed in
diffusion_pytorch_model.safetensors.index.json). Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.rules import nnx_to_torch, rename_legacy_keys, torch_shapes, torch_to_nnx
from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

__all__ = ["abstract_model", "load_unet", "load_vae", "read_config", "read_state_dict", "save_unet", "save_vae"]

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
# Subfolder of a Stable Diffusion pipeline that contains each model class, for error hints.
PIPELINE_SUBFOLDERS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}


def read_config(folder: str | Path, class_name: str) -> dict:
    """Read config.json of a diffusers model folder and check that it describes `class_name`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder {folder} does not exist or is not a folder; pass the folder that contains "
            f"{CONFIG_NAME} and {WEIGHTS_STEM}.safetensors."
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        matches = [path.parent for path in sorted(folder.glob(f"*/{CONFIG_NAME}")) if _class_of(path) == class_name]
        hint = f" {matches[0]} contains a {class_name}; pass that folder." if matches else ""
        raise FileNotFoundError(f"{config_path} not found, so {folder} is not a diffusers model folder.{hint}")
    config = json.loads(config_path.read_text())
    found = config.get("_class_name")
    if found != class_name:
        subfolder = PIPELINE_SUBFOLDERS.get(class_name)
        hint = f" (for a Stable Diffusion pipeline, its {subfolder}/ subfolder)" if subfolder else ""
        raise ValueError(
            f"{config_path} describes a {found!r}, not a {class_name!r}; pass the folder of the "
            f"{class_name}{hint}."
        )
    return config


def _class_of(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # Unreadable or not a JSON object: not a candidate for the hint.


def _torch_tensor_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; reinterpret the bits as ml_dtypes' bfloat16 (jnp.bfloat16).
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:
        # safetensors' numpy reader rejects bfloat16; its flax reader returns ml_dtypes arrays.
        with safe_open(path, framework="flax") as file:
            return {key: np.asarray(file.get_tensor(key)) for key in file.keys()}


def _read_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    import torch

    # weights_only=True unpickles only tensors and plain containers, never arbitrary objects.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return {key: _torch_tensor_to_numpy(value) for key, value in loaded.items()}


def read_weight_files(
    folder: str | Path, safetensors_stem: str, pickle_stem: str, *, variant: str | None = None
) -> dict[str, np.ndarray]:
    """Read a model folder's weights as torch key -> numpy array, from one file or from shards.

    Looks for, in order: {safetensors_stem}.safetensors, the shards listed in
    {safetensors_stem}.safetensors.index.json, {pickle_stem}.bin and the shards of
    {pickle_stem}.bin.index.json, with ".{variant}" before the extension when given (such as "fp16").
    Pickles are read with torch.load(weights_only=True).

    Raises:
        FileNotFoundError: none of those files exists; the message lists the names looked for.
    """
    folder = Path(folder)
    suffix = "" if variant is None else f".{variant}"
    candidates = [
        (folder / f"{safetensors_stem}{suffix}.safetensors", _read_safetensors),
        (folder / f"{pickle_stem}{suffix}.bin", _read_torch_pickle),
    ]
    for single, read in candidates:
        index = single.with_name(f"{single.name}.index.json")
        if single.is_file():
            return read(single)
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            state_dict: dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(read(folder / shard))
            return state_dict
    names = ", ".join(f"{path.name} (or {path.name}.index.json)" for path, _ in candidates)
    raise FileNotFoundError(
        f"No weights in {folder}: looked for {names}. Download the weights into this folder, or pass "
        f"variant= for files such as {safetensors_stem}.fp16.safetensors."
    )


def read_state_dict(folder: str | Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """Read the weights of a diffusers model folder (diffusion_pytorch_model.*) as torch key -> numpy array.

    The files looked for and their order are those of `read_weight_files`.
    """
    return read_weight_files(folder, WEIGHTS_STEM, WEIGHTS_STEM, variant=variant)


def abstract_model(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """Return build(rngs) with every variable as a jax.ShapeDtypeStruct, allocating no weights.

    Same result as nnx.eval_shape(lambda: build(nnx.Rngs(0))), only faster for large models.
    """

    def build_with_concrete_counters() -> nnx.Module:
        rngs = nnx.Rngs(0)
        # NOTE: With flax 0.12.8 and jax 0.10.2, each update of a traced RNG counter makes JAX
        # walk the whole trace to build an error message that is then discarded. So eval_shape
        # costs O(parameters^2) time: 12.5 s for the SD 1.5 U-Net, 100 s for an SDXL-sized one
        # (2-core x86). A numpy counter stays concrete under the trace, and SD 1.5 takes 1.4 s.
        # Only the counter changes, and the abstract shapes do not depend on it.
        for _, stream in rngs.items():
            stream.count.set_value(np.zeros(stream.count.get_value().shape, np.uint32))
        return build(rngs)

    return nnx.eval_shape(build_with_concrete_counters)


def load_unet(
    folder: str | Path, *, variant: str | None = None, dtype: jnp.dtype | None = None
) -> UNet2DConditionModel:
    """Build a UNet2DConditionModel from a diffusers model folder.

    Args:
        folder: folder with config.json and the weights, such as a pipeline's unet/ subfolder.
        variant: weights file variant, such as "fp16" for diffusion_pytorch_model.fp16.safetensors.
        dtype: compute dtype passed to the model; parameters are stored as float32.

    Raises:
        FileNotFoundError: the folder, config.json or the weights are missing.
        ValueError: config.json is not a UNet2DConditionModel config or uses unsupported options.
        conversion.rules.CheckpointMismatchError: the weights do not match the config.
    """
    return _load_model(folder, UNet2DConditionConfig, UNet2DConditionModel, variant=variant, dtype=dtype)


def load_vae(folder: str | Path, *, variant: str | None = None, dtype: jnp.dtype | None = None) -> AutoencoderKL:
    """Build an AutoencoderKL from a diffusers model folder, such as a pipeline's vae/ subfolder.

    Args and Raises are those of `load_unet`, for an AutoencoderKL config. Checkpoints with the
    older attention names (query, key, value, proj_attn) load through
    `conversion.rules.LEGACY_RENAMES`.
    """
    return _load_model(folder, AutoencoderKLConfig, AutoencoderKL, variant=variant, dtype=dtype)


def _load_model(
    folder: str | Path, config_type: type, model_type: type, *, variant: str | None, dtype: jnp.dtype | None
) -> nnx.Module:
    """Build model_type(config) from a diffusers folder of the model class of the same name."""
    config = config_type.from_diffusers(read_config(folder, model_type.__name__))
    state_dict = read_state_dict(folder, variant=variant)
    abstract = abstract_model(lambda rngs: model_type(config, dtype=dtype, rngs=rngs))
    graphdef, abstract_state = nnx.split(abstract)
    state_dict = rename_legacy_keys(state_dict, torch_shapes(abstract_state))
    return nnx.merge(graphdef, torch_to_nnx(state_dict, abstract_state))


def _write_safetensors(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" marks the file as a torch checkpoint for transformers-style loaders.
    save_file(dict(state_dict), path, metadata={"format": "pt"})


def save_unet(model: UNet2DConditionModel, folder: str | Path) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors that diffusers' from_pretrained loads.

    The folder is created if needed; existing files of the same names are overwritten.
    """
    _save_model(model, folder)


def save_vae(model: AutoencoderKL, folder: str | Path) -> None:
    """Write an AutoencoderKL as a diffusers model folder, in the files that `save_unet` writes."""
    _save_model(model, folder)


def _save_model(model: UNet2DConditionModel | AutoencoderKL, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_diffusers()
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_safetensors(nnx_to_torch(nnx.state(model)), folder / f"{WEIGHTS_STEM}.safetensors")
