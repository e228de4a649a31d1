"""Read and write LoRA adapter files for jaxgen models: diffusers/peft and kohya-ss safetensors.

`models` arguments map pipeline component names to NNX models, such as {"unet": unet} or
{"unet": unet, "text_encoder": clip}. Module paths inside a model are its dotted NNX paths,
which equal the diffusers and transformers module names.

diffusers/peft layout, as diffusers 0.42.1 `StableDiffusionPipeline.save_lora_weights` writes it
and `load_lora_weights` reads it (file pytorch_lora_weights.safetensors):

    unet.<module path>.lora_A.weight   [r, in]     (jaxgen lora_A [in, r], transposed)
    unet.<module path>.lora_B.weight   [out, r]    (jaxgen lora_B [r, out], transposed)

Text encoders use the prefixes text_encoder. and text_encoder_2. The file stores no alpha
tensor. diffusers (loaders/lora_base.py, write_lora_layers) puts the peft LoraConfig fields into
the safetensors header under "lora_adapter_metadata", as JSON with keys prefixed by the
component: {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...], ...}. On loading it
builds LoraConfig from those fields, and peft scales each layer by lora_alpha / r, with per-layer
exceptions in rank_pattern and alpha_pattern (regexes matched as re.match(rf"(.*\\.)?({pattern})$",
path) in peft's get_pattern_key) and lora_alpha / sqrt(r) when use_rslora is set. Without that
header, diffusers (utils/peft_utils.py, get_peft_kwargs) sets alpha = r for every layer, a scale
of 1. Files written by a diffusers model's save_lora_adapter carry neither the key prefix nor the
metadata prefix. This module writes the header (r, lora_alpha, rank_pattern, alpha_pattern,
target_modules, use_dora, lora_bias, the fields that get_peft_kwargs produces) and reads it back.

kohya-ss layout (sd-scripts networks/lora.py):

    lora_unet_<module path with "_" for ".">.lora_down.weight   [r, in] or [r, in, 1, 1]
    lora_unet_<...>.lora_up.weight                               [out, r] or [out, r, 1, 1]
    lora_unet_<...>.alpha                                        scalar, scale = alpha / r

lora_te_ and lora_te1_ name the first text encoder ("text_encoder"), lora_te2_ the second
("text_encoder_2"). A missing alpha means alpha = r, as in sd-scripts and diffusers. Because "_"
also occurs inside names, a kohya name is looked up in a table built from the model's own paths.
For SD 1.x, sd-scripts uses diffusers' U-Net names (lora_unet_down_blocks_0_attentions_0_...).
For SDXL it uses the LDM/sgm names of the original U-Net (lora_unet_input_blocks_4_1_...). These
are mapped from the model's block structure as follows, which agrees with sd-scripts'
library/sdxl_model_util.py (make_unet_conversion_map) for SDXL (n counts blocks in order):

    LDM / sgm name                          diffusers / jaxgen path
    input_blocks.0.0                        conv_in
    time_embed.0, time_embed.2              time_embedding.linear_1, time_embedding.linear_2
    label_emb.0.0, label_emb.0.2            add_embedding.linear_1, add_embedding.linear_2
    input_blocks.n.0  (n from 1)            down_blocks.b.resnets.j
    input_blocks.n.1                        down_blocks.b.attentions.j
    input_blocks.n.0.op                     down_blocks.b.downsamplers.0.conv (its own n)
    middle_block.0, .1, .2                  mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.n.0  (n from 0)           up_blocks.b.resnets.j
    output_blocks.n.1                       up_blocks.b.attentions.j
    output_blocks.n.2.conv (n.1.conv in     up_blocks.b.upsamplers.0.conv, n of the block's last resnet
      a block without attentions)
    out.0, out.2                            conv_norm_out, conv_out
    inside a resnet: in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
                  -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
    inside an attention block the names are the same in both (proj_in, transformer_blocks.k.attn1.to_q, ...)

The same table serves SD 1.x files with LDM names. Not supported: LoCon/LoHa/LoKr convolution
adapters with kernels larger than 1x1, DoRA (dora_scale, lora_magnitude_vector), LoRA biases,
and diffusers' older attention-processor names (to_q_lora.down.weight). Such keys raise an error.

Adapters on nnx.Linear layers load as LoRALinear layers (merge=False) or fold into the kernels
(merge=True). Adapters on 1x1 convolutions, such as kohya's proj_in/proj_out of SD 1.x, can
only be folded, because jaxgen applies those convolutions through their kernel directly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from conversion.diffusers_io import _read_safetensors
from jaxgen.lora import LoRAAdapter, add_lora_adapters, fold_lora_adapters, lora_modules

__all__ = [
    "LORA_WEIGHT_NAME",
    "METADATA_KEY",
    "LoRAFileError",
    "check_lora_pairs",
    "LoRALoadResult",
    "kohya_names",
    "ldm_unet_paths",
    "load_lora_weights",
    "lora_state_dict",
    "read_lora_adapters",
    "read_lora_file",
    "save_lora_weights",
]

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key for the LoraConfig JSON

# Pipeline components that prefix diffusers/peft keys.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
# kohya prefixes by component. lora_te1_ and lora_te2_ are tested before lora_te_.
KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# transformers 5.25 names CLIPTextModel's modules without this level, which its checkpoint keys and
# jaxgen's paths keep. So text encoder keys that lack it are matched with it as well.
TEXT_MODEL_PREFIX = "text_model."
# peft's LoraConfig defaults for fields that a metadata header leaves out.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_KOHYA_SUFFIXES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# LDM resnet sublayer names -> diffusers names.
_LDM_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class LoRAFileError(ValueError):
    """A LoRA file does not fit the models: unmatched, unsupported or mis-shaped keys."""


@dataclasses.dataclass(frozen=True)
class LoRALoadResult:
    """Result of load_lora_weights.

    Attributes:
        adapted: component name -> dotted paths of the layers that received an adapter.
        unmatched_keys: file keys that matched no layer (empty unless strict=False).
    """

    adapted: dict[str, list[str]]
    unmatched_keys: list[str]


# ----- writing -----------------------------------------------------------------------------


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list) -> object:
    # Ties go to the smallest value, so the output does not depend on layer order.
    counts = collections.Counter(values)
    best = max(counts.values())
    return min(value for value, count in counts.items() if count == best)


def _component_metadata(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """Return peft LoraConfig fields for layers with these ranks and alphas, by dotted path."""
    r = _most_common(list(ranks.values()))
    lora_alpha = _most_common(list(alphas.values()))
    # "^" plus the escaped path matches exactly that path under peft's get_pattern_key.
    rank_pattern = {f"^{re.escape(path)}": rank for path, rank in ranks.items() if rank != r}
    alpha_pattern = {
        f"^{re.escape(path)}": _json_number(alpha) for path, alpha in alphas.items() if alpha != lora_alpha
    }
    return {
        "r": int(r),
        "lora_alpha": _json_number(lora_alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": False,
    }


def lora_state_dict(models: Mapping[str, nnx.Module]) -> tuple[dict[str, np.ndarray], dict]:
    """Return the diffusers/peft state dict and LoraConfig metadata of the models' LoRALinear layers.

    Keys are "{component}.{path}.lora_A.weight" [r, in] and ".lora_B.weight" [out, r], and metadata
    keys are "{component}.r", "{component}.lora_alpha" and so on.

    Raises:
        ValueError: no model has a LoRALinear layer.
    """
    state_dict: dict[str, np.ndarray] = {}
    metadata: dict = {}
    for component, model in models.items():
        layers = lora_modules(model)
        if not layers:
            continue
        for path, layer in layers.items():
            key = f"{component}.{path}"
            state_dict[f"{key}.lora_A.weight"] = np.array(layer.lora_A.get_value()).T.copy()
            state_dict[f"{key}.lora_B.weight"] = np.array(layer.lora_B.get_value()).T.copy()
        fields = _component_metadata(
            {path: layer.rank for path, layer in layers.items()},
            {path: layer.alpha for path, layer in layers.items()},
        )
        metadata.update({f"{component}.{name}": value for name, value in fields.items()})
    if not state_dict:
        raise ValueError(
            f"None of the models {sorted(models)} has LoRA layers. Add them with jaxgen.lora.apply_lora first."
        )
    return state_dict, metadata


_PAIRED_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
                    ".lora_up.weight": "up"}


def check_lora_pairs(state_dict: Mapping[str, np.ndarray], source: str = "the LoRA file") -> None:
    """Check, without any model, that a LoRA state dict contains only paired down/up matrices and alphas.

    Raises:
        LoRAFileError: the state dict is empty, has a key of neither the diffusers/peft nor the kohya
            layout, or a down matrix without its up matrix (or the reverse). The message names the keys.
    """
    if not state_dict:
        raise LoRAFileError(f"{source} contains no tensors; pass a file written by save_lora_weights or diffusers")
    downs, ups, unsupported = set(), set(), []
    for key in state_dict:
        suffix = next((suffix for suffix in _PAIRED_SUFFIXES if key.endswith(suffix)), None)
        if suffix is None:
            if not key.endswith(".alpha"):
                unsupported.append(key)
            continue
        (downs if _PAIRED_SUFFIXES[suffix] == "down" else ups).add(key[: -len(suffix)])
    if unsupported:
        raise LoRAFileError(
            f"{source} has keys of no LoRA layout: {', '.join(sorted(unsupported)[:5])}"
            f"{' ...' if len(unsupported) > 5 else ''}; expected names ending in .lora_A.weight and .lora_B.weight "
            "(diffusers/peft) or .lora_down.weight, .lora_up.weight and .alpha (kohya)"
        )
    unpaired = sorted(downs ^ ups)
    if unpaired:
        raise LoRAFileError(
            f"{source} has layers with only one of the down (lora_A) and up (lora_B) matrices: "
            f"{', '.join(unpaired[:5])}{' ...' if len(unpaired) > 5 else ''}"
        )


def _lora_file_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME


def save_lora_weights(path: str | Path, models: Mapping[str, nnx.Module]) -> Path:
    """Write the models' adapters as a diffusers/peft safetensors file and return the file path.

    `path` is either the .safetensors file or a folder, which receives pytorch_lora_weights.safetensors
    (the name diffusers' load_lora_weights looks for). Folders are created as needed.
    """
    from safetensors.numpy import save_file

    state_dict, metadata = lora_state_dict(models)
    file = _lora_file_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_file(state_dict, file, metadata=header)
    return file


# ----- reading -----------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a LoRA safetensors file (or a folder's pytorch_lora_weights.safetensors).

    Returns the tensors by key and the safetensors header metadata (strings, empty if none).
    """
    from safetensors import safe_open

    file = _lora_file_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"LoRA file {file} not found. Pass a .safetensors file or a folder that contains {LORA_WEIGHT_NAME}."
        )
    with safe_open(file, framework="numpy") as handle:
        header = dict(handle.metadata() or {})
    return _read_safetensors(file), header


def _parse_metadata(header: Mapping[str, str]) -> dict:
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        raise LoRAFileError(f"The {METADATA_KEY!r} header entry is not valid JSON: {error}.") from error
    if not isinstance(metadata, dict):
        raise LoRAFileError(f"The {METADATA_KEY!r} header entry must be a JSON object, got {type(metadata).__name__}.")
    return metadata


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _kernel_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Return the modules with a `kernel` variable (nnx.Linear, nnx.Conv, ...) by dotted path."""
    modules = {}
    for path, module in nnx.iter_modules(model):
        if path and isinstance(getattr(module, "kernel", None), nnx.Variable):
            modules[".".join(str(part) for part in path)] = module
    return modules


def _length(container) -> int:
    return 0 if container is None else len(container)


def ldm_unet_paths(unet: nnx.Module) -> dict[str, str]:
    """Return the LDM/sgm name of each block and top-level layer of a diffusers-style U-Net.

    Keys are diffusers paths ("down_blocks.1.attentions.0", "conv_in"), values the LDM names
    ("input_blocks.4.1", "input_blocks.0.0"). The module docstring has the full table. Models
    without down_blocks and up_blocks attributes get {}.
    """
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        return {}
    names = dict(_LDM_TOP_LEVEL)
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            names[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{index}.0"
            if j < _length(attentions):
                names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if _length(getattr(block, "downsamplers", None)):
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        names["mid_block.resnets.0"] = "middle_block.0"
        if _length(getattr(mid, "attentions", None)):
            names["mid_block.attentions.0"] = "middle_block.1"
        if len(mid.resnets) > 1:
            names["mid_block.resnets.1"] = "middle_block.2"

    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        last = len(block.resnets) - 1
        for j in range(len(block.resnets)):
            names[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{index}.0"
            slot = 1
            if j < _length(attentions):
                names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
                slot = 2
            if j == last and _length(getattr(block, "upsamplers", None)):
                names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return names


def _ldm_path(path: str, block_names: Mapping[str, str]) -> str | None:
    """Return the LDM name of a diffusers layer path, or None if no block prefix covers it."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix not in block_names:
            continue
        rest = parts[end:]
        if ".resnets." in f".{prefix}." and rest and rest[0] in _LDM_RESNET_NAMES:
            rest = [*_LDM_RESNET_NAMES[rest[0]].split("."), *rest[1:]]
        return ".".join([block_names[prefix], *rest])
    return None


def kohya_names(model: nnx.Module) -> dict[str, str | None]:
    """Map the kohya layer names of `model` to its dotted layer paths.

    Names are underscored diffusers paths and, for a U-Net, underscored LDM names, both without
    the lora_unet_ / lora_te_ prefix: "down_blocks_1_attentions_0_proj_in" and
    "input_blocks_4_1_proj_in" both map to "down_blocks.1.attentions.0.proj_in". A name that two
    paths share maps to None.
    """
    table: dict[str, str | None] = {}
    block_names = ldm_unet_paths(model)

    def add(name: str, path: str) -> None:
        if name in table and table[name] != path:
            table[name] = None
        else:
            table[name] = path

    for path in _kernel_modules(model):
        add(_underscored(path), path)
        ldm = _ldm_path(path, block_names) if block_names else None
        if ldm is not None:
            add(_underscored(ldm), path)
    return table


@dataclasses.dataclass
class _Entry:
    """Tensors of one layer in a file, before they are matched to a model."""

    component: str | None
    name: str  # dotted path (peft) or underscored name (kohya), without the component prefix
    keys: list[str] = dataclasses.field(default_factory=list)
    down: np.ndarray | None = None  # [r, in], torch layout
    up: np.ndarray | None = None  # [out, r]
    alpha: float | None = None


def _split_component(key: str, components: set[str]) -> tuple[str | None, str]:
    first, _, rest = key.partition(".")
    if rest and (first in components or first in COMPONENTS):
        return first, rest
    return None, key


def _collect_peft(state_dict, components) -> tuple[dict, list[str]]:
    entries: dict[tuple, _Entry] = {}
    unsupported = []
    for key, value in state_dict.items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unsupported.append(key)
            continue
        component, name = _split_component(key[: -len(suffix)], components)
        entry = entries.setdefault((component, name), _Entry(component, name))
        entry.keys.append(key)
        if _PEFT_SUFFIXES[suffix] == "A":
            entry.down = value
        else:
            entry.up = value
    return entries, unsupported


def _collect_kohya(state_dict) -> tuple[dict, list[str]]:
    entries: dict[tuple, _Entry] = {}
    unsupported = []
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        prefix = next(((p, c) for p, c in KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None or suffix not in _KOHYA_SUFFIXES:
            unsupported.append(key)
            continue
        component = prefix[1]
        name = name[len(prefix[0]):]
        entry = entries.setdefault((component, name), _Entry(component, name))
        entry.keys.append(key)
        kind = _KOHYA_SUFFIXES[suffix]
        if kind == "A":
            entry.down = value
        elif kind == "B":
            entry.up = value
        else:
            entry.alpha = float(np.asarray(value, np.float64).reshape(()))
    return entries, unsupported


def _is_kohya(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(key.startswith(tuple(p for p, _ in KOHYA_PREFIXES)) for key in state_dict)


def _pattern_value(patterns: Mapping[str, object], path: str, default: object) -> object:
    """Return the value of the first pattern that matches `path` the way peft's get_pattern_key does."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _component_fields(metadata: Mapping, component: str | None) -> dict:
    if component is None:
        return {key: value for key, value in metadata.items() if "." not in key}
    prefix = f"{component}."
    return {key[len(prefix):]: value for key, value in metadata.items() if key.startswith(prefix)}


def _peft_alpha(fields: Mapping, path: str, rank: int, key: str) -> float:
    """Return the alpha that gives peft's scale for this layer (alpha / r, or alpha / sqrt(r))."""
    if not fields:
        return float(rank)  # diffusers without metadata: lora_alpha = r, scale 1.
    expected_rank = _pattern_value(fields.get("rank_pattern") or {}, path, fields.get("r", PEFT_DEFAULT_R))
    if int(expected_rank) != rank:
        raise LoRAFileError(
            f"{key} has rank {rank}, but the file's {METADATA_KEY} header gives rank {expected_rank} for "
            f"{path}, so the file is inconsistent."
        )
    alpha = float(_pattern_value(fields.get("alpha_pattern") or {}, path, fields.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
    if fields.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r.
    return alpha


def _squeeze_1x1(array: np.ndarray) -> np.ndarray | None:
    """Return a [a, b] view of a [a, b] or [a, b, 1, 1] array, or None for other shapes."""
    if array.ndim == 2:
        return array
    if array.ndim == 4 and array.shape[2:] == (1, 1):
        return array.reshape(array.shape[:2])
    return None


def _unsupported_error(keys: list[str], kohya: bool) -> LoRAFileError:
    expected = (
        "lora_unet_* / lora_te*_* keys ending in .lora_down.weight, .lora_up.weight or .alpha"
        if kohya
        else "keys ending in .lora_A.weight or .lora_B.weight"
    )
    dora = any("dora_scale" in key or "lora_magnitude_vector" in key for key in keys)
    hint = " DoRA adapters are not supported." if dora else ""
    return LoRAFileError(
        f"Unsupported keys in the LoRA file: {_sample(keys)}. Expected {expected}.{hint}"
    )


def _sample(keys, count: int = 5) -> str:
    keys = sorted(keys)
    if len(keys) <= count:
        return ", ".join(keys)
    return ", ".join(keys[:count]) + f", ... ({len(keys)} in all)"


def read_lora_adapters(
    source: str | Path | Mapping[str, np.ndarray],
    models: Mapping[str, nnx.Module],
    *,
    metadata: Mapping | None = None,
) -> tuple[dict[str, dict[str, LoRAAdapter]], list[str]]:
    """Read a LoRA file and match its layers to the models' layers, without changing the models.

    Args:
        source: a .safetensors file, a folder with pytorch_lora_weights.safetensors, or a state
            dict (key -> array) already in memory.
        models: component name -> model, such as {"unet": unet}. Keys without a component prefix
            (files from a diffusers model's save_lora_adapter) go to the only model when there is one.
        metadata: the parsed lora_adapter_metadata of an in-memory state dict. For files it is
            read from the header unless given.

    Returns:
        (adapters, unmatched): adapters[component][dotted path] is a LoRAAdapter in jaxgen
        layout, and unmatched lists the file keys that match no layer of the given models.

    Raises:
        LoRAFileError: no key matches any layer, the file has unsupported keys (DoRA, LoHa,
            convolution kernels larger than 1x1), a layer lacks its down or up matrix, or the
            shapes do not fit the layer.
    """
    if isinstance(source, Mapping):
        state_dict = {key: np.asarray(value) for key, value in source.items()}
        fields = dict(metadata or {})
    else:
        state_dict, header = read_lora_file(source)
        fields = _parse_metadata(header) if metadata is None else dict(metadata)
    if not state_dict:
        raise LoRAFileError("The LoRA file contains no tensors.")

    kohya = _is_kohya(state_dict)
    entries, unsupported = _collect_kohya(state_dict) if kohya else _collect_peft(state_dict, set(models))
    if unsupported:
        raise _unsupported_error(unsupported, kohya)
    incomplete = [key for entry in entries.values() if entry.down is None or entry.up is None for key in entry.keys]
    if incomplete:
        raise LoRAFileError(
            f"These LoRA layers lack their down (lora_A) or up (lora_B) matrix: {_sample(incomplete)}."
        )

    adapters: dict[str, dict[str, LoRAAdapter]] = {}
    unmatched: list[str] = []
    mismatched: list[str] = []
    layer_cache: dict[str, tuple[dict, dict]] = {}
    for entry in entries.values():
        component = entry.component
        if component is None and len(models) == 1:
            component = next(iter(models))
        model = models.get(component) if component is not None else None
        if model is None:
            unmatched.extend(entry.keys)
            continue
        if component not in layer_cache:
            layer_cache[component] = (_kernel_modules(model), kohya_names(model) if kohya else {})
        layers, table = layer_cache[component]
        path = table.get(entry.name) if kohya else entry.name
        if path not in layers and f"{TEXT_MODEL_PREFIX}{path}" in layers:
            path = f"{TEXT_MODEL_PREFIX}{path}"
        if path is None or path not in layers:
            unmatched.extend(entry.keys)
            continue

        down, up = _squeeze_1x1(np.asarray(entry.down)), _squeeze_1x1(np.asarray(entry.up))
        kernel_shape = tuple(layers[path].kernel.get_value().shape)
        rank = None if down is None else down.shape[0]
        fits = (
            down is not None
            and up is not None
            and up.shape[1] == rank
            and all(size == 1 for size in kernel_shape[:-2])
            and kernel_shape[-2:] == (down.shape[1], up.shape[0])
        )
        if not fits:
            mismatched.append(
                f"{path}: down {tuple(np.shape(entry.down))}, up {tuple(np.shape(entry.up))}, "
                f"layer kernel {kernel_shape} ({type(layers[path]).__name__})"
            )
            continue
        if kohya:
            alpha = float(rank) if entry.alpha is None or entry.alpha == 0 else entry.alpha
        else:
            alpha = _peft_alpha(_component_fields(fields, entry.component), path, rank, entry.keys[0])
        adapters.setdefault(component, {})[path] = LoRAAdapter(
            lora_A=np.ascontiguousarray(down.T), lora_B=np.ascontiguousarray(up.T), alpha=alpha
        )

    if mismatched:
        raise LoRAFileError(
            "LoRA matrices do not fit these layers (torch layout: down [r, in], up [out, r]): "
            + "; ".join(sorted(mismatched))
        )
    if not adapters:
        raise LoRAFileError(_nothing_matched_message(state_dict, models, kohya))
    return adapters, sorted(unmatched)


def _nothing_matched_message(state_dict, models, kohya: bool) -> str:
    expected = []
    for component, model in models.items():
        paths = list(_kernel_modules(model))
        if kohya:
            prefix = "lora_te_" if component.startswith("text_encoder") else "lora_unet_"
            names = [f"{prefix}{_underscored(path)}.lora_down.weight" for path in paths]
        else:
            names = [f"{component}.{path}.lora_A.weight" for path in paths]
        expected.append(f"{component}: {_sample(names, 3)}")
    return (
        f"No key of the LoRA file matches a layer of the models {sorted(models)}. File keys: "
        f"{_sample(state_dict)}. Expected keys such as {'; '.join(expected)}. Check that the file was "
        "made for this model and that `models` names the components the file uses (unet, text_encoder, ...)."
    )


def load_lora_weights(
    source: str | Path | Mapping[str, np.ndarray],
    models: Mapping[str, nnx.Module],
    *,
    merge: bool = False,
    strict: bool = True,
    metadata: Mapping | None = None,
) -> LoRALoadResult:
    """Load a diffusers/peft or kohya LoRA file into the models, in place.

    Args:
        source, models, metadata: as for read_lora_adapters.
        merge: fold the updates into the base kernels (the layers keep their types) instead of
            adding LoRALinear layers. Needed for adapters on 1x1 convolutions.
        strict: raise when some file keys match no layer. With strict=False those keys are
            logged, returned in the result and skipped.

    Raises:
        LoRAFileError: as for read_lora_adapters, and with strict=True also for unmatched keys.
        ValueError: merge=False and an adapter targets a layer that is not an nnx.Linear, or a
            layer that already has an adapter.
    """
    adapters, unmatched = read_lora_adapters(source, models, metadata=metadata)
    if unmatched and strict:
        raise LoRAFileError(
            f"{len(unmatched)} LoRA file keys match no layer of the models {sorted(models)}: "
            f"{_sample(unmatched, 10)}. Pass the missing components in `models`, or strict=False to skip them."
        )
    if unmatched:
        logger.warning("Skipped %d LoRA keys that match no layer: %s", len(unmatched), _sample(unmatched, 10))

    if not merge:
        for component, component_adapters in adapters.items():
            layers = _kernel_modules(models[component])
            not_linear = sorted(path for path in component_adapters if not isinstance(layers[path], nnx.Linear))
            if not_linear:
                raise ValueError(
                    f"LoRA adapters for {component} layers that are not nnx.Linear (such as 1x1 convolutions) "
                    f"can only be folded into the weights: {_sample(not_linear)}. Pass merge=True."
                )

    adapted = {}
    for component, component_adapters in adapters.items():
        apply = fold_lora_adapters if merge else add_lora_adapters
        adapted[component] = apply(models[component], component_adapters)
    return LoRALoadResult(adapted=adapted, unmatched_keys=unmatched)
