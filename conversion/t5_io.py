"""Read and write transformers T5 encoder folders (config.json plus weights) and load T5 tokenizers.

A T5 encoder folder, such as the text_encoder_3/ subfolder of a Stable Diffusion 3 pipeline,
contains config.json and model.safetensors (or
shards listed in model.safetensors.index.json, or the older pytorch_model.bin). Folders of a
whole T5ForConditionalGeneration load too: their decoder weights are skipped. Nothing here
touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.diffusers_io import _write_safetensors, abstract_model
from conversion.rules import nnx_to_torch, torch_to_nnx
from conversion.transformers_io import (
    CONFIG_NAME,
    SAFETENSORS_STEM,
    read_transformers_config,
    read_transformers_state_dict,
)
from jaxgen.models.t5 import T5Config, T5EncoderModel

__all__ = ["load_t5_encoder", "load_t5_tokenizer", "save_t5_encoder"]

logger = logging.getLogger(__name__)

ARCHITECTURE = "T5EncoderModel"
SHARED_KEY = "shared.weight"
# transformers ties encoder.embed_tokens to shared. Checkpoints contain either key or both, and
# transformers 5.25 writes only shared.weight.
EMBED_TOKENS_KEY = "encoder.embed_tokens.weight"
# Weights of T5Model and T5ForConditionalGeneration that the encoder does not use.
DECODER_KEY_PREFIX = "decoder."
LM_HEAD_KEY = "lm_head.weight"


def _encoder_checkpoint_keys(state_dict: Mapping[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    """Drop decoder weights and store the token embedding under "shared.weight" only.

    When both embedding keys are present, encoder.embed_tokens.weight is used, because
    transformers 5.25's encoder embeds tokens with it if the two differ (it then warns and leaves
    them untied).
    """
    weights = {}
    skipped = 0
    for key, value in state_dict.items():
        if key.startswith(DECODER_KEY_PREFIX) or key == LM_HEAD_KEY:
            skipped += 1
        else:
            weights[key] = value
    if skipped:
        logger.info("Skipped %d decoder and lm_head weights of %s, which the T5 encoder does not use.", skipped,
                    folder)  # fmt: skip

    if EMBED_TOKENS_KEY in weights:
        embed_tokens = weights.pop(EMBED_TOKENS_KEY)
        shared = weights.get(SHARED_KEY)
        if shared is not None and not np.array_equal(np.asarray(shared), np.asarray(embed_tokens)):
            logger.warning(
                "%s has different %s and %s. Using %s, because transformers' T5EncoderModel embeds tokens with it.",
                folder, SHARED_KEY, EMBED_TOKENS_KEY, EMBED_TOKENS_KEY,
            )  # fmt: skip
        weights[SHARED_KEY] = embed_tokens
    return weights


def load_t5_encoder(
    folder: str | Path, *, variant: str | None = None, dtype: jnp.dtype | None = None
) -> T5EncoderModel:
    """Build a T5EncoderModel from a transformers model folder.

    Args:
        folder: folder with config.json and the weights of a T5EncoderModel, T5Model or
            T5ForConditionalGeneration.
        variant: weights file variant, such as "fp16" for model.fp16.safetensors.
        dtype: compute dtype passed to the model. Parameters are stored as float32.

    Raises:
        FileNotFoundError: the folder, config.json or the weights are missing.
        ValueError: config.json is not a supported T5 config.
        conversion.rules.CheckpointMismatchError: the weights do not match the config. Only
            decoder.* and lm_head.weight may be left over.
    """
    folder = Path(folder)
    config = T5Config.from_transformers(read_transformers_config(folder))
    state_dict = _encoder_checkpoint_keys(read_transformers_state_dict(folder, variant=variant), folder)
    abstract = abstract_model(lambda rngs: T5EncoderModel(config, dtype=dtype, rngs=rngs))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(state_dict, abstract_state))


def save_t5_encoder(model: T5EncoderModel, folder: str | Path) -> None:
    """Write config.json and model.safetensors that transformers' T5EncoderModel.from_pretrained loads.

    The token embedding is written once, as "shared.weight", like transformers 5.25 does. The
    folder is created if needed, and existing files of the same names are overwritten.
    """
    if not isinstance(model, T5EncoderModel):
        raise TypeError(f"save_t5_encoder expects a T5EncoderModel, got {type(model).__name__}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [ARCHITECTURE], **model.config.to_transformers()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_safetensors(nnx_to_torch(nnx.state(model)), folder / f"{SAFETENSORS_STEM}.safetensors")


def load_t5_tokenizer(folder: str | Path):
    """Load transformers' T5Tokenizer from a local folder (tokenizer.json, or spiece.model).

    In transformers 5.x, T5Tokenizer is the tokenizers-backed class that 4.x called
    T5TokenizerFast. Files are read with local_files_only=True, so nothing is downloaded.
    """
    from transformers import T5Tokenizer

    folder = Path(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        patterns = ("tokenizer*/tokenizer.json", "tokenizer*/spiece.model")
        candidates = sorted({path.parent.name for pattern in patterns for path in folder.glob(pattern)})
        hint = f" Pass a subfolder that contains one: {', '.join(candidates)}." if candidates else ""
        raise FileNotFoundError(f"No T5 tokenizer in {folder}: expected tokenizer.json or spiece.model.{hint}")
    # transformers 5.25 converts a lone spiece.model with the sentencepiece and protobuf packages.
    # Without sentencepiece it falls back to a TikToken reader, which fails with an unrelated error.
    if not (folder / "tokenizer.json").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise ImportError(
            f"{folder} contains spiece.model but no tokenizer.json, and reading spiece.model needs the "
            "sentencepiece and protobuf packages. Install them, or save the tokenizer with "
            "save_pretrained() where they are installed, which writes tokenizer.json."
        )
    # NOTE: Only the tokenizer.json path is tested.
    return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
