"""A stand-in for torch_npu, so that tests prove the NPU code paths on machines without Ascend NPUs.

`make_torch_npu_stub` builds a module named torch_npu whose kernels run in plain torch on any
device, with the semantics of torch_npu's API pages (Ascend/op-plugin docs/context, the pages of
npu_fusion_attention, npu_rotary_mul and npu_rms_norm): the boolean attention mask marks positions
to DROP, `scale` defaults to 1, `input_layout` names the axis order, and sparse_mode=2 or 3 takes
the compressed 2048 x 2048 causal mask. Each kernel rejects inputs that its page rules out and
appends (kernel name, arguments) to `module.calls`.

`install_torch_npu_stub(monkeypatch)` puts the module in sys.modules and its `npu` namespace at
`torch.npu`, and monkeypatch removes both after the test. Without the Ascend runtime,
torch.device("npu") and torch.autocast("npu") do not parse. `register_device_type=True` renames
torch's PrivateUse1 device type to "npu", as torch_npu does, so that they do. That rename cannot
be undone, and from then on torch.accelerator reports "npu" and raises once the fake torch.npu is
removed (diffusers queries it at import). Use it only in a separate process. No tensor can be
created on the fake device either way.
"""

from __future__ import annotations

import sys
import types

import torch

__all__ = ["install_torch_npu_stub", "make_torch_npu_stub"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAUSAL_MASK_SIZE = 2048
MAX_TOKENS = 2147483647


def make_torch_npu_stub(device_count: int = 1) -> types.ModuleType:
    """Build a fake torch_npu module reporting `device_count` NPUs."""
    module = types.ModuleType("torch_npu")
    module.__version__ = "2.13.0.stub"
    calls: list[tuple[str, dict]] = []
    module.calls = calls

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=MAX_TOKENS,
                             next_tockens=MAX_TOKENS, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        calls.append(("npu_fusion_attention", dict(
            query=query, key=key, value=value, head_num=head_num, input_layout=input_layout,
            atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens,
            next_tockens=next_tockens, sparse_mode=sparse_mode,
        )))
        unsupported = dict(pse=pse, padding_mask=padding_mask, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
                           actual_seq_kvlen=actual_seq_kvlen)
        for name, argument in unsupported.items():
            if argument is not None:
                raise NotImplementedError(f"the torch_npu stand-in does not implement {name}")
        if keep_prob != 1.0:
            raise NotImplementedError("the torch_npu stand-in does not implement dropout (keep_prob < 1)")
        return _fusion_attention(query, key, value, head_num, input_layout, atten_mask, scale,
                                 pre_tockens, next_tockens, sparse_mode)

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        calls.append(("npu_rms_norm", dict(x=x, gamma=gamma, epsilon=epsilon)))
        if x.dtype not in KERNEL_DTYPES or gamma.dtype != x.dtype:
            raise RuntimeError(f"npu_rms_norm needs x in float16/bfloat16/float32 and gamma of its dtype, "
                               f"got {x.dtype} and {gamma.dtype}")
        if tuple(gamma.shape) != tuple(x.shape[x.ndim - gamma.ndim:]):
            raise RuntimeError(f"gamma shape {tuple(gamma.shape)} must equal the last axes of x {tuple(x.shape)}")
        x32 = x.float()
        axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
        rstd = torch.rsqrt(x32.pow(2).mean(dim=axes, keepdim=True) + epsilon)
        return (x32 * rstd * gamma.float()).to(x.dtype), rstd

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        calls.append(("npu_rotary_mul", dict(x=x, r1=r1, r2=r2, rotary_mode=rotary_mode)))
        _check_rotary(x, r1, r2, rotary_mode)
        if rotary_mode == "half":
            half = x.shape[-1] // 2
            partner = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        else:
            partner = torch.empty_like(x)
            partner[..., 0::2] = -x[..., 1::2]
            partner[..., 1::2] = x[..., 0::2]
        return r1 * x + r2 * partner

    module.npu_fusion_attention = npu_fusion_attention
    module.npu_rms_norm = npu_rms_norm
    module.npu_rotary_mul = npu_rotary_mul
    module.npu = _make_npu_namespace(device_count, calls)
    return module


def install_torch_npu_stub(monkeypatch, device_count: int = 1, register_device_type: bool = False
                           ) -> types.ModuleType:
    """Make `import torch_npu` return a new stand-in and `torch.npu` its namespace; return the module.

    `register_device_type` renames PrivateUse1 to "npu" for the rest of the process (see above).
    """
    if register_device_type and torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
    module = make_torch_npu_stub(device_count)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)
    return module


def _make_npu_namespace(device_count: int, calls: list) -> types.ModuleType:
    """Build the fake `torch.npu` namespace: device queries, autocast dtypes and amp.GradScaler."""
    npu = types.ModuleType("torch_npu.npu")
    npu.is_available = lambda: device_count > 0
    npu.device_count = lambda: device_count
    npu.current_device = lambda: 0
    npu.is_bf16_supported = lambda: True
    npu.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16, torch.float32]
    # torch.manual_seed seeds the PrivateUse1 device through these two functions.
    npu._is_in_bad_fork = lambda: False
    npu.manual_seed_all = lambda seed: None

    class GradScaler(torch.amp.GradScaler):
        def __init__(self, **kwargs):
            calls.append(("npu.amp.GradScaler", kwargs))
            super().__init__("npu", **kwargs)

    npu.amp = types.SimpleNamespace(GradScaler=GradScaler)
    return npu


def _fusion_attention(query, key, value, head_num, input_layout, atten_mask, scale, pre_tockens,
                      next_tockens, sparse_mode):
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"q, k, v need one dtype among {KERNEL_DTYPES}, got {query.dtype}, {key.dtype}, "
                           f"{value.dtype}")
    q, k, v = (_layout_to_bnsd(tensor, input_layout, head_num) for tensor in (query, key, value))
    if q.shape[1] != head_num or k.shape[1] != head_num:
        raise RuntimeError(f"head_num={head_num} does not match q heads {q.shape[1]}, k heads {k.shape[1]}")
    query_len, key_len = q.shape[2], k.shape[2]

    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.uint8):
            raise RuntimeError(f"atten_mask must be bool or uint8, got {atten_mask.dtype}")
        drop = _drop_mask(atten_mask.bool(), sparse_mode, query_len, key_len, q.shape[0], head_num,
                          pre_tockens, next_tockens)
        logits = logits.masked_fill(drop, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    # NOTE: the API page does not say what a query whose keys are all dropped returns. This
    # stand-in returns zeros there, as torch 2.13's SDPA does for a boolean mask.
    weights = torch.nan_to_num(weights, nan=0.0)
    out = torch.matmul(weights, v.float()).to(query.dtype)

    softmax_max = logits.amax(dim=-1, keepdim=True).expand(*logits.shape[:-1], 8)
    softmax_sum = torch.ones_like(softmax_max)
    return _bnsd_to_layout(out, input_layout), softmax_max, softmax_sum, torch.empty(0), 0, 0, 0


def _layout_to_bnsd(x, layout, head_num):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.unflatten(-1, (head_num, -1)).transpose(1, 2)
    if layout == "SBH":
        return x.transpose(0, 1).unflatten(-1, (head_num, -1)).transpose(1, 2)
    raise RuntimeError(f"input_layout {layout!r} is not one of BSH, SBH, BSND, BNSD (TND is not implemented)")


def _bnsd_to_layout(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.transpose(1, 2).flatten(2)
    return x.transpose(1, 2).flatten(2).transpose(0, 1)  # SBH


def _drop_mask(mask, sparse_mode, query_len, key_len, batch, heads, pre_tockens, next_tockens):
    if sparse_mode == 0:
        allowed = {(batch, heads, query_len, key_len), (batch, 1, query_len, key_len),
                   (1, 1, query_len, key_len), (query_len, key_len)}
        if tuple(mask.shape) not in allowed:
            raise RuntimeError(f"atten_mask shape {tuple(mask.shape)} is not BNSS, B1SS, 11SS or SS for "
                               f"B={batch}, N={heads}, Sq={query_len}, Skv={key_len}")
        if pre_tockens != MAX_TOKENS or next_tockens != MAX_TOKENS:
            raise NotImplementedError("the torch_npu stand-in does not implement band sparsity in sparse_mode 0")
        return mask
    if sparse_mode in (2, 3):
        expected = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=mask.device).triu(1)
        if tuple(mask.shape) != (CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE) or not torch.equal(mask, expected):
            raise RuntimeError(f"sparse_mode={sparse_mode} needs the 2048 x 2048 upper-triangular mask "
                               f"(True above the diagonal), got shape {tuple(mask.shape)}")
        # Mode 2 aligns the causal diagonal at the top-left corner, mode 3 at the bottom-right.
        offset = 0 if sparse_mode == 2 else key_len - query_len
        return torch.ones(query_len, key_len, dtype=torch.bool, device=mask.device).triu(1 + offset)
    raise NotImplementedError(f"the torch_npu stand-in does not implement sparse_mode={sparse_mode}")


def _check_rotary(x, r1, r2, rotary_mode):
    if rotary_mode not in ("half", "interleave"):
        raise RuntimeError(f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-1] >= 896:
        raise RuntimeError(f"npu_rotary_mul needs 4-D input with an even D < 896, got {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES or r1.dtype != x.dtype or r2.dtype != x.dtype:
        raise RuntimeError(f"npu_rotary_mul needs input, r1, r2 of one dtype, got {x.dtype}, {r1.dtype}, {r2.dtype}")
    if r1.shape != r2.shape or r1.ndim != 4 or r1.shape[-1] != x.shape[-1]:
        raise RuntimeError(f"r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} must be equal 4-D tables with x's D")
    a, b, c = x.shape[:3]
    shared = {(1, 1, c), (1, b, 1), (a, 1, 1)}
    allowed = shared if rotary_mode == "interleave" else shared | {(a, 1, c), (a, b, 1), (a, b, c)}
    if tuple(r1.shape[:3]) not in allowed:
        raise RuntimeError(f"r1 shape {tuple(r1.shape)} is not a supported table shape for x {tuple(x.shape)} "
                           f"in {rotary_mode} mode")
