"""Checkpoint readers and writers, and the name/layout rules between torch and Flax NNX."""

from conversion.diffusers_io import load_unet, load_vae, read_config, read_state_dict, save_unet, save_vae
from conversion.rules import (
    CheckpointMismatchError,
    LeafRule,
    nnx_to_torch,
    torch_key,
    torch_shapes,
    torch_to_nnx,
)
from conversion.transformers_io import load_clip_text, load_clip_tokenizer, save_clip_text, tokenize
from conversion.lora_io import LoRAFileError, load_lora_weights, read_lora_adapters, save_lora_weights
from conversion.t5_io import load_t5_encoder, load_t5_tokenizer, save_t5_encoder

__all__ = [
    "CheckpointMismatchError",
    "LeafRule",
    "load_unet",
    "load_vae",
    "nnx_to_torch",
    "read_config",
    "read_state_dict",
    "save_unet",
    "save_vae",
    "torch_key",
    "torch_shapes",
    "torch_to_nnx",
    "load_clip_text",
    "load_clip_tokenizer",
    "save_clip_text",
    "tokenize",
    "LoRAFileError",
    "load_lora_weights",
    "read_lora_adapters",
    "save_lora_weights",
    "load_t5_encoder",
    "load_t5_tokenizer",
    "save_t5_encoder",
]
