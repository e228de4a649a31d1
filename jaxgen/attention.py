"""The one scaled dot-product attention entry point for every jaxgen model.

Models call `dot_product_attention` and never write their own softmax(QK^T)V, so the kernel can
change per platform (XLA, cuDNN flash attention, a chunked form for long sequences) in this file
alone.

Layout (axis letters used across jaxgen):
    B batch, L query tokens, S key/value tokens, N heads, D head dim.
    q: [B, L, N, D]; k, v: [B, S, N, D]; output: [B, L, N, D].
This is the layout of `jax.nn.dot_product_attention`. Torch's SDPA uses [B, N, L, D], so code
ported from torch swaps the token and head axes before calling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dot_product_attention"]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Compute softmax(q k^T * scale) v per head.

    Args:
        q: queries [B, L, N, D].
        k: keys [B, S, N, D].
        v: values [B, S, N, D].
        mask: optional boolean array broadcastable to [B, N, L, S]; True keeps a key, False drops
            it. A query row whose keys are all dropped gets equal weights on every key, so it
            returns the mean of `v` (checked with jax 0.10.2), not NaN.
        bias: optional additive logit bias broadcastable to [B, N, L, S], added after scaling, such as
            T5's relative position bias.
        scale: multiplier of the logits; defaults to 1 / sqrt(D).

    Returns:
        [B, L, N, D] in the dtype of `q`. The logits and the softmax are computed in float32 even
        for bfloat16 or float16 inputs.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"dot_product_attention expects q, k, v of rank 4 [B, L, N, D], got shapes {q.shape}, "
            f"{k.shape}, {v.shape}; add a heads axis with x.reshape(B, L, N, D)."
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"dot_product_attention needs q [B, L, N, D] and k, v [B, S, N, D] with equal B, N and D, "
            f"got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"dot_product_attention expects a boolean mask (True keeps a key), got dtype "
                f"{mask.dtype}; pass mask.astype(bool) or build the mask with a comparison."
            )
        if mask.ndim > 4:
            raise ValueError(
                f"dot_product_attention expects a mask broadcastable to [B, N, L, S], got shape "
                f"{mask.shape}; drop the extra axes."
            )
        # jax.nn.dot_product_attention needs a rank-4 mask. Padding the rank on the left lets
        # masks such as [L, S] or [B, 1, 1, S] broadcast as they would in numpy.
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)

    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.ndim > 4:
            raise ValueError(
                f"dot_product_attention expects a bias broadcastable to [B, N, L, S], got shape {bias.shape}; "
                "drop the extra axes."
            )
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)

    # implementation=None lets JAX pick: cuDNN when available on GPU, the XLA einsum form elsewhere.
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
