"""Spatial transformer of the Stable Diffusion U-Net with diffusers' attribute names.

Mirrors diffusers' `Transformer2DModel` (continuous input, layer_norm blocks), `BasicTransformerBlock`,
`Attention` and `FeedForward` with GEGLU, version 0.42.1.

Axis letters: B batch, H height, W width, C channels, L image tokens (H * W), S context tokens,
E context features, N heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.attention import dot_product_attention
from jaxgen.models.layers import dense, pointwise_conv
from jaxgen.models.resnet import group_norm

__all__ = ["Attention", "BasicTransformerBlock", "FeedForward", "GEGLU", "Transformer2DModel"]

# diffusers fixes these epsilons inside Transformer2DModel; the U-Net config does not set them.
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_TRANSFORMER_LAYER_NORM_EPS = 1e-5


def _layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=_TRANSFORMER_LAYER_NORM_EPS, dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class Attention(nnx.Module):
    """Multi-head attention: to_q, to_k, to_v without bias, to_out[0] with bias.

    Self-attention when called without context, cross-attention over context [B, S, E] otherwise.
    diffusers' `to_out[1]` is a Dropout without parameters and has no counterpart here.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        inner_dim = heads * dim_head
        context_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nnx.Linear(query_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(context_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(context_dim, inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(inner_dim, query_dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Map x [B, L, C] (and context [B, S, E]) to [B, L, C]."""
        context = x if context is None else context
        b, length, _ = x.shape
        q = dense(self.to_q, x).reshape(b, length, self.heads, self.dim_head)  # [B, L, N, D]
        k = dense(self.to_k, context).reshape(b, context.shape[1], self.heads, self.dim_head)  # [B, S, N, D]
        v = dense(self.to_v, context).reshape(b, context.shape[1], self.heads, self.dim_head)
        out = dot_product_attention(q, k, v)  # [B, L, N, D]
        return dense(self.to_out[0], out.reshape(b, length, self.heads * self.dim_head))


class GEGLU(nnx.Module):
    """Gated GELU: proj to 2 * dim_out, then first half * gelu(second half)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(dense(self.proj, x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """Feed-forward net [GEGLU, Dropout, Linear] with hidden width 4 * dim, as diffusers lays it out."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        inner_dim = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner_dim, dtype=dtype, rngs=rngs),
                nnx.Dropout(0.0),  # Keeps diffusers' index 2 for the output Linear.
                nnx.Linear(inner_dim, dim, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        geglu, dropout, linear = self.net
        return dense(linear, dropout(geglu(x)))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm block: self-attention (attn1), cross-attention (attn2), GEGLU feed-forward (ff)."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = _layer_norm(dim, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, rngs=rngs)
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = _layer_norm(dim, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Map x [B, L, C] and context [B, S, E] to [B, L, C]."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in, transformer_blocks over the H * W tokens, proj_out, plus the input.

    proj_in and proj_out are 1x1 convolutions, or Linear layers when use_linear_projection
    (Stable Diffusion 2.x and XL).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, _TRANSFORMER_GROUP_NORM_EPS, rngs=rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner_dim, dtype=dtype, rngs=rngs)
            self.proj_out = nnx.Linear(inner_dim, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = nnx.Conv(in_channels, inner_dim, kernel_size=(1, 1), dtype=dtype, rngs=rngs)
            self.proj_out = nnx.Conv(inner_dim, in_channels, kernel_size=(1, 1), dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    heads=heads,
                    dim_head=dim_head,
                    cross_attention_dim=cross_attention_dim,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Map x [B, H, W, C] and context [B, S, E] to [B, H, W, C]."""
        b, h, w, _ = x.shape
        # A 1x1 convolution and a Linear on the flattened tokens are the same map. The layer type
        # only decides the checkpoint layout of proj_in and proj_out.
        project = dense if self.use_linear_projection else pointwise_conv
        tokens = self.norm(x).reshape(b, h * w, -1)  # [B, L, C]
        tokens = project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return project(self.proj_out, tokens).reshape(b, h, w, -1) + x
