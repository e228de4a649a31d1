"""Read and write transformers model folders (config.json plus weights) for jaxgen's CLIP text encoders.

A transformers model folder, such as the text_encoder/ or text_encoder_2/ subfolder of a Stable
Diffusion pipeline, contains config.json and model.safetensors (or shards listed in
model.safetensors.index.json, or the older pytorch_model.bin). The tokenizer/ subfolder contains
vocab.json and merges.txt. Nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.diffusers_io import _write_safetensors, abstract_model, read_weight_files
from conversion.rules import nnx_to_torch, torch_to_nnx
from jaxgen.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

__all__ = [
    "load_clip_text",
    "load_clip_tokenizer",
    "read_transformers_config",
    "read_transformers_state_dict",
    "save_clip_text",
    "tokenize",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_STEM = "model"
PICKLE_STEM = "pytorch_model"
TEXT_MODEL_PREFIX = "text_model."
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}

# Torch buffers of older CLIP checkpoints that contain no weights (position_ids is arange(L), which
# the JAX model computes). They are dropped when reading and never written, because transformers
# 5.25 registers the buffer with persistent=False and loads checkpoints without it.
IGNORED_CLIP_TEXT_KEYS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})


def read_transformers_config(folder: str | Path) -> dict:
    """Read config.json of a transformers model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder {folder} does not exist or is not a folder; pass the folder that contains "
            f"{CONFIG_NAME} and {SAFETENSORS_STEM}.safetensors, such as a pipeline's text_encoder/."
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        candidates = sorted(path.parent.name for path in folder.glob(f"text_encoder*/{CONFIG_NAME}"))
        hint = f" This folder has {', '.join(candidates)}; pass one of them." if candidates else ""
        raise FileNotFoundError(f"{config_path} not found, so {folder} is not a transformers model folder.{hint}")
    return json.loads(config_path.read_text())


def read_transformers_state_dict(folder: str | Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """Read the weights of a transformers model folder (model.safetensors or pytorch_model.bin) as torch key -> array.

    The files looked for and their order are those of `conversion.diffusers_io.read_weight_files`.
    """
    return read_weight_files(folder, SAFETENSORS_STEM, PICKLE_STEM, variant=variant)


def _with_projection_from_config(config: Mapping, folder: Path) -> bool:
    architectures = config.get("architectures") or []
    known = [name for name in architectures if name in ARCHITECTURES]
    if len(known) != 1:
        raise ValueError(
            f"Cannot tell the model class from {folder / CONFIG_NAME}: its architectures are "
            f"{architectures!r}, expected one of {sorted(ARCHITECTURES)}. Pass with_projection=True "
            "(CLIPTextModelWithProjection) or with_projection=False (CLIPTextModel)."
        )
    return ARCHITECTURES[known[0]]


def _clip_text_checkpoint_keys(state_dict: Mapping[str, np.ndarray], *, with_projection: bool) -> dict:
    """Drop ignored buffers and give every key the module paths of jaxgen's CLIP models.

    transformers 5.25 saves CLIPTextModel without the "text_model." prefix that the published
    checkpoints (Stable Diffusion's text_encoder/) use. A plain text model whose keys all lack the prefix gets it.
    """
    weights = {key: value for key, value in state_dict.items() if key not in IGNORED_CLIP_TEXT_KEYS}
    if not with_projection and not any(key.startswith(TEXT_MODEL_PREFIX) for key in weights):
        weights = {TEXT_MODEL_PREFIX + key: value for key, value in weights.items()}
    return weights


def load_clip_text(
    folder: str | Path,
    *,
    with_projection: bool | None = None,
    variant: str | None = None,
    dtype: jnp.dtype | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build a CLIP text encoder from a transformers model folder.

    Args:
        folder: folder with config.json and the weights, such as a pipeline's text_encoder/.
        with_projection: True for CLIPTextModelWithProjection, False for CLIPTextModel, None to
            follow the architectures entry of config.json.
        variant: weights file variant, such as "fp16" for model.fp16.safetensors.
        dtype: compute dtype passed to the model; parameters are stored as float32.

    Raises:
        FileNotFoundError: the folder, config.json or the weights are missing.
        ValueError: config.json is not a supported CLIP text config, or names no model class.
        conversion.rules.CheckpointMismatchError: the weights do not match the config.
    """
    folder = Path(folder)
    raw_config = read_transformers_config(folder)
    config = CLIPTextConfig.from_transformers(raw_config)
    if with_projection is None:
        with_projection = _with_projection_from_config(raw_config, folder)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel

    state_dict = _clip_text_checkpoint_keys(
        read_transformers_state_dict(folder, variant=variant), with_projection=with_projection
    )
    abstract = abstract_model(lambda rngs: model_class(config, dtype=dtype, rngs=rngs))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(state_dict, abstract_state))


def save_clip_text(model: CLIPTextModel | CLIPTextModelWithProjection, folder: str | Path) -> None:
    """Write config.json and model.safetensors that transformers' from_pretrained loads.

    Keys carry the "text_model." prefix of the published checkpoints, which transformers 5.25
    loads into both classes. The folder is created if needed; existing files of the same names are overwritten.
    """
    if not isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        raise TypeError(
            f"save_clip_text expects a CLIPTextModel or CLIPTextModelWithProjection, got {type(model).__name__}."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [type(model).__name__], **model.config.to_transformers()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_safetensors(nnx_to_torch(nnx.state(model)), folder / f"{SAFETENSORS_STEM}.safetensors")


def load_clip_tokenizer(folder: str | Path):
    """Load transformers' CLIPTokenizer from a local folder (vocab.json and merges.txt, or tokenizer.json).

    In transformers 5.x, CLIPTokenizer is the tokenizers-backed class that 4.x called
    CLIPTokenizerFast. Files are read with local_files_only=True, so nothing is downloaded.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    has_files = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if not has_files:
        candidates = sorted(path.parent.name for path in folder.glob("tokenizer*/vocab.json"))
        hint = f" This folder has {', '.join(candidates)}; pass one of them." if candidates else ""
        raise FileNotFoundError(
            f"No CLIP tokenizer in {folder}: expected tokenizer.json, or vocab.json and merges.txt.{hint}"
        )
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenize prompts into fixed-length rows, padded and truncated to max_length.

    Each row is <start-of-text>, the prompt's tokens and <end-of-text>, then the tokenizer's pad
    token. A prompt that does not fit keeps its first max_length - 2 tokens, and a warning names
    the prompt, the number of dropped tokens and their text.

    Returns:
        "input_ids" and "attention_mask" (1 for real tokens, 0 for padding), int32 arrays [B, L]
        with L = max_length.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}.")

    # verbose=False silences the tokenizer's own warning about sequences above model_max_length.
    untruncated = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    for index, (prompt, ids) in enumerate(zip(prompts, untruncated)):
        dropped = len(ids) - max_length
        if dropped > 0:
            # The kept row is ids[:max_length - 1] plus the end token, so the dropped prompt tokens
            # are ids[max_length - 1 : -1].
            dropped_text = tokenizer.decode(ids[max_length - 1 : -1])
            logger.warning(
                "Prompt %d (%r) was truncated to max_length=%d: %d of its tokens were dropped: %r",
                index,
                prompt,
                max_length,
                dropped,
                dropped_text,
            )

    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return {
        "input_ids": np.asarray(batch["input_ids"], dtype=np.int32),
        "attention_mask": np.asarray(batch["attention_mask"], dtype=np.int32),
    }
