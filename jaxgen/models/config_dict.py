"""Model config dataclasses from the config.json dicts of diffusers and transformers checkpoints."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["config_kwargs"]


def config_kwargs(
    cls: type,
    config: Mapping[str, Any],
    *,
    model_name: str,
    ignored_keys: Collection[str] = (),
    unsupported_defaults: Mapping[str, Any] | None = None,
    convert: Callable[[Any], Any] = lambda value: value,
) -> dict[str, Any]:
    """Select the keyword arguments of the dataclass `cls` from a checkpoint's config dict.

    Keys starting with "_" (such as _class_name) and `ignored_keys` are skipped. A key of a feature the
    jaxgen model lacks is accepted only at the value in `unsupported_defaults`, where the feature does
    nothing. `convert` maps each kept value, for example lists to tuples.

    Raises:
        ValueError: a key is neither a field nor listed, naming the nearest field, or an unsupported
            feature is switched on, naming the value the jaxgen model accepts.
    """
    fields = sorted(field.name for field in dataclasses.fields(cls))
    unsupported_defaults = unsupported_defaults or {}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in ignored_keys:
            continue
        if key in fields:
            kwargs[key] = convert(value)
        elif key in unsupported_defaults:
            default = unsupported_defaults[key]
            if value != default:
                raise ValueError(
                    f"config key {key}={value!r} is not supported by jaxgen's {model_name}; only {default!r} is."
                )
        else:
            nearest = difflib.get_close_matches(key, fields, n=1, cutoff=0.0)
            raise ValueError(f"Unknown {model_name} config key {key!r}; the nearest supported key is {nearest[0]!r}.")
    return kwargs
