"""Read LPIPS weights from local files into `jaxgen.models.lpips.LPIPS`. Nothing here touches the network.

LPIPS (VGG16, version 0.1) needs two sets of weights:

* the VGG16 trunk: a torchvision `vgg16().state_dict()` file, such as the `vgg16-397923af.pth` that
  torchvision keeps in its hub cache (~/.cache/torch/hub/checkpoints/). Its `features.<i>` keys are used
  and its `classifier.*` keys (the ImageNet head) are dropped.
* the linear heads: the lpips package's `weights/v0.1/vgg.pth`, keys `lin<k>.model.1.weight`. The lpips
  package ships this file, so `bundled_linear_weights` finds it when the package is installed.

A `state_dict()` of a whole `lpips.LPIPS(net="vgg")` module also loads. Its `net.slice<n>.<i>` keys are
renamed to `features.<i>`. Its `lins.<k>` keys, a second registration of the `lin<k>` heads, must equal
`lin<k>`. Its fixed `scaling_layer` buffers must equal the constants of `jaxgen.models.lpips`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from conversion.rules import torch_to_nnx
from jaxgen.models.lpips import LPIPS, SCALING_SCALE, SCALING_SHIFT

__all__ = ["bundled_linear_weights", "load_lpips", "lpips_state_dict", "read_torch_weights"]

_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_HEAD_LIST_KEY = re.compile(r"^lins\.(\d+)\.(.+)$")
_SCALING_BUFFERS = {"scaling_layer.shift": SCALING_SHIFT, "scaling_layer.scale": SCALING_SCALE}


def read_torch_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a torch state_dict file (.safetensors, or a pickle read with weights_only=True) as numpy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} contains a {type(loaded).__name__}, expected a state_dict (key -> tensor)")
    return {key: value.detach().float().numpy() for key, value in loaded.items()}


def bundled_linear_weights() -> pathlib.Path | None:
    """Return the path of the lpips package's weights/v0.1/vgg.pth, or None when lpips is not installed.

    The package is located without importing it, because importing lpips also imports torchvision.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def lpips_state_dict(*state_dicts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge torchvision VGG16, lpips linear-head or whole-lpips state_dicts into the keys of `LPIPS`.

    Raises:
        ValueError: two inputs contain the same key, or an lpips scaling_layer buffer differs from the
            constants this module applies.
    """
    merged: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}  # merged key -> the input key it came from
    for state_dict in state_dicts:
        for key, value in state_dict.items():
            if key.startswith("classifier."):
                continue  # torchvision's ImageNet head; LPIPS uses the convolutional trunk only
            if key in _SCALING_BUFFERS:
                expected = np.asarray(_SCALING_BUFFERS[key], np.float32)
                if not np.allclose(np.ravel(value), expected, rtol=0, atol=1e-6):
                    raise ValueError(f"{key} is {np.ravel(value).tolist()}, but LPIPS applies {expected.tolist()}")
                continue
            name = _lpips_module_key(key)
            if name in merged:
                # lpips.LPIPS registers each head twice, as lin<k> and as lins.<k>; identical copies are fine.
                alias = key.startswith("lins.") or sources[name].startswith("lins.")
                if alias and np.array_equal(merged[name], np.asarray(value)):
                    continue
                raise ValueError(f"weights for {name!r} appear twice among the LPIPS weight files; pass each once")
            merged[name] = np.asarray(value)
            sources[name] = key
    return merged


def _lpips_module_key(key: str) -> str:
    """Rename a key of a whole lpips.LPIPS state_dict to the LPIPS module's key; other keys are unchanged."""
    match = _SLICE_KEY.match(key)
    if match:
        return f"features.{match.group(1)}.{match.group(2)}"
    match = _HEAD_LIST_KEY.match(key)
    if match:
        return f"lin{match.group(1)}.{match.group(2)}"
    return key


def load_lpips(
    vgg16_weights: str | os.PathLike[str], linear_weights: str | os.PathLike[str] | None = None
) -> LPIPS:
    """Build an `LPIPS` module from local weight files.

    Args:
        vgg16_weights: torchvision VGG16 state_dict file, or the state_dict of a whole
            lpips.LPIPS(net="vgg") module, which contains the linear heads too.
        linear_weights: lpips linear-head file (weights/v0.1/vgg.pth). None takes the heads from
            vgg16_weights when it contains them, else the file bundled with the installed lpips package.

    Raises:
        FileNotFoundError: a file is missing, or linear_weights is None and lpips is not installed.
        conversion.rules.CheckpointMismatchError: listing missing, unexpected and mis-shaped keys.
    """
    vgg16 = read_torch_weights(vgg16_weights)
    has_heads = any(key.startswith("lin") for key in vgg16)
    if linear_weights is None and not has_heads:
        linear_weights = bundled_linear_weights()
        if linear_weights is None:
            raise FileNotFoundError(
                "no LPIPS linear-head weights: pass linear_weights (lpips' weights/v0.1/vgg.pth) or install "
                "the lpips package, which ships that file"
            )
    heads = read_torch_weights(linear_weights) if linear_weights is not None else {}
    abstract = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, torch_to_nnx(lpips_state_dict(vgg16, heads), abstract_state))
