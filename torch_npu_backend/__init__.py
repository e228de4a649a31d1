"""The PyTorch backend of jaxgen, for Ascend NPUs through torch_npu, CUDA or CPU.

Modules:
    device: picks npu, cuda or cpu and the matching torch.distributed backend. It imports
        torch_npu lazily and explains why an NPU is unavailable.
    attention: the attention entry point (npu_fusion_attention on NPU, SDPA elsewhere) and a
        diffusers attention processor that uses it.
    norms: RMSNorm and rotary embedding with torch_npu's fused kernels on NPU.
    precision: autocast, float32 norms and losses, gradient scaling and float64 guards.
    models: torch twins of jaxgen's models, looked up by task and model config (build_torch_model).
    diffusion: the noise schedule, q_sample and the diffusion losses in torch.
    train: `python -m torch_npu_backend.train --cfg ddpm_digits`, with DDP under torchrun.
    train_state: AdamW with jaxgen's schedule, gradient clipping, EMA and checkpoints.

Importing this package does not import torch_npu, nor models, diffusion or the training modules.
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
