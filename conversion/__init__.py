"""Checkpoint readers and writers, and the name/layout rules between torch and Flax NNX."""

from conversion.diffusers_io import load_unet, read_config, read_state_dict, save_unet
from conversion.rules import (
    CheckpointMismatchError,
    LeafRule,
    nnx_to_torch,
    torch_key,
    torch_shapes,
    torch_to_nnx,
)

__all__ = [
    "CheckpointMismatchError",
    "LeafRule",
    "load_unet",
    "nnx_to_torch",
    "read_config",
    "read_state_dict",
    "save_unet",
    "torch_key",
    "torch_shapes",
    "torch_to_nnx",
]
