"""ResNet block and 2x resampling layers with diffusers' attribute names, channels-last.

Axis letters: B batch, H height, W width, C channels. Inputs are [B, H, W, C].
Norms compute in float32 whatever the compute dtype, so a bfloat16 model keeps its statistics
in full precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.embeddings import get_activation
from jaxgen.models.layers import pointwise_conv

__all__ = ["Downsample2D", "ResnetBlock2D", "Upsample2D", "group_norm"]


def group_norm(num_channels: int, num_groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """Build a GroupNorm that matches torch.nn.GroupNorm (two-pass variance, float32 output)."""
    if num_channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm needs the channel count {num_channels} to be divisible by num_groups "
            f"{num_groups}; change norm_num_groups or the channel counts."
        )
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


def _conv3x3(
    in_channels: int,
    out_channels: int,
    *,
    strides: int = 1,
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
    dtype: jnp.dtype | None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        strides=strides,
        padding=padding,
        dtype=dtype,
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """Pre-norm residual block with a timestep embedding (diffusers `ResnetBlock2D`).

    time_embedding_norm "default" adds the projected embedding after conv1, "scale_shift" applies
    it as norm2(h) * (1 + scale) + shift. temb_channels None builds the block without
    time_emb_proj, as the VAE uses it, and then __call__ takes no embedding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"Unsupported time_embedding_norm {time_embedding_norm!r}; use 'default' or 'scale_shift'."
            )
        if temb_channels is None and time_embedding_norm != "default":
            raise ValueError(
                f"time_embedding_norm {time_embedding_norm!r} needs a time embedding; set temb_channels "
                "or use 'default'."
            )
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.nonlinearity = get_activation(act_fn)

        self.norm1 = group_norm(in_channels, groups, eps, rngs=rngs)
        self.conv1 = _conv3x3(in_channels, out_channels, dtype=dtype, rngs=rngs)
        projected = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        if temb_channels is not None:
            self.time_emb_proj = nnx.Linear(temb_channels, projected, dtype=dtype, rngs=rngs)
        else:
            self.time_emb_proj = None
        self.norm2 = group_norm(out_channels, groups, eps, rngs=rngs)
        self.conv2 = _conv3x3(out_channels, out_channels, dtype=dtype, rngs=rngs)
        if in_channels != out_channels:
            self.conv_shortcut = nnx.Conv(
                in_channels, out_channels, kernel_size=(1, 1), padding="VALID", dtype=dtype, rngs=rngs
            )
        else:
            self.conv_shortcut = None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """Map x [B, H, W, C_in] and temb [B, T] (None without time_emb_proj) to [B, H, W, C_out]."""
        if (temb is None) != (self.time_emb_proj is None):
            raise ValueError(
                "temb must be given exactly when the block has time_emb_proj (temb_channels set); "
                f"got temb {'None' if temb is None else temb.shape}."
            )
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is None:
            t = 0.0  # Without a time embedding, norm2 normalises conv1's output alone.
        else:
            t = self.time_emb_proj(self.nonlinearity(temb))[:, None, None, :]  # [B, 1, 1, C]

        if self.time_embedding_norm == "default":
            h = self.norm2(h + t)
        else:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        # Dropout of diffusers' block sits here; only dropout 0 is supported, so it is omitted.
        h = self.conv2(self.nonlinearity(h))

        shortcut = x if self.conv_shortcut is None else pointwise_conv(self.conv_shortcut, x)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution (diffusers `Downsample2D` with use_conv=True).

    padding 0 pads one row and column at the bottom and right, as diffusers does, so odd and even
    sizes halve the same way.
    """

    def __init__(self, channels: int, *, padding: int = 1, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        pads = ((padding, padding), (padding, padding)) if padding > 0 else ((0, 1), (0, 1))
        self.conv = _conv3x3(channels, channels, strides=2, padding=pads, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (diffusers `Upsample2D`)."""

    def __init__(self, channels: int, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.conv = _conv3x3(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # Each pixel becomes a 2x2 patch, the same as torch's F.interpolate(mode="nearest").
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
