"""STDiT3, the spatial-temporal diffusion transformer of Open-Sora 1.2, with Open-Sora's parameter names.

Mirrors `opensora/models/stdit/stdit3.py` and the layers it uses from `opensora/models/layers/blocks.py`
in hpcaitech/Open-Sora at tag v1.2.0, so that the state_dict of a published checkpoint
(hpcai-tech/OpenSora-STDiT-v3) maps onto this model by name through `conversion.rules`.

The model denoises a video latent. Each of the `depth` layers is a spatial block (self-attention among the
tokens of one frame) followed by a temporal block (self-attention among the frames at one spatial position,
with rotary position embedding over time). Every block also cross-attends to the text tokens and is
modulated by the timestep through adaLN-single: one `t_block` projection shared by all blocks, plus a
learned `scale_shift_table` per block.

Axis letters: B batch, T latent frames, H W latent height and width, C channels, Nt Nh Nw patches along
T H W, S = Nh * Nw spatial tokens per frame, L text tokens, E caption features, N heads, D head dim.

Differences from Open-Sora 1.2:
- Inputs and outputs are channels-last, [B, T, H, W, C], where Open-Sora uses [B, C, T, H, W].
- T, H and W must be multiples of `patch_size`. Open-Sora pads the latent and crops the output instead.
- Open-Sora packs the kept text tokens of the whole batch into one sequence and cross-attends with
  xformers' BlockDiagonalMask, so the queries of sample b see exactly the kept tokens of sample b. This
  model keeps the padded [B, L] layout and drops the other tokens with a key mask, which gives the same
  attention weights on the kept tokens and zero weight on the rest.
- The model draws no caption dropout itself: pass `force_drop_ids` to swap captions for the fixed null
  caption `y_embedder.y_embedding`.
- Sequence parallelism, stochastic depth (drop_path > 0) and `skip_y_embedder` are not supported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.attention import dot_product_attention
from jaxgen.models.clip_text import GENERIC_TRANSFORMERS_KEYS
from jaxgen.models.config_dict import config_kwargs
from jaxgen.models.layers import dense

__all__ = [
    "PRESETS",
    "Buffer",
    "STDiT3",
    "STDiT3Block",
    "STDiT3Config",
    "parameter_count",
    "position_embedding_2d",
    "rotary_tables",
    "timestep_embedding",
]

# Open-Sora fixes these inside its layers; the config does not set them.
NORM_EPS = 1e-6
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000.0
ROPE_THETA = 10000.0

# Keys of Open-Sora's STDiT3Config that choose kernels. They do not change the model's output, and jaxgen
# picks its attention kernel in jaxgen.attention, so `STDiT3Config.from_opensora` skips them.
KERNEL_KEYS = frozenset({"enable_flash_attn", "enable_layernorm_kernel"})
# Keys of features this model lacks, accepted only at the value that switches the feature off.
UNSUPPORTED_DEFAULTS = {"enable_sequence_parallelism": False, "skip_y_embedder": False, "drop_path": 0.0}


@dataclasses.dataclass(frozen=True)
class STDiT3Config:
    """STDiT3 hyperparameters, with the names and defaults of Open-Sora 1.2's STDiT3Config.

    `input_size`, `class_dropout_prob`, `only_train_temporal` and `freeze_y_embedder` are kept for the
    config round trip. The model does not read them: shapes come from the input, a training task draws
    the caption dropout, and a training task chooses which variables it trains.
    """

    input_size: tuple[int | None, int | None, int | None] = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False

    def __post_init__(self):
        for name in ("input_sq_size", "in_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                     "model_max_length"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"STDiT3Config.{name} must be a positive int, got {value!r}.")
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(not isinstance(p, int) or p <= 0 for p in patch):
            raise ValueError(f"STDiT3Config.patch_size must be 3 positive ints (T, H, W), got {self.patch_size!r}.")
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; pick a head "
                "count that divides it (STDiT3-XL/2 uses 1152 and 16)."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim hidden_size / num_heads = {self.head_dim} must be even for the temporal rotary "
                "embedding, which rotates feature pairs."
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2D sine-cosine position "
                "embedding (sine and cosine for each of the two axes)."
            )
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        """Output channels: the noise prediction, plus as many variance channels when pred_sigma is set."""
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        # Open-Sora truncates with int(), as timm's Mlp receives it.
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> STDiT3Config:
        """Return the config of a preset in `PRESETS`, with some fields replaced.

        Raises:
            ValueError: the preset name is unknown; the message lists the known names.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown STDiT3 preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_opensora(cls, config: Mapping[str, Any]) -> STDiT3Config:
        """Build a config from the config.json dict of an Open-Sora STDiT3 checkpoint, or its keyword arguments.

        Keys that choose kernels (`KERNEL_KEYS`), generic transformers PretrainedConfig keys and keys starting
        with "_" are skipped. Sequence parallelism, `skip_y_embedder` and a non-zero `drop_path` raise a
        ValueError, and so does an unknown key, naming the nearest supported key.
        """
        model_type = config.get("model_type", "STDiT3")
        if model_type != "STDiT3":
            raise ValueError(
                f"config has model_type {model_type!r}, not 'STDiT3'; pass an Open-Sora 1.2 STDiT3 config."
            )
        kwargs = config_kwargs(
            cls,
            config,
            model_name="STDiT3",
            ignored_keys=GENERIC_TRANSFORMERS_KEYS | KERNEL_KEYS | {"model_type"},
            unsupported_defaults=UNSUPPORTED_DEFAULTS,
            convert=lambda value: tuple(value) if isinstance(value, list) else value,
        )
        return cls(**kwargs)

    def to_opensora(self) -> dict[str, Any]:
        """Return the keyword arguments of Open-Sora's STDiT3Config for this config."""
        result = {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }
        result["model_type"] = "STDiT3"
        return result


PRESETS: dict[str, STDiT3Config] = {
    # STDiT3-XL/2 as Open-Sora 1.2 publishes it (hpcai-tech/OpenSora-STDiT-v3): the registered
    # "STDiT3-XL/2" sizes with the qk_norm=True of its training and inference configs.
    "v1.2": STDiT3Config(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16, qk_norm=True),
    # A test-sized model: head dim 8, 16 caption features, 8 text tokens.
    "tiny": STDiT3Config(
        input_sq_size=32, hidden_size=32, depth=2, num_heads=4, caption_channels=16, model_max_length=8
    ),
}


class Buffer(nnx.BatchStat):
    """A fixed array stored in the checkpoint, like a persistent torch buffer or a parameter without gradient.

    It subclasses nnx.BatchStat because conversion.rules converts nnx.Param and nnx.BatchStat variables
    only, and an optimizer built with wrt=nnx.Param leaves it unchanged, as Open-Sora's optimizer does.
    """


# ----- functions of the config and the input shape -------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = MAX_PERIOD) -> jax.Array:
    """Map scalars t [B] to sinusoidal features [B, dim]: cosines, then sines, of t times geometric frequencies."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def position_embedding_2d(
    hidden_size: int, grid_h: int, grid_w: int, *, scale: jax.Array | float, base_size: int
) -> jax.Array:
    """Return the 2D sine-cosine position embedding [Nh * Nw, C] of a patch grid, rows first.

    Row r and column c sit at (r, c) / scale * base_size / (Nh, Nw), so the grid spans `base_size / scale`
    units whatever its size. The first C/2 features encode the column and the last C/2 the row, each as
    sines then cosines at C/4 frequencies 10000^(-4i/C), as Open-Sora's PositionEmbedding2D computes them.
    """
    half = hidden_size // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))  # [C/4]
    scale = jnp.asarray(scale, jnp.float32)
    rows = jnp.arange(grid_h, dtype=jnp.float32) / scale * np.float32(base_size / grid_h)  # [Nh]
    cols = jnp.arange(grid_w, dtype=jnp.float32) / scale * np.float32(base_size / grid_w)  # [Nw]

    def sin_cos(positions: jax.Array) -> jax.Array:
        angles = positions[:, None] * inv_freq[None]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [P, C/2]

    col_features = jnp.broadcast_to(sin_cos(cols)[None], (grid_h, grid_w, half))
    row_features = jnp.broadcast_to(sin_cos(rows)[:, None], (grid_h, grid_w, half))
    return jnp.concatenate([col_features, row_features], axis=-1).reshape(grid_h * grid_w, hidden_size)


def rotary_tables(freqs: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Return cos and sin tables [length, D] of rotary embedding at positions 0..length-1.

    `freqs` [D/2] are the rotation frequencies. Each is repeated for its feature pair (2i, 2i + 1), the
    interleaved pairing of rotary_embedding_torch 0.5.3, which Open-Sora 1.2 uses.
    """
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs.astype(jnp.float32)[None]
    angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_interleaved(x: jax.Array) -> jax.Array:
    """Map each feature pair (x[2i], x[2i + 1]) to (-x[2i + 1], x[2i])."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def _select_frames(frame_mask: jax.Array | None, x: jax.Array, x_zero: jax.Array, frames: int) -> jax.Array:
    """Take x [B, T * S, C] on frames where frame_mask [B, T] is True and x_zero elsewhere."""
    if frame_mask is None:
        return x
    b, tokens, c = x.shape
    keep = frame_mask[:, :, None, None]
    x = x.reshape(b, frames, tokens // frames, c)
    x_zero = x_zero.reshape(b, frames, tokens // frames, c)
    return jnp.where(keep, x, x_zero).reshape(b, tokens, c)


# ----- layers ---------------------------------------------------------------------------------------------


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    # Open-Sora initialises every nn.Linear with Xavier-uniform weights and zero biases.
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs,
    )


class Mlp(nnx.Module):
    """timm's Mlp as Open-Sora uses it: fc1, tanh-approximated GELU, fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.fc1 = _linear(in_features, hidden_features, rngs=rngs)
        self.fc2 = _linear(hidden_features, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.fc2, jax.nn.gelu(dense(self.fc1, x), approximate=True))


class TimestepEmbedder(nnx.Module):
    """Sinusoidal features of a scalar [B] through Linear, SiLU, Linear, at Open-Sora's `mlp.0` and `mlp.2`."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.mlp = nnx.List([
            _linear(FREQUENCY_EMBEDDING_SIZE, hidden_size, rngs=rngs),
            None,  # SiLU, which has no parameters
            _linear(hidden_size, hidden_size, rngs=rngs),
        ])

    def __call__(self, t: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.mlp[0](timestep_embedding(t)))
        return self.mlp[2](hidden)


class CaptionEmbedder(nnx.Module):
    """Projects text-encoder features [..., E] to [..., C]. Its variable `y_embedding` [L, E] is the null caption."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int, *, rngs: nnx.Rngs):
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size, rngs=rngs)
        null_caption = jax.random.normal(rngs.params(), (token_num, caption_channels)) / caption_channels**0.5
        self.y_embedding = Buffer(null_caption)

    def __call__(self, caption: jax.Array, force_drop_ids: jax.Array | None = None) -> jax.Array:
        """Project caption [B, 1, L, E], with the null caption in the samples where force_drop_ids [B] is set."""
        if force_drop_ids is not None:
            drop = jnp.asarray(force_drop_ids).astype(bool)[:, None, None, None]
            caption = jnp.where(drop, self.y_embedding[...].astype(caption.dtype), caption)
        return self.y_proj(caption)


class Attention(nnx.Module):
    """Self-attention with a fused `qkv` projection, optional RMSNorm on q and k, and optional rotary embedding."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = _linear(dim, 3 * dim, rngs=rngs)
        # Open-Sora's LlamaRMSNorm over the head dim, with a learned weight.
        self.q_norm = self._rms_norm(rngs) if qk_norm else None
        self.k_norm = self._rms_norm(rngs) if qk_norm else None
        self.proj = _linear(dim, dim, rngs=rngs)

    def _rms_norm(self, rngs: nnx.Rngs) -> nnx.RMSNorm:
        return nnx.RMSNorm(self.head_dim, epsilon=NORM_EPS, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array, rotary: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Map x [B, L, C] to [B, L, C]. `rotary` is a pair of cos and sin tables [L, D], applied after the q/k norm."""
        b, length, c = x.shape
        qkv = dense(self.qkv, x).reshape(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary[0][:, None], rotary[1][:, None]  # [L, 1, D]
            q = q * cos + _rotate_interleaved(q) * sin
            k = k * cos + _rotate_interleaved(k) * sin
        out = dot_product_attention(q, k, v)
        return dense(self.proj, out.reshape(b, length, c))


class MultiHeadCrossAttention(nnx.Module):
    """Cross-attention from image tokens to text tokens, with `q_linear` and a fused `kv_linear`."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = _linear(dim, dim, rngs=rngs)
        self.kv_linear = _linear(dim, 2 * dim, rngs=rngs)
        self.proj = _linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, keep: jax.Array) -> jax.Array:
        """Map x [B, M, C] to [B, M, C], attending to the tokens of context [B, L, C] where keep [B, L] is True."""
        b, tokens, c = x.shape
        q = dense(self.q_linear, x).reshape(b, tokens, self.num_heads, self.head_dim)
        kv = dense(self.kv_linear, context).reshape(b, context.shape[1], 2, self.num_heads, self.head_dim)
        out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=keep[:, None, None, :])
        return dense(self.proj, out.reshape(b, tokens, c))


class STDiT3Block(nnx.Module):
    """One spatial or temporal STDiT3 block: modulated self-attention, cross-attention, modulated MLP.

    `norm1` and `norm2` are LayerNorms without parameters, so they have no attributes here.
    """

    def __init__(self, config: STDiT3Config, *, temporal: bool, rngs: nnx.Rngs):
        c = config.hidden_size
        self.temporal = temporal
        self.attn = Attention(c, config.num_heads, qk_norm=config.qk_norm, rngs=rngs)
        self.cross_attn = MultiHeadCrossAttention(c, config.num_heads, rngs=rngs)
        self.mlp = Mlp(c, config.mlp_hidden_size, c, rngs=rngs)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, c)) / c**0.5)

    def _modulations(self, t_mlp: jax.Array | None) -> list[jax.Array] | None:
        """Split t_mlp [B, 6C] plus the table into shift, scale and gate of attention and MLP, each [B, 1, C]."""
        if t_mlp is None:
            return None
        table = self.scale_shift_table[...][None] + t_mlp.reshape(t_mlp.shape[0], 6, -1)  # [B, 6, C]
        return [table[:, i : i + 1] for i in range(6)]

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        keep: jax.Array,
        t_mlp: jax.Array,
        *,
        frames: int,
        rotary: tuple[jax.Array, jax.Array] | None = None,
        frame_mask: jax.Array | None = None,
        t0_mlp: jax.Array | None = None,
    ) -> jax.Array:
        """Map tokens x [B, T * S, C], frames first, to the same shape.

        Args:
            x: the tokens.
            context: text tokens [B, L, C]; keep [B, L] marks the ones to attend to.
            t_mlp: the adaLN-single projection of the timestep embedding [B, 6C].
            frames: T.
            rotary: cos and sin tables [T, D] for the temporal block.
            frame_mask, t0_mlp: optional. Frames where frame_mask [B, T] is False are modulated with t0_mlp,
                the projection of timestep 0.
        """
        b, tokens, c = x.shape
        spatial = tokens // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulations(t_mlp)
        zero = self._modulations(t0_mlp) if frame_mask is not None else None

        # 1. Modulated self-attention, within a frame (spatial) or across frames (temporal).
        normed = _layer_norm(x)
        x_m = _modulate(normed, shift_msa, scale_msa)
        if zero is not None:
            x_m = _select_frames(frame_mask, x_m, _modulate(normed, zero[0], zero[1]), frames)
        x_m = x_m.reshape(b, frames, spatial, c)
        if self.temporal:
            x_m = x_m.transpose(0, 2, 1, 3).reshape(b * spatial, frames, c)  # [B * S, T, C]
            x_m = self.attn(x_m, rotary)
            x_m = x_m.reshape(b, spatial, frames, c).transpose(0, 2, 1, 3)
        else:
            x_m = self.attn(x_m.reshape(b * frames, spatial, c))  # [B * T, S, C]
        x_m = x_m.reshape(b, tokens, c)
        gated = gate_msa * x_m
        if zero is not None:
            gated = _select_frames(frame_mask, gated, zero[2] * x_m, frames)
        x = x + gated

        # 2. Cross-attention to the text tokens, without norm or gate.
        x = x + self.cross_attn(x, context, keep)

        # 3. Modulated MLP.
        normed = _layer_norm(x)
        x_m = _modulate(normed, shift_mlp, scale_mlp)
        if zero is not None:
            x_m = _select_frames(frame_mask, x_m, _modulate(normed, zero[3], zero[4]), frames)
        x_m = self.mlp(x_m)
        gated = gate_mlp * x_m
        if zero is not None:
            gated = _select_frames(frame_mask, gated, zero[5] * x_m, frames)
        return x + gated


class T2IFinalLayer(nnx.Module):
    """Final LayerNorm modulated by the timestep embedding, then `linear` to the patch values."""

    def __init__(self, hidden_size: int, patch_values: int, *, rngs: nnx.Rngs):
        self.linear = _linear(hidden_size, patch_values, rngs=rngs)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, hidden_size)) / hidden_size**0.5)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        frames: int,
        frame_mask: jax.Array | None = None,
        t0: jax.Array | None = None,
    ) -> jax.Array:
        """Map x [B, T * S, C] to [B, T * S, P] with the timestep embedding t [B, C] (not its t_block projection)."""
        table = self.scale_shift_table[...][None]  # [1, 2, C]
        shift, scale = table[:, 0:1] + t[:, None], table[:, 1:2] + t[:, None]
        x_m = _modulate(_layer_norm(x), shift, scale)
        if frame_mask is not None:
            shift_zero, scale_zero = table[:, 0:1] + t0[:, None], table[:, 1:2] + t0[:, None]
            # NOTE: Open-Sora 1.2 (and 1.3) normalise the already modulated tokens for the timestep-0 frames,
            # rather than the block output. The published weights were trained that way, so this keeps it.
            x_zero = _modulate(_layer_norm(x_m), shift_zero, scale_zero)
            x_m = _select_frames(frame_mask, x_m, x_zero, frames)
        return dense(self.linear, x_m)


class PatchEmbed3D(nnx.Module):
    """Non-overlapping 3D patches of a channels-last latent, projected by the Conv3d `proj`."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Conv(in_channels, hidden_size, kernel_size=patch_size, strides=patch_size, padding="VALID",
                             rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map x [B, T, H, W, C_in] to [B, Nt, Nh, Nw, C]."""
        return self.proj(x)


class RotaryEmbedding(nnx.Module):
    """The rotation frequencies `freqs` [D/2] of the temporal rotary embedding, theta^(-2i/D) with theta 10000.

    Open-Sora stores them in its checkpoints as the frozen parameter `rope.freqs`.
    """

    def __init__(self, dim: int):
        self.freqs = Buffer(1.0 / (ROPE_THETA ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim)))


# ----- the model ------------------------------------------------------------------------------------------


class STDiT3(nnx.Module):
    """Open-Sora 1.2's STDiT3 video diffusion transformer, channels-last.

    Attribute paths equal the keys of Open-Sora's STDiT3 state_dict: x_embedder.proj, t_embedder.mlp.{0,2},
    fps_embedder.mlp.{0,2}, t_block.1, y_embedder.y_proj.{fc1,fc2}, y_embedder.y_embedding,
    spatial_blocks.N and temporal_blocks.N (attn.qkv, attn.q_norm, attn.k_norm, attn.proj,
    cross_attn.q_linear, cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2, scale_shift_table),
    final_layer.linear, final_layer.scale_shift_table and rope.freqs. The 2D position embedding is computed
    from the input size and has no variables, as in Open-Sora.

    Initialisation follows Open-Sora's `initialize_weights`: Xavier-uniform linear layers with zero biases,
    a normal(0.02) first fps layer and a zero second one, and zero output projections in the temporal blocks,
    so that a new model starts as a per-frame image model. The patch Conv3d keeps Flax's default initialiser.
    """

    def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c, rngs=rngs)
        self.t_embedder = TimestepEmbedder(c, rngs=rngs)
        self.fps_embedder = TimestepEmbedder(c, rngs=rngs)
        self.t_block = nnx.List([None, _linear(c, 6 * c, rngs=rngs)])  # index 0 is a SiLU
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length, rngs=rngs)
        self.spatial_blocks = nnx.List([STDiT3Block(config, temporal=False, rngs=rngs) for _ in range(config.depth)])
        self.temporal_blocks = nnx.List([STDiT3Block(config, temporal=True, rngs=rngs) for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(c, int(np.prod(config.patch_size)) * config.out_channels, rngs=rngs)
        self.rope = RotaryEmbedding(config.head_dim)

        first_fps, second_fps = self.fps_embedder.mlp[0], self.fps_embedder.mlp[2]
        first_fps.kernel.set_value(0.02 * jax.random.normal(rngs.params(), first_fps.kernel.get_value().shape))
        second_fps.kernel.set_value(jnp.zeros_like(second_fps.kernel.get_value()))
        for block in self.temporal_blocks:
            for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                layer.kernel.set_value(jnp.zeros_like(layer.kernel.get_value()))

    def null_caption(self, batch_size: int) -> jax.Array:
        """Return the null caption [B, 1, L, E] for the unconditional half of classifier-free guidance."""
        null = self.y_embedder.y_embedding[...]
        return jnp.broadcast_to(null[None, None], (batch_size, 1, *null.shape))

    def __call__(
        self,
        x: jax.Array,
        timestep: jax.Array,
        y: jax.Array,
        mask: jax.Array | None = None,
        *,
        fps: jax.Array | float,
        height: jax.Array | float,
        width: jax.Array | float,
        x_mask: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the denoiser output [B, T, H, W, out_channels] for a latent video x [B, T, H, W, in_channels].

        Args:
            x: the noisy latent, channels-last. T, H and W must be multiples of `config.patch_size`.
            timestep: diffusion time [B] (or a scalar for the whole batch), a float.
            y: text-encoder features [B, 1, L, caption_channels].
            mask: [B, L], nonzero for the text tokens to attend to; None attends to all L.
                NOTE: every sample needs at least one kept token. With none, jaxgen attends to every token
                equally, while Open-Sora's packed attention has no key for that sample.
            fps: frames per second of the video [B] or a scalar; an input of the fps embedder.
            height, width: the pixel size of the video, [B] arrays or scalars. As in Open-Sora, only the first
                sample's values count: they set the position-embedding scale sqrt(height * width) / input_sq_size.
            x_mask: optional [B, T] bool. Latent frames where it is False are given (conditioning) frames and
                are modulated with timestep 0 instead of `timestep`.
            force_drop_ids: optional [B]; nonzero samples use the null caption in place of y.

        Raises:
            ValueError: a shape does not fit the config; the message names the value and the fix.
        """
        config = self.config
        b, frames, h, w, channels = x.shape
        self._check_inputs(x, y, mask, x_mask)
        pt, ph, pw = config.patch_size
        nt, nh, nw = frames // pt, h // ph, w // pw
        spatial = nh * nw
        dtype = self.x_embedder.proj.kernel[...].dtype

        # Position embedding: scaled so that a square video of input_sq_size pixels spans base_size units.
        base_size = round(spatial**0.5)
        height0 = jnp.asarray(height, jnp.float32).reshape(-1)[0]
        width0 = jnp.asarray(width, jnp.float32).reshape(-1)[0]
        scale = jnp.sqrt(height0 * width0) / config.input_sq_size
        pos_embed = position_embedding_2d(config.hidden_size, nh, nw, scale=scale, base_size=base_size)

        # Timestep and fps embeddings, and their adaLN-single projection t_block.
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32).reshape(-1), (b,))
        fps_embedding = self.fps_embedder(fps)
        t = self.t_embedder(timestep) + fps_embedding  # [B, C]
        t_mlp = self.t_block[1](jax.nn.silu(t))  # [B, 6C]
        t0 = t0_mlp = frame_mask = None
        if x_mask is not None:
            frame_mask = jnp.asarray(x_mask).astype(bool)
            t0 = self.t_embedder(jnp.zeros_like(timestep)) + fps_embedding
            t0_mlp = self.t_block[1](jax.nn.silu(t0))

        # Text tokens.
        context = self.y_embedder(y.astype(dtype), force_drop_ids)[:, 0]  # [B, L, C]
        keep = jnp.ones(context.shape[:2], bool) if mask is None else jnp.asarray(mask) != 0

        # Patch tokens, frames first.
        tokens = self.x_embedder(x.astype(dtype)).reshape(b, nt, spatial, config.hidden_size)
        tokens = (tokens + pos_embed.astype(dtype)).reshape(b, nt * spatial, config.hidden_size)

        rotary = rotary_tables(self.rope.freqs[...], nt)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            tokens = spatial_block(tokens, context, keep, t_mlp, frames=nt, frame_mask=frame_mask, t0_mlp=t0_mlp)
            tokens = temporal_block(
                tokens, context, keep, t_mlp, frames=nt, rotary=rotary, frame_mask=frame_mask, t0_mlp=t0_mlp
            )

        out = self.final_layer(tokens, t, frames=nt, frame_mask=frame_mask, t0=t0)  # [B, Nt * S, P]
        return self._unpatchify(out, nt, nh, nw).astype(jnp.float32)

    def _check_inputs(self, x: jax.Array, y: jax.Array, mask: jax.Array | None, x_mask: jax.Array | None) -> None:
        config = self.config
        if x.ndim != 5 or x.shape[-1] != config.in_channels:
            raise ValueError(
                f"STDiT3 expects a channels-last latent [B, T, H, W, {config.in_channels}], got shape {x.shape}; "
                "transpose an Open-Sora [B, C, T, H, W] latent with x.transpose(0, 2, 3, 4, 1)."
            )
        for axis, size, patch in zip("THW", x.shape[1:4], config.patch_size):
            if size % patch:
                raise ValueError(
                    f"latent {axis}={size} is not a multiple of patch size {patch} (patch_size "
                    f"{config.patch_size}); pad or crop the latent to a multiple of {patch} along {axis}."
                )
        if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[1] != 1 or y.shape[3] != config.caption_channels:
            raise ValueError(
                f"STDiT3 expects text features y [B, 1, L, {config.caption_channels}] with B={x.shape[0]}, got "
                f"shape {y.shape}; add the axis with y[:, None] if y is [B, L, E]."
            )
        if mask is not None and tuple(jnp.shape(mask)) != (y.shape[0], y.shape[2]):
            raise ValueError(
                f"text mask has shape {tuple(jnp.shape(mask))}, expected [B, L] = {[y.shape[0], y.shape[2]]}; "
                "repeat a shared mask along the batch."
            )
        if x_mask is not None and tuple(jnp.shape(x_mask)) != (x.shape[0], x.shape[1] // config.patch_size[0]):
            raise ValueError(
                f"x_mask has shape {tuple(jnp.shape(x_mask))}, expected [B, latent frames / patch T] = "
                f"{[x.shape[0], x.shape[1] // config.patch_size[0]]}."
            )

    def _unpatchify(self, x: jax.Array, nt: int, nh: int, nw: int) -> jax.Array:
        """Map patch values [B, Nt * Nh * Nw, pt * ph * pw * C_out] to [B, T, H, W, C_out]."""
        pt, ph, pw = self.config.patch_size
        c_out = self.config.out_channels
        b = x.shape[0]
        x = x.reshape(b, nt, nh, nw, pt, ph, pw, c_out)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, nt * pt, nh * ph, nw * pw, c_out)


def parameter_count(config: STDiT3Config) -> dict[str, int]:
    """Count the elements of an STDiT3's variables from their shapes, allocating no weights.

    Returns:
        "parameters": nnx.Param elements, the weights an optimizer trains. This equals the sum of
            `p.numel()` over Open-Sora's `model.parameters()` minus `rope.freqs`, a parameter that
            Open-Sora never trains.
        "buffers": the elements of the Buffer variables y_embedder.y_embedding and rope.freqs.
    """
    from conversion.diffusers_io import abstract_model  # conversion imports jaxgen, so import it here

    model = abstract_model(lambda rngs: STDiT3(config, rngs=rngs))

    def count(state: nnx.State) -> int:
        return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state)))

    return {"parameters": count(nnx.state(model, nnx.Param)), "buffers": count(nnx.state(model, Buffer))}
