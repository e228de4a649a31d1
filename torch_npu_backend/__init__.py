"""The PyTorch backend of jaxgen, for Ascend NPUs through torch_npu, CUDA or CPU.

Modules:
    device: picks npu, cuda or cpu and the matching torch.distributed backend. It imports
        torch_npu lazily and explains why an NPU is unavailable.
    attention: the attention entry point (npu_fusion_attention on NPU, SDPA elsewhere) and a
        diffusers attention processor that uses it.
    norms: RMSNorm and rotary embedding with torch_npu's fused kernels on NPU.
    precision: autocast, float32 norms and losses, gradient scaling and float64 guards.

Importing this package does not import torch_npu. The torch twins of jaxgen's models are not
implemented yet.
"""

from torch_npu_backend.attention import NPUAttnProcessor, scaled_dot_product_attention
from torch_npu_backend.device import DeviceUnavailableError, distributed_backend, resolve_device
from torch_npu_backend.norms import RMSNorm, apply_rotary, rms_norm
from torch_npu_backend.precision import autocast, check_no_float64, grad_scaler, keep_norms_in_float32, to_device

__all__ = [
    "DeviceUnavailableError",
    "NPUAttnProcessor",
    "RMSNorm",
    "apply_rotary",
    "autocast",
    "check_no_float64",
    "distributed_backend",
    "grad_scaler",
    "keep_norms_in_float32",
    "resolve_device",
    "rms_norm",
    "scaled_dot_product_attention",
    "to_device",
]
