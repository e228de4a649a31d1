"""Mixed precision for the PyTorch backend: autocast, float32 islands, gradient scaling, float64 guards.

bfloat16 and float16 run under `torch.autocast` on the model's device, while norms, softmax and
losses stay in float32. float16 training scales the loss with a GradScaler, which bfloat16 does not need.
Ascend NPU kernels take no float64 (torch_npu's fused kernels list float16, bfloat16 and float32
only), so `check_no_float64` and `to_device` stop float64 tensors before they reach an NPU and
name them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torch_npu_backend.device import import_torch_npu, is_npu
from torch_npu_backend.norms import RMSNorm

__all__ = [
    "NORM_TYPES",
    "autocast",
    "check_no_float64",
    "float32_region",
    "grad_scaler",
    "in_float32",
    "keep_norms_in_float32",
    "softmax_float32",
    "to_device",
]

MIXED_DTYPES = (torch.bfloat16, torch.float16)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    RMSNorm,
)
# Maximum number of tensor paths listed in a check_no_float64 error.
_MAX_LISTED = 20


def _device_type(device: torch.device | str) -> str:
    # Split strings by hand because torch.device("npu") parses only after torch_npu is imported.
    return device.split(":", 1)[0] if isinstance(device, str) else device.type


def autocast(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> contextlib.AbstractContextManager:
    """Return a context that runs eligible ops in `dtype` on `device`, or a no-op context for float32.

    On an NPU this is `torch.autocast(device_type="npu")`, which torch_npu registers (torch_npu 2.x
    lists torch.autocast as supported).
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in MIXED_DTYPES:
        raise ValueError(f"autocast dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}.")
    return torch.autocast(device_type=_device_type(device), dtype=dtype)


@contextlib.contextmanager
def float32_region(device: torch.device | str) -> Iterator[None]:
    """Disable autocast on `device` inside the block, so float32 inputs give float32 results."""
    with torch.autocast(device_type=_device_type(device), enabled=False):
        yield


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_cast_floats(item, dtype) for item in value])
    if isinstance(value, Mapping):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    return value


def _rebuild(sequence: list | tuple, items: list) -> list | tuple:
    """Return a list or tuple of the same type as `sequence`, named tuples included, holding `items`."""
    if hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)


def in_float32(fn: Callable) -> Callable:
    """Wrap `fn` to run in float32, for losses and other reductions.

    The wrapper passes float32 copies of the floating-point tensor arguments and turns autocast off
    on the device of the first tensor argument, so the result is float32. Example:
    `loss = in_float32(F.mse_loss)(prediction, target)`.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        args, kwargs = _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)
        if not tensors:
            return fn(*args, **kwargs)
        with float32_region(tensors[0].device):
            return fn(*args, **kwargs)

    return wrapper


def softmax_float32(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Compute softmax in float32 and return it in the dtype of `x`."""
    return torch.softmax(x, dim=dim, dtype=torch.float32).to(x.dtype)


def _norm_input_to_float32(module: nn.Module, args: tuple) -> tuple:
    # Forward hooks receive the module, so copies made by copy.deepcopy (an EMA model) stay correct.
    first = args[0] if args else None
    module._float32_output_dtype = first.dtype if isinstance(first, torch.Tensor) else None
    return _cast_floats(args, torch.float32)


def _norm_output_to_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    dtype = getattr(module, "_float32_output_dtype", None)
    return output if dtype is None else _cast_floats(output, dtype)


def keep_norms_in_float32(model: nn.Module, norm_types: tuple[type[nn.Module], ...] = NORM_TYPES) -> list[str]:
    """Keep every norm layer of `model` in float32 when the rest runs in bfloat16 or float16.

    Each norm's parameters and buffers become float32, and forward hooks cast its floating inputs
    to float32 and its output back to the dtype of its first input. Parameter names do not
    change, so state dicts still load. Calling it again re-casts the norms without adding hooks.
    Returns the names of the norm layers.

    NOTE: the hooks cannot turn autocast off inside the norm. Under torch.autocast the float32
    input stays float32 unless the device's autocast lists put the norm op in a lower precision.
    CPU autocast does not (checked with torch 2.13). CUDA and NPU are not checked.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, norm_types):
            continue
        module.float()
        if not getattr(module, "_float32_norm_hooks", False):  # a second call must not stack hooks
            module._float32_norm_hooks = True
            module.register_forward_pre_hook(_norm_input_to_float32)
            module.register_forward_hook(_norm_output_to_input_dtype)
        names.append(name)
    return names


def grad_scaler(device: torch.device | str, dtype: torch.dtype, **kwargs) -> torch.amp.GradScaler:
    """Return a loss scaler for training in `dtype` on `device`, enabled only for float16.

    On an NPU this is torch_npu's `torch.npu.amp.GradScaler`, the class torch_npu documents as the
    counterpart of torch.cuda.amp.GradScaler. Elsewhere it is `torch.amp.GradScaler(device_type)`.
    Extra keyword arguments (init_scale, growth_interval, ...) go to the scaler.
    """
    enabled = dtype == torch.float16
    device_type = _device_type(device)
    if device_type == "npu":
        import_torch_npu()  # adds torch.npu, or raises naming what is missing
        return torch.npu.amp.GradScaler(enabled=enabled, **kwargs)
    return torch.amp.GradScaler(device_type, enabled=enabled, **kwargs)


def _iter_tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, nn.Module):
        for name, tensor in value.named_parameters():
            yield f"{path}.{name}", tensor
        for name, tensor in value.named_buffers():
            yield f"{path}.{name}", tensor
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _iter_tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _iter_tensors(item, f"{path}[{index}]")


def check_no_float64(value: Any, where: str = "value") -> None:
    """Raise TypeError naming every float64 tensor in `value`.

    `value` is a tensor, a module (its parameters and buffers) or nested dicts, lists and tuples
    of them. `where` is the name of `value` in the message, as in "unet" or "batch".
    """
    found = [path for path, tensor in _iter_tensors(value, where) if tensor.dtype == torch.float64]
    if not found:
        return
    listed = ", ".join(found[:_MAX_LISTED])
    more = f" and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    raise TypeError(
        f"float64 tensors cannot go to an NPU, whose kernels take float16, bfloat16 and float32 only: "
        f"{listed}{more}. Cast them first, e.g. model.float() or tensor.to(torch.float32)."
    )


def to_device(value: Any, device: torch.device | str, where: str = "value") -> Any:
    """Move a tensor, a module or nested dicts, lists and tuples of tensors to `device`.

    Modules move in place and are returned, and containers are rebuilt. For an NPU the whole value is
    checked with `check_no_float64` before anything moves.
    """
    if is_npu(device):
        check_no_float64(value, where)
    return _move(value, device)


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, (torch.Tensor, nn.Module)):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _move(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_move(item, device) for item in value])
    return value
