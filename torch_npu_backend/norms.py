"""RMSNorm and rotary position embedding, with torch_npu's fused kernels on Ascend NPUs.

Each function takes `backend`: "npu" for the torch_npu kernel, "torch" for plain torch ops, or
None to use the kernel exactly when the input is on an NPU. Both paths return the same values.

Facts about the kernels come from the torch_npu API pages:
    - npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd) computes
      y = x / sqrt(mean(x^2) + eps) * gamma over the last axis. gamma has the dtype of x, which is
      float16, bfloat16 or float32
      (hiascend.com, Ascend Extension for PyTorch 7.0.0 API page of npu_rms_norm).
    - npu_rotary_mul(input, r1, r2, rotary_mode='half') = r1 * x + r2 * rotate(x) on 4-D x with
      D even and D < 896, and r1, r2 of shape 11SD, B1SD or BNSD for x in BNSD, 1S1D, BS1D or BSND
      for BSND, S11D, SB1D or SBND for SBND. "interleave" mode takes only 11SD, 1S1D and S11D
      (Ascend/op-plugin docs/context/torch_npu-npu_rotary_mul.md). Older releases have no
      rotary_mode argument, so half mode calls the kernel without it.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_npu_backend.device import import_torch_npu

__all__ = ["RMSNorm", "apply_rotary", "rms_norm", "rotate"]

BACKENDS = ("npu", "torch")
ROTARY_MODES = ("half", "interleave")
ROTARY_MAX_HEAD_DIM = 896  # exclusive


def _use_npu(x: torch.Tensor, backend: str | None) -> bool:
    if backend not in (None, *BACKENDS):
        raise ValueError(f"Unknown backend {backend!r}; expected 'npu', 'torch' or None.")
    return backend == "npu" or (backend is None and x.device.type == "npu")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """Normalize `x` by its root mean square over the last axis and scale by `weight`.

    The torch path computes in float32 and returns the dtype of `x`, as the NPU kernel does.
    """
    if _use_npu(x, backend):
        if weight is None:
            weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        torch_npu = import_torch_npu()
        return torch_npu.npu_rms_norm(x, weight.to(x.dtype), eps)[0]
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last axis, with an optional learned `weight` [D].

    The parameter is named `weight`, as in diffusers' and transformers' RMSNorm, so their
    checkpoints load by name.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, *, backend: str | None = None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        dim = None if self.weight is None else self.weight.shape[0]
        return f"{dim}, eps={self.eps}"


def rotate(x: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """Return the rotated partner of each feature pair along the last axis.

    "half" pairs feature i with i + D/2 and returns cat(-x2, x1), where x1 and x2 are the two
    halves of x. "interleave" pairs 2i with 2i + 1 and puts (-x[2i + 1], x[2i]) in their place.
    """
    if rotary_mode == "half":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_mode: str = "half",
    backend: str | None = None,
) -> torch.Tensor:
    """Apply rotary position embedding: x * cos + rotate(x) * sin.

    Args:
        x: [..., D] features with D even, for example queries in [B, N, S, D] or [B, S, N, D].
        cos, sin: tables broadcastable to `x`, with the same shape as each other.
        rotary_mode: "half" (GPT-NeoX and Qwen-VL pairing) or "interleave" (GPT-J pairing).
        backend: "npu", "torch" or None (by the device of `x`).

    On the NPU path, shapes that npu_rotary_mul does not take (see the module docstring) use the
    torch ops on the NPU instead.
    """
    if rotary_mode not in ROTARY_MODES:
        raise ValueError(f"Unknown rotary_mode {rotary_mode!r}; expected 'half' or 'interleave'.")
    if x.shape[-1] % 2:
        raise ValueError(f"Rotary embedding needs an even last axis, got x of shape {tuple(x.shape)}.")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin need the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}.")
    if _use_npu(x, backend) and _npu_rotary_supported(x, cos, rotary_mode):
        torch_npu = import_torch_npu()
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if rotary_mode == "half":
            return torch_npu.npu_rotary_mul(x, cos, sin)
        return torch_npu.npu_rotary_mul(x, cos, sin, rotary_mode=rotary_mode)
    return (x * cos + rotate(x, rotary_mode) * sin).to(x.dtype)


def _npu_rotary_supported(x: torch.Tensor, table: torch.Tensor, rotary_mode: str) -> bool:
    """Return whether npu_rotary_mul takes `x` with cos/sin tables of `table`'s shape."""
    if x.ndim != 4 or table.ndim != 4 or x.shape[-1] >= ROTARY_MAX_HEAD_DIM or table.shape[-1] != x.shape[-1]:
        return False
    a, b, c = x.shape[:3]
    # Table shapes over x's first three axes, for x in BNSD, BSND or SBND (the kernel reads all three).
    shared = {(1, 1, c), (1, b, 1), (a, 1, 1)}
    per_batch = {(a, 1, c), (a, b, 1), (a, b, c)}
    allowed = shared if rotary_mode == "interleave" else shared | per_batch
    return tuple(table.shape[:3]) in allowed
