"""Read and write Open-Sora 1.2 video VAE weights (a VideoAutoencoderPipeline state_dict) as .safetensors.

The keys are those of Open-Sora's VideoAutoencoderPipeline (hpcaitech/Open-Sora tag v1.2.0): the
weights under spatial_vae.module. and temporal_vae., plus the buffers `shift` and `scale` that Open-Sora
registers as persistent, so they are part of its state_dict. jaxgen keeps shift and scale in
`VideoVAEConfig`, so reading checks the two buffers against the config and writing adds them. Every
other key must match the model exactly. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.diffusers_io import _read_safetensors, _write_safetensors, abstract_model
from conversion.rules import nnx_to_torch, torch_to_nnx
from jaxgen.models.video_vae import VideoAutoencoder, VideoVAEConfig

__all__ = ["NORMALIZATION_KEYS", "load_video_vae", "read_state_dict", "save_video_vae", "split_normalization"]

# Buffers of Open-Sora's state_dict that jaxgen stores as the config fields of the same names.
NORMALIZATION_KEYS = ("shift", "scale")
# The weights file name of a transformers PreTrainedModel folder, which VideoAutoencoderPipeline is.
PRETRAINED_WEIGHTS_NAME = "model.safetensors"


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file as torch key -> numpy array (bfloat16 as ml_dtypes' bfloat16).

    Raises:
        FileNotFoundError: the file does not exist. For a folder that contains model.safetensors, the
            message names that file.
    """
    path = Path(path)
    if path.is_dir():
        hint = ""
        if (path / PRETRAINED_WEIGHTS_NAME).is_file():
            hint = f" It contains {PRETRAINED_WEIGHTS_NAME}; pass that file."
        raise FileNotFoundError(f"{path} is a folder, not a .safetensors file.{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found; pass the path of a .safetensors file.")
    return _read_safetensors(path)


def _format_values(array: np.ndarray) -> str:
    """Format a buffer as a tuple of its shortest decimal values in its own dtype, such as (0.1, -0.2)."""
    values = [str(value) for value in array.reshape(-1)]
    return f"({values[0]},)" if len(values) == 1 else f"({', '.join(values)})"


def _normalization_array(value: float | tuple[float, ...]) -> np.ndarray:
    """Return shift or scale in the shape of Open-Sora's buffer: [1, C, 1, 1, 1], or [] for one value."""
    array = np.asarray(value, np.float32)
    return array.reshape(1, -1, 1, 1, 1) if array.ndim else array


def split_normalization(
    state_dict: Mapping[str, np.ndarray], config: VideoVAEConfig
) -> dict[str, np.ndarray]:
    """Return state_dict without the `shift` and `scale` buffers, after checking them against the config.

    A checkpoint without the buffers is accepted, because the config fixes the normalisation.

    Raises:
        ValueError: a buffer differs from the config value, compared in the buffer's dtype.
    """
    weights = dict(state_dict)
    for key in NORMALIZATION_KEYS:
        if key not in weights:
            continue
        stored = np.asarray(weights.pop(key))
        expected = getattr(config, key)
        expected_array = np.asarray(expected, np.float32).astype(stored.dtype)
        if stored.size != expected_array.size or not np.array_equal(stored.reshape(-1), expected_array.reshape(-1)):
            values = _format_values(stored)
            raise ValueError(
                f"The checkpoint's {key} buffer is {values}, but config.{key} is {expected!r}; pass a "
                f"VideoVAEConfig with the checkpoint's values, such as dataclasses.replace(config, {key}={values})."
            )
    return weights


def load_video_vae(
    path: str | Path, config: VideoVAEConfig | None = None, *, dtype: jnp.dtype | None = None
) -> VideoAutoencoder:
    """Build a VideoAutoencoder from the .safetensors file of an Open-Sora VideoAutoencoderPipeline state_dict.

    Args:
        path: the weights file, such as the model.safetensors of an Open-Sora VAE folder.
        config: the model config; None means the "v1.2" preset.
        dtype: compute dtype passed to the model; parameters are stored as float32.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the shift or scale buffer differs from the config.
        conversion.rules.CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    config = VideoVAEConfig.from_preset("v1.2") if config is None else config
    weights = split_normalization(read_state_dict(path), config)
    abstract = abstract_model(lambda rngs: VideoAutoencoder(config, dtype=dtype, rngs=rngs))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(weights, abstract_state))


def save_video_vae(model: VideoAutoencoder, path: str | Path) -> None:
    """Write the model as an Open-Sora VideoAutoencoderPipeline state_dict, with the shift and scale buffers.

    Weights are float32. The parent folder is created if needed, and an existing file is overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = nnx_to_torch(nnx.state(model))
    for key in NORMALIZATION_KEYS:
        state_dict[key] = _normalization_array(getattr(model.config, key))
    _write_safetensors(state_dict, path)
