"""The one attention entry point of the PyTorch backend, with the Ascend NPU fused kernel.

`scaled_dot_product_attention` runs `torch_npu.npu_fusion_attention` for tensors on an NPU and
`torch.nn.functional.scaled_dot_product_attention` (SDPA) elsewhere, and returns the same values
on both paths. `NPUAttnProcessor` routes diffusers' `Attention` modules through it.

Axis letters: B batch, N heads, L query tokens, S key/value tokens, D head dim, H = N * D.
Layouts name the axis order of q, k and v (k and v use S where q uses L):
    "BNSD": [B, N, L, D], torch SDPA's layout.
    "BSND": [B, L, N, D], jaxgen's JAX layout and the layout of diffusers' projections before
        they are transposed.
    "BSH": [B, L, N * D], the projections' output; needs `num_heads`.

Facts about npu_fusion_attention come from the torch_npu API page in Ascend/op-plugin,
docs/context/torch_npu-npu_fusion_attention.md (the revision that documents the
`softmax_layout` argument added in Ascend Extension for PyTorch 7.2.0):
    - Signature: (query, key, value, head_num, input_layout, pse=None, padding_mask=None,
      atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
      inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, ...).
      It returns 7 values, and the first is the attention output in the input layout.
    - `scale` defaults to 1, so the caller must pass 1 / sqrt(D) itself.
    - `atten_mask` is bool or uint8 and True (1) marks a position that is NOT computed, the
      opposite of SDPA's boolean mask. Accepted mask shapes: [B, N, L, S], [B, 1, L, S],
      [1, 1, L, S] and [L, S].
    - sparse_mode=2 ("leftUpCausal") is causal attention aligned at the top-left corner, as
      SDPA's is_causal, and takes a 2048 x 2048 upper-triangular mask (True above the diagonal)
      in place of a full mask.
    - q, k, v share one dtype (float16, bfloat16 or float32) and one layout. Head dims satisfy
      Dq == Dk >= Dv and 1 <= D <= 768, and q has 1 to 256 heads.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from torch_npu_backend.device import import_torch_npu

__all__ = [
    "LAYOUTS",
    "NPUAttnProcessor",
    "npu_head_dims_supported",
    "scaled_dot_product_attention",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("BNSD", "BSND", "BSH")
BACKENDS = ("npu", "torch")

# Kernel limits from the torch_npu page named in the module docstring. Older documents of the
# same kernel allow less. The torch_npu docstrings for PyTorch 1.11 to 2.1 (Ascend/op-plugin
# codegen/templates/_op_plugin_docs.py) list only D in {64, 80, 96, 120, 128, 256}. MindSpeed's
# fusion attention page allows 1 <= D <= 512, and MindSpore's speed_fusion_attention page
# multiples of 16 up to 512.
# NOTE: the limits follow the newest page. With an older torch_npu, set NPU_MAX_HEAD_DIM = 512 or
# NPU_HEAD_DIM_MULTIPLE = 16 so that other head dims take the fallback path.
NPU_MAX_HEAD_DIM = 768
NPU_HEAD_DIM_MULTIPLE = 1
NPU_MAX_HEADS = 256
NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Side of the compressed causal mask that sparse_mode=2 takes.
NPU_CAUSAL_MASK_SIZE = 2048
NPU_SPARSE_MODE_MASK = 0
NPU_SPARSE_MODE_LEFT_UP_CAUSAL = 2

# An additive-mask value at or below this counts as a dropped key on the NPU path. exp(-1000) is
# 0 in float32 (which underflows below about exp(-103)), so the key gets exactly zero weight unless
# the row's logits differ by more than about 900. Common sentinels pass: -inf, the dtype's
# minimum, and diffusers' -10000.0 (-9984 after rounding to bfloat16).
MASK_DROP_THRESHOLD = -1000.0

_causal_masks: dict[torch.device, torch.Tensor] = {}
_warned_fallbacks: set[str] = set()


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    layout: str = "BNSD",
    num_heads: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Compute softmax(q k^T * scale + mask) v per head, on the NPU kernel or torch SDPA.

    Args:
        q: queries in `layout`.
        k: keys in `layout`, with the same B, N and D as `q`.
        v: values in `layout`, with the same B, N and S as `k` and any head dim.
        attn_mask: optional mask broadcastable to [B, N, L, S] whatever the layout, with SDPA's
            meaning: a boolean mask keeps the positions that are True, and a float mask is added
            to the logits. On the NPU path a float mask may contain only 0 (keep) and values at
            or below MASK_DROP_THRESHOLD, -inf included (drop). Other biases raise ValueError;
            run them with backend="torch".
        is_causal: causal attention aligned at the top-left corner, as in SDPA (query i attends
            to keys 0..i). Cannot be combined with `attn_mask`.
        scale: logit multiplier, 1 / sqrt(D) by default.
        layout: "BNSD", "BSND" or "BSH", for the inputs and the output.
        num_heads: number of heads. Required for "BSH" and checked against the shape otherwise.
        backend: "npu" for torch_npu.npu_fusion_attention, "torch" for SDPA, None to use the
            NPU kernel exactly when `q` is on an NPU.

    Returns:
        The attention output in `layout`, with v's head dim and q's dtype.

    On the NPU path, head dims or head counts outside the kernel's limits (see the module
    docstring) run a float32 matmul-softmax-matmul fallback and log one warning per shape.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown attention layout {layout!r}; expected one of {', '.join(LAYOUTS)}.")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"Unknown attention backend {backend!r}; expected 'npu', 'torch' or None.")
    if is_causal and attn_mask is not None:
        raise ValueError("Pass either attn_mask or is_causal=True, not both; fold the causal mask into attn_mask.")
    heads = _check_shapes(q, k, v, layout, num_heads)
    use_npu = backend == "npu" or (backend is None and q.device.type == "npu")
    if not use_npu:
        return _sdpa(q, k, v, attn_mask, is_causal, scale, layout, heads)
    return _npu_attention(q, k, v, attn_mask, is_causal, scale, layout, heads)


def npu_head_dims_supported(qk_head_dim: int, v_head_dim: int, num_heads: int) -> bool:
    """Return whether npu_fusion_attention accepts these head dims and head count."""
    return (
        1 <= qk_head_dim <= NPU_MAX_HEAD_DIM
        and 1 <= v_head_dim <= qk_head_dim
        and qk_head_dim % NPU_HEAD_DIM_MULTIPLE == 0
        and v_head_dim % NPU_HEAD_DIM_MULTIPLE == 0
        and 1 <= num_heads <= NPU_MAX_HEADS
    )


# ----- layouts -------------------------------------------------------------------------------


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, num_heads: int | None) -> int:
    """Validate q, k, v against `layout` and return the number of heads."""
    rank = 3 if layout == "BSH" else 4
    if q.ndim != rank or k.ndim != rank or v.ndim != rank:
        raise ValueError(
            f"Layout {layout} needs rank-{rank} q, k, v, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}; pass layout='BSH' for [B, L, H] or 'BNSD'/'BSND' for 4-D tensors."
        )
    if layout == "BSH":
        if num_heads is None:
            raise ValueError("Layout BSH needs num_heads, because [B, L, N * D] does not show N.")
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if tensor.shape[-1] % num_heads:
                raise ValueError(
                    f"{name} hidden size {tensor.shape[-1]} is not divisible by num_heads={num_heads}."
                )
        heads = num_heads
        q_dim, k_dim = q.shape[-1] // heads, k.shape[-1] // heads
    else:
        head_axis = 1 if layout == "BNSD" else 2
        heads = q.shape[head_axis]
        if k.shape[head_axis] != heads or v.shape[head_axis] != heads:
            raise ValueError(
                f"q, k, v need the same number of heads on axis {head_axis} of layout {layout}, got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; grouped-query attention is not supported."
            )
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads} does not match {heads} heads in q of shape {tuple(q.shape)}.")
        q_dim, k_dim = q.shape[-1], k.shape[-1]
    seq_axis = 2 if layout == "BNSD" else 1
    if q_dim != k_dim or q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or k.shape[seq_axis] != v.shape[seq_axis]:
        raise ValueError(
            f"Attention needs q, k with the same batch and head dim, and k, v with the same batch and "
            f"sequence length; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} in layout {layout}."
        )
    return heads


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSH":
        x = x.unflatten(-1, (heads, -1))
    return x.transpose(1, 2)


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    x = x.transpose(1, 2)
    return x.flatten(2) if layout == "BSH" else x


def _sdpa(q, k, v, attn_mask, is_causal, scale, layout, heads) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        _to_bnsd(q, layout, heads), _to_bnsd(k, layout, heads), _to_bnsd(v, layout, heads),
        attn_mask=attn_mask, is_causal=is_causal, scale=scale,
    )
    return _from_bnsd(out, layout)


# ----- NPU path ------------------------------------------------------------------------------


def _npu_attention(q, k, v, attn_mask, is_causal, scale, layout, heads) -> torch.Tensor:
    if q.dtype not in NPU_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"npu_fusion_attention needs q, k, v of one dtype among float16, bfloat16 and float32, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}; cast them with .to(torch.float32) or a half dtype first."
        )
    q_dim = q.shape[-1] // heads if layout == "BSH" else q.shape[-1]
    v_dim = v.shape[-1] // heads if layout == "BSH" else v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(q_dim)

    if not npu_head_dims_supported(q_dim, v_dim, heads):
        _warn_fallback_once(q_dim, v_dim, heads)
        out = _math_attention(
            _to_bnsd(q, layout, heads), _to_bnsd(k, layout, heads), _to_bnsd(v, layout, heads),
            attn_mask, is_causal, scale,
        )
        return _from_bnsd(out, layout)

    batch = q.shape[0]
    query_len = q.shape[2] if layout == "BNSD" else q.shape[1]
    key_len = k.shape[2] if layout == "BNSD" else k.shape[1]
    sparse_mode = NPU_SPARSE_MODE_MASK
    drop_mask = None
    if is_causal:
        sparse_mode = NPU_SPARSE_MODE_LEFT_UP_CAUSAL
        drop_mask = _causal_drop_mask(q.device)
    elif attn_mask is not None:
        drop_mask = _npu_drop_mask(attn_mask, batch, heads, query_len, key_len)

    torch_npu = import_torch_npu()
    outputs = torch_npu.npu_fusion_attention(
        q, k, v, heads, layout, atten_mask=drop_mask, scale=scale, sparse_mode=sparse_mode,
    )
    return outputs[0]


def _warn_fallback_once(q_dim: int, v_dim: int, heads: int) -> None:
    key = f"{q_dim}/{v_dim}/{heads}"
    if key in _warned_fallbacks:
        return
    _warned_fallbacks.add(key)
    logger.warning(
        "npu_fusion_attention does not take qk head dim %d, v head dim %d with %d heads (limits: "
        "1 <= Dv <= Dqk <= %d, multiples of %d, at most %d heads); using the slower float32 matmul "
        "fallback for this shape.",
        q_dim, v_dim, heads, NPU_MAX_HEAD_DIM, NPU_HEAD_DIM_MULTIPLE, NPU_MAX_HEADS,
    )


def _causal_drop_mask(device: torch.device) -> torch.Tensor:
    """Return the compressed left-up causal mask that sparse_mode=2 takes, cached per device."""
    mask = _causal_masks.get(device)
    if mask is None:
        ones = torch.ones(NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
        mask = torch.triu(ones, diagonal=1)
        _causal_masks[device] = mask
    return mask


def _npu_drop_mask(attn_mask: torch.Tensor, batch: int, heads: int, query_len: int, key_len: int) -> torch.Tensor:
    """Turn an SDPA mask into npu_fusion_attention's boolean drop mask of shape BNSS, B1SS or 11SS.

    A float mask is checked on the host, which waits for the device once per call.
    NOTE: the torch_npu page does not say what a query with every key dropped returns. SDPA
    returns zeros for it under a boolean mask and the mean of v under diffusers' -10000 mask.
    """
    if attn_mask.dtype == torch.bool:
        drop = ~attn_mask
    elif attn_mask.is_floating_point():
        drop = attn_mask <= MASK_DROP_THRESHOLD
        if not bool((drop | (attn_mask == 0)).all()):
            raise ValueError(
                "npu_fusion_attention takes only a drop mask, but the additive attn_mask contains values "
                f"other than 0 and drop values <= {MASK_DROP_THRESHOLD} (such as -inf); pass the bias with "
                "backend='torch' to run it on SDPA."
            )
    else:
        raise TypeError(
            f"attn_mask must be bool (True keeps a key) or floating point (added to the logits), got "
            f"{attn_mask.dtype}; convert it with mask.bool() or mask.to(q.dtype)."
        )

    target = (batch, heads, query_len, key_len)
    if drop.ndim > 4:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} has more than 4 axes; expected [B, N, L, S].")
    drop = drop.reshape((1,) * (4 - drop.ndim) + tuple(drop.shape))
    if any(size not in (1, full) for size, full in zip(drop.shape, target)):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, N, L, S] = {list(target)}."
        )
    # The kernel broadcasts only over B and N together (11SS) or over N alone (B1SS).
    if drop.shape[0] == 1 and drop.shape[1] == 1:
        shape = (1, 1, query_len, key_len)
    elif drop.shape[1] == 1:
        shape = (batch, 1, query_len, key_len)
    else:
        shape = target
    return drop.expand(shape).contiguous()


def _math_attention(q, k, v, attn_mask, is_causal, scale) -> torch.Tensor:
    """Compute attention on [B, N, L, D] tensors with float32 matmuls and softmax.

    A query whose keys are all masked returns zeros, as torch 2.13's SDPA does.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    keep = None
    if is_causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask
    elif attn_mask is not None:
        logits = logits + attn_mask.float()
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with every key masked
    return torch.matmul(weights, v.float()).to(q.dtype)


# ----- diffusers -----------------------------------------------------------------------------


class NPUAttnProcessor:
    """Attention processor for diffusers' `Attention` that runs `scaled_dot_product_attention`.

    Install it with `unet.set_attn_processor(NPUAttnProcessor())`. It follows the steps of
    diffusers' default processors (spatial norm, group norm, cross-attention norm, q/k norms,
    residual connection, output rescaling) and keeps the projections in [B, L, N, D], so the
    NPU kernel needs no transposes. The logits are scaled by `attn.scale`, which is
    1 / sqrt(head dim) unless the module was built with scale_qk=False.

    Args:
        backend: passed to `scaled_dot_product_attention`: "npu", "torch" or None (by device).
    """

    def __init__(self, backend: str | None = None):
        if backend not in (None, *BACKENDS):
            raise ValueError(f"Unknown attention backend {backend!r}; expected 'npu', 'torch' or None.")
        self.backend = backend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape  # [B, C, H, W] becomes [B, H * W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            # [B, S] or [B, 1, S] masks become [B * N, 1 or L, S], viewed as [B, N, 1 or L, S].
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(context).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(context).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=attn.scale, layout="BSND", backend=self.backend
        )
        out = out.flatten(2).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout

        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
