"""Device selection for the PyTorch backend: Ascend NPU through torch_npu, then CUDA, then CPU.

`torch_npu` is imported only when a function here needs it, and only if it is installed, so this
module imports on machines without the Ascend software. Importing `torch_npu` registers the "npu"
device type with torch and adds the `torch.npu` namespace (torch_npu 2.x).

Environment:
    JAXGEN_TORCH_DEVICE: device used when `resolve_device` gets no `preferred` argument, for
        example "npu", "npu:1", "cuda" or "cpu". Unset or empty selects automatically.
"""

from __future__ import annotations

import importlib
import os
import types

import torch

__all__ = [
    "DEVICE_ENV_VAR",
    "DeviceUnavailableError",
    "distributed_backend",
    "import_torch_npu",
    "is_npu",
    "npu_available",
    "resolve_device",
]

DEVICE_ENV_VAR = "JAXGEN_TORCH_DEVICE"
SUPPORTED_DEVICE_TYPES = ("npu", "cuda", "cpu")

# Shown when torch_npu is installed but its import fails, which almost always means the CANN
# runtime libraries cannot be found by the dynamic loader.
_CANN_HINT = (
    "torch_npu needs the Ascend CANN runtime (libascendcl.so and the other CANN libraries). Install "
    "CANN, then run `source <CANN install folder>/set_env.sh` (usually "
    "/usr/local/Ascend/ascend-toolkit/set_env.sh) so that ASCEND_HOME_PATH is set and LD_LIBRARY_PATH "
    "contains the CANN library folders."
)


class DeviceUnavailableError(RuntimeError):
    """Error raised when a requested device type cannot be used; the message names what is missing."""


def import_torch_npu() -> types.ModuleType:
    """Import and return the torch_npu module.

    Raises:
        DeviceUnavailableError: torch_npu is not installed, or it is installed but its import
            failed. In the second case the message contains the original import error.
    """
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as error:
        if error.name != "torch_npu":
            raise _npu_import_failed(error) from error
        raise DeviceUnavailableError(
            "NPU requested, but the torch_npu package is not installed. Install the build that matches "
            f"torch {torch.__version__} (for torch 2.13.0: pip install torch_npu==2.13.0) on a machine "
            f"with Ascend NPUs, or choose another device (set {DEVICE_ENV_VAR}=cpu or cuda)."
        ) from error
    except (ImportError, OSError) as error:
        raise _npu_import_failed(error) from error


def _npu_import_failed(error: BaseException) -> DeviceUnavailableError:
    return DeviceUnavailableError(
        f"NPU requested and torch_npu is installed, but importing it failed: "
        f"{type(error).__name__}: {error}\n{_CANN_HINT}"
    )


def npu_available() -> bool:
    """Return whether torch_npu imports and reports at least one NPU."""
    try:
        import_torch_npu()
    except DeviceUnavailableError:
        return False
    npu = getattr(torch, "npu", None)
    return npu is not None and npu.is_available() and npu.device_count() > 0


def is_npu(device: torch.device | str) -> bool:
    """Return whether `device` is an Ascend NPU ("npu" or "npu:N")."""
    if isinstance(device, torch.device):
        return device.type == "npu"
    return device.split(":", 1)[0] == "npu"


def resolve_device(preferred: str | None = None) -> torch.device:
    """Return the torch device to run on.

    Args:
        preferred: "npu", "cuda", "cpu", optionally with an index ("npu:1"). None reads the
            JAXGEN_TORCH_DEVICE environment variable, and if that is unset or empty picks the
            first available of npu, cuda and cpu.

    Raises:
        DeviceUnavailableError: the requested device type is not available. The message names the
            missing package, runtime or device.
        ValueError: `preferred` names an unsupported device type.
    """
    if preferred is None:
        preferred = os.environ.get(DEVICE_ENV_VAR, "").strip() or None
    if preferred is None:
        if npu_available():
            return torch.device("npu", 0)
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")

    device_type, _, index_text = preferred.strip().lower().partition(":")
    if device_type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"Unsupported device {preferred!r}; expected one of {', '.join(SUPPORTED_DEVICE_TYPES)}, "
            f"optionally with an index such as 'npu:1'."
        )
    if index_text and not index_text.isdigit():
        raise ValueError(f"Invalid device index in {preferred!r}; write the index as a number, as in 'npu:1'.")
    index = int(index_text) if index_text else None

    if device_type == "npu":
        _check_npu(index)
    elif device_type == "cuda":
        _check_cuda(index)
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, 0 if index is None else index)


def _check_npu(index: int | None) -> None:
    import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None:
        raise DeviceUnavailableError(
            "torch_npu imported, but torch has no `torch.npu` namespace; the torch_npu build does not "
            f"match torch {torch.__version__}. Install the torch_npu release built for this torch."
        )
    count = npu.device_count() if npu.is_available() else 0
    if count == 0:
        raise DeviceUnavailableError(
            "torch_npu imported, but it reports no NPU. Check that the Ascend driver is installed, that "
            "`npu-smi info` lists the devices, and that ASCEND_RT_VISIBLE_DEVICES does not hide them."
        )
    if index is not None and index >= count:
        raise DeviceUnavailableError(f"NPU index {index} requested, but torch_npu reports {count} NPU(s).")


def _check_cuda(index: int | None) -> None:
    if torch.version.cuda is None:
        raise DeviceUnavailableError(
            f"CUDA requested, but this torch build ({torch.__version__}) has no CUDA support. Install a "
            "CUDA build of torch, or choose another device."
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceUnavailableError(
            "CUDA requested, but torch finds no CUDA device. Check the NVIDIA driver (`nvidia-smi`) and "
            "that CUDA_VISIBLE_DEVICES does not hide the GPUs."
        )
    if index is not None and index >= count:
        raise DeviceUnavailableError(f"CUDA index {index} requested, but torch finds {count} GPU(s).")


def distributed_backend(device: torch.device | str) -> str:
    """Return the torch.distributed backend for `device`: "hccl" on NPU, "nccl" on CUDA, "gloo" on CPU."""
    device_type = device.type if isinstance(device, torch.device) else device.split(":", 1)[0]
    backends = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
    if device_type not in backends:
        raise ValueError(
            f"No distributed backend for device type {device_type!r}; expected one of {', '.join(backends)}."
        )
    return backends[device_type]
