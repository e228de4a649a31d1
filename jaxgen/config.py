"""Job configs: small frozen dataclasses, one per concern, loaded from Python files in `configs/`.

A config file defines `get_config(arg=None)` and returns a `Config`. `load_config` finds the file (a bare
name is looked up in `configs/`) and applies `key=value` overrides. The result is frozen, so every later
change goes through `apply_overrides`. Every key is checked against the dataclass fields, and a typo fails
with the nearest valid key instead of being ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import pathlib
import typing
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """An invalid config file, key or value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data set and how it is batched."""

    name: str = "digits"
    image_size: int = 16
    data_dir: str = "data/tfds"
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} is invalid; use a positive integer")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule and the training objective of a diffusion model."""

    schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    # Fraction of training labels replaced by the learned null class, for classifier-free guidance.
    cond_drop_prob: float = 0.1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient clipping and an EMA of the weights."""

    learning_rate: float = 1e-3
    warmup_steps: int = 200
    decay_steps: int | None = None
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip_norm: float = 1.0
    # The EMA decay is min(ema_decay, (1 + n) / (10 + n)) at update n, so early averages follow the weights.
    ema_decay: float = 0.999


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The sampler used for the sample grids written during training and by `jaxgen.sample`."""

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 3.0
    eta: float = 0.0
    # Timestep spacing; None keeps each sampler's default (DDIM "leading", DPM-Solver++ "linspace").
    spacing: str | None = None
    # Clip each step's estimate of x0 to the data range [-1, 1], as diffusers' DDPM and DDIM schedulers do by
    # default for pixel-space models (DDIM also recomputes eps from the clipped x0). Without it, deterministic
    # samplers leave about 7-12% of the digits model's samples as noise (DDIM-50, 400 samples), because the x0
    # estimates of the first steps reach |x0| ~ 85.
    clip_sample: bool = True
    samples_per_class: int = 8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, intervals and where the run is written."""

    num_steps: int = 2000
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 1000
    eval_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    workdir: str = "runs/ddpm_digits"
    # Split each batch over this many XLA host devices; XLA runs convolutions on one thread per device on CPU.
    host_devices: int = 2
    # Size of the mesh's "fsdp" axis: parameters, EMA and optimizer state are sharded over it, and batches over
    # both axes. The "data" axis gets the remaining devices; 1 keeps the weights replicated (pure data parallel).
    fsdp: int = 1

    def __post_init__(self):
        for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "host_devices", "fsdp"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} is invalid; use a positive integer")


@dataclasses.dataclass(frozen=True)
class ImageCaptionDataConfig:
    """A folder of captioned images, read in aspect-ratio buckets, for text-to-image training."""

    name: str = "image_caption"
    # A folder in the imagefolder layout: images plus metadata.jsonl or metadata.csv with a file_name column.
    # Empty: the built-in digit caption folder, written into data_dir/digit_captions on first use.
    folder: str = ""
    caption_column: str = "text"
    # Buckets have about image_size**2 pixels and sides that are multiples of bucket_multiple.
    image_size: int = 64
    bucket_multiple: int = 64
    max_aspect_ratio: float = 2.0
    data_dir: str = "data/tfds"
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} is invalid; use a positive integer")


@dataclasses.dataclass(frozen=True)
class TextDiffusionConfig:
    """The training objective of text-to-image fine-tuning.

    The noise schedule and the prediction type are read from the base pipeline's scheduler config.
    """

    # Fraction of training captions replaced by the empty caption, for classifier-free guidance.
    caption_dropout_prob: float = 0.1
    min_snr_gamma: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout_prob <= 1.0:
            raise ValueError(f"diffusion.caption_dropout_prob={self.caption_dropout_prob} is invalid; use a value "
                             "in [0, 1] (0.1 is common)")


@dataclasses.dataclass(frozen=True)
class PromptSampleConfig:
    """Sample images generated from fixed prompts while a text-to-image model trains."""

    # No prompts: no samples are drawn.
    prompts: tuple[str, ...] = ()
    num_steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LoRAModelConfig:
    """LoRA adapters on the U-Net of a Stable Diffusion or SDXL diffusers pipeline folder."""

    # Pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...). Empty: a tiny randomly initialised
    # pipeline, written into random_base_dir on first use.
    pretrained: str = ""
    random_base_dir: str = "runs/tiny_sd_base"
    xl: bool = False
    rank: int = 4
    # The adapters' output is scaled by alpha / rank.
    alpha: float = 4.0
    # Module names or dotted path suffixes of the U-Net's nnx.Linear layers that get adapters; the
    # default is the attention projections, as jaxgen.lora.UNET_TARGET_MODULES lists them.
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.rank={self.rank!r} is invalid; use a positive integer such as 4")
        if not self.alpha > 0:
            raise ValueError(f"model.alpha={self.alpha!r} is invalid; use a positive number (alpha = rank gives "
                             "scale 1)")
        if not self.target_modules:
            raise ValueError("model.target_modules is empty; name at least one layer, e.g. ('to_q', 'to_v')")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole job: the task, its model and every setting the training loop reads."""

    task: str = "diffusion"
    model: Any = None
    data: DataConfig = DataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig()
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()


def resolve_config_path(name: str) -> pathlib.Path:
    """Return the config file for `name`: a path as given, else a file of that name in `configs/`."""
    path = pathlib.Path(name)
    if path.is_file():
        return path
    candidates = [CONFIG_DIR / name, CONFIG_DIR / f"{name}.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
    raise ConfigError(
        f"config file {name!r} not found, neither as a path nor in {CONFIG_DIR}; "
        f"available configs: {', '.join(available)}"
    )


def split_config_arg(name: str, arg: str | None = None) -> tuple[str, str | None]:
    """Split `FILE:ARG` (for example `opensora.py:v1.2`) into the file and the get_config argument.

    A name that is an existing path, or has no colon, is returned unchanged. Giving ARG both ways is an error.
    """
    base, sep, suffix = name.rpartition(":")
    if not sep or not base or pathlib.Path(name).exists() or "/" in suffix or "\\" in suffix:
        return name, arg
    if arg is not None and arg != suffix:
        raise ConfigError(f"config {name!r} names the argument {suffix!r} and --cfg-arg gives {arg!r}; pass one")
    return base, suffix


def load_config(name: str, overrides: typing.Sequence[str] = (), arg: str | None = None) -> Config:
    """Load a config file, call its `get_config(arg)` and apply `key=value` overrides.

    `name` may carry the argument after a colon, as in `opensora.py:v1.2`.
    """
    name, arg = split_config_arg(name, arg)
    path = resolve_config_path(name)
    if path.suffix != ".py":
        raise ConfigError(f"config file {path} is not a Python file; pass a .py file or a name from {CONFIG_DIR}")
    spec = importlib.util.spec_from_file_location(f"jaxgen_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(); add `def get_config(arg=None)`")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError as error:
        raise ConfigError(f"get_config({arg!r}) in {path} failed: {error}") from error
    if not isinstance(config, Config):
        raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, expected jaxgen.config.Config")
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Return `config` with each `dotted.key=value` override applied; values are Python literals.

    All overrides of one section are applied together, so fields that are checked against each other
    (such as a U-Net's block types and channel counts) can change in one command.
    """
    changes = _Section()
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key=value, e.g. optim.learning_rate=3e-4")
        node = changes
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, _Section())
            if not isinstance(node, _Section):
                raise ConfigError(f"override {key!r} sets a field inside {'.'.join(parts[:depth + 1])!r}, "
                                  "which another override sets as a whole")
        if parts[-1] in node:
            raise ConfigError(f"config key {key!r} is set twice; keep one --set {key}=...")
        node[parts[-1]] = _parse_value(raw_value.strip())
    return _apply_section(config, changes, "") if changes else config


class _Section(dict):
    """Overrides of the fields of one config dataclass, keyed by field name."""


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        # A bare word such as `ddim` or a path is taken as a string.
        return raw


def _apply_section(node: Any, changes: _Section, prefix: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"cannot set fields of {prefix.rstrip('.')!r}: {type(node).__name__} has no fields")
    fields = {f.name: f for f in dataclasses.fields(node)}
    updates = {}
    for name, change in changes.items():
        full_key = prefix + name
        if name not in fields:
            raise ConfigError(_unknown_key_message(full_key, name, list(fields)))
        current = getattr(node, name)
        if isinstance(change, _Section):
            updates[name] = _apply_section(current, change, full_key + ".")
        else:
            updates[name] = _coerce(change, current, full_key)
    try:
        return dataclasses.replace(node, **updates)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        section = prefix.rstrip(".") or "the config"
        raise ConfigError(f"invalid override of {section}: {error}") from error


def _unknown_key_message(full_key: str, name: str, valid: list[str]) -> str:
    nearest = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return f"unknown config key {full_key!r}: {name!r} is not one of {sorted(valid)}{hint}"


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _coerce(value: Any, current: Any, full_key: str) -> Any:
    """Convert an override value to the type of the field it replaces, or raise naming both types."""
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{full_key!r} is a section; set one of its fields, e.g. {full_key}.<field>=value")
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        # Shell spellings of booleans; the numbers 0 and 1 stay invalid, so a typo is not read as a flag.
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, float) and isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    elif isinstance(current, str) and isinstance(value, str):
        return value
    elif isinstance(current, tuple) and isinstance(value, (tuple, list)):
        return tuple(value)
    elif isinstance(value, type(current)):
        return value
    raise ConfigError(
        f"invalid value {value!r} for {full_key!r}: expected {type(current).__name__} like {current!r}"
    )


def config_to_dict(config: Any) -> Any:
    """Convert a config (nested dataclasses) to JSON-ready data, recording each dataclass's type."""
    if dataclasses.is_dataclass(config):
        out = {"__type__": f"{type(config).__module__}.{type(config).__qualname__}"}
        for field in dataclasses.fields(config):
            out[field.name] = config_to_dict(getattr(config, field.name))
        return out
    if isinstance(config, tuple):
        return [config_to_dict(v) for v in config]
    return config


def config_from_dict(data: Any) -> Any:
    """Rebuild a config written by `config_to_dict`."""
    if isinstance(data, dict) and "__type__" in data:
        module_name, _, qualname = data["__type__"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), qualname)
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in data:
                kwargs[field.name] = _as_tuples(config_from_dict(data[field.name]))
        return cls(**kwargs)
    if isinstance(data, list):
        return [config_from_dict(v) for v in data]
    return data


def _as_tuples(value: Any) -> Any:
    # JSON has no tuples, and config fields that hold sequences are tuples, so lists become tuples again.
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def save_config(config: Config, path: pathlib.Path) -> None:
    """Write `config` as JSON to `path`."""
    path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def read_config(path: pathlib.Path) -> Config:
    """Read a config written by `save_config`."""
    return config_from_dict(json.loads(path.read_text()))


def describe(config: Any, prefix: str = "") -> list[str]:
    """List every leaf of a config as `dotted.key = value` lines."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, f"{prefix}{field.name}."))
        else:
            lines.append(f"{prefix}{field.name} = {value!r}")
    return lines


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ImageCaptionDataConfig",
    "LoRAModelConfig",
    "OptimConfig",
    "PromptSampleConfig",
    "SampleConfig",
    "TextDiffusionConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "load_config",
    "read_config",
    "resolve_config_path",
    "save_config",
    "split_config_arg",
]
