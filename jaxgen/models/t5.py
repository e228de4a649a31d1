"""The T5 text encoder as a Flax NNX module with the module paths of transformers' checkpoints.

`T5EncoderModel` mirrors transformers' class of the same name (version 5.25.0), such as the text
encoder in the text_encoder_3/ folder of Stable Diffusion 3 pipelines. Its attribute paths are
the keys of those checkpoints:

    shared                                                    token embedding
    encoder.block.N.layer.0.SelfAttention.{q, k, v, o}       no biases
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias
    encoder.block.N.layer.0.layer_norm
    encoder.block.N.layer.1.DenseReluDense.{wi, wo}           feed_forward_proj "relu" (T5 v1.0)
    encoder.block.N.layer.1.DenseReluDense.{wi_0, wi_1, wo}   "gated-gelu" (T5 v1.1, Flan-T5)
    encoder.block.N.layer.1.layer_norm
    encoder.final_layer_norm

so `conversion.rules` converts their weights by name. Config fields are the keys of
transformers' T5Config.

T5 has no absolute positions. Block 0 learns a bias per head for each bucket of relative
distance (key position - query position), and every block adds that same bias to its attention
logits. The logits are not scaled by 1 / sqrt(D), because T5's initialisation already accounts
for it. The layer norms are RMS norms: no mean subtraction and no bias.

Precision with dtype=bfloat16: q, k, v, o and the attention-weighted sum of values run in
bfloat16. The embeddings, the relative position bias, the attention logits and softmax, every
RMS norm, the whole feed-forward (wi or wi_0 and wi_1, the activation and wo) and the residual
stream stay in float32. Parameters are float32 in every case. transformers 5.25 differs: it
keeps `wo` in float32 (`_keep_in_fp32_modules`) only when a model is loaded in float16, and in
bfloat16 it runs every layer in bfloat16.

Axis letters: B batch, L tokens, C model features (d_model), N heads, D head dim (d_kv),
F feed-forward features (d_ff).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.attention import dot_product_attention
from jaxgen.models.clip_text import ACTIVATIONS, GENERIC_TRANSFORMERS_KEYS
from jaxgen.models.config_dict import config_kwargs
from jaxgen.models.layers import dense

__all__ = [
    "T5Config",
    "T5EncoderModel",
    "T5EncoderOutput",
    "relative_position_buckets",
]

MODEL_TYPE = "t5"

# T5Config keys that configure the decoder, task heads or generation, so the encoder has no use
# for them. "n_positions" and "output_past" appear in configs written by older transformers.
ENCODER_UNUSED_KEYS = frozenset(
    {"classifier_dropout", "n_positions", "num_decoder_layers", "output_past", "scale_decoder_outputs", "use_cache"}
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 encoder hyperparameters. Names and defaults are those of transformers' T5Config.

    `feed_forward_proj` is an activation name of `ACTIVATIONS` ("relu" for T5 v1.0), or "gated-"
    plus one ("gated-gelu" for T5 v1.1, which uses the tanh approximation "gelu_new").
    `dropout_rate`, `initializer_factor`, `pad_token_id` and `eos_token_id` are kept for the
    config.json round trip. The model does not read them: it applies no dropout, and its random
    initialisation is Flax's default.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    pad_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance")  # fmt: skip
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}.")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets must be at least 4, got {self.relative_attention_num_buckets}: "
                "the encoder splits the buckets between both directions, and each half into exact and "
                "log-spaced buckets. T5 checkpoints use 32."
            )
        exact_buckets = self.relative_attention_num_buckets // 4
        if self.relative_attention_max_distance <= exact_buckets:
            raise ValueError(
                f"relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
                f"relative_attention_num_buckets // 4 = {exact_buckets}, the distances that get one bucket each. "
                "T5 checkpoints use 128."
            )
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be a positive float, got {self.layer_norm_epsilon!r}.")
        if not isinstance(self.feed_forward_proj, str) or (
            self.feed_forward_proj.removeprefix("gated-") not in ACTIVATIONS
        ):
            raise ValueError(
                f"Unsupported feed_forward_proj {self.feed_forward_proj!r}. Use one of {sorted(ACTIVATIONS)}, "
                "optionally with the prefix 'gated-' (T5 v1.1 uses 'gated-gelu')."
            )

    @property
    def is_gated_act(self) -> bool:
        """Whether the feed-forward is act(wi_0 x) * wi_1 x rather than act(wi x)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward activation, a key of `ACTIVATIONS`."""
        # transformers 5.25 maps "gated-gelu" to "gelu_new", the tanh approximation.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> T5Config:
        """Build a config from a transformers config.json dict of a T5 model.

        Configs of T5EncoderModel, T5Model and T5ForConditionalGeneration are accepted. Generic
        PretrainedConfig keys (`GENERIC_TRANSFORMERS_KEYS`), keys starting with "_" and keys of
        the decoder and task heads (`ENCODER_UNUSED_KEYS`) are ignored. "dense_act_fn" and
        "is_gated_act", which transformers derives from feed_forward_proj, must agree with it.
        Unknown keys raise a ValueError that names the nearest supported key.
        """
        model_type = config.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r}. Pass the folder of a T5 "
                "text encoder, such as a Stable Diffusion 3 pipeline's text_encoder_3/."
            )
        if config.get("is_decoder"):
            raise ValueError(
                "config.json sets is_decoder=true, which makes transformers build a causal T5 stack, but "
                "jaxgen's T5EncoderModel is bidirectional. Set is_decoder to false for an encoder."
            )
        derived = {key: config[key] for key in ("dense_act_fn", "is_gated_act") if key in config}
        kwargs = config_kwargs(
            cls,
            {key: value for key, value in config.items() if key not in derived},
            model_name="T5EncoderModel",
            ignored_keys=GENERIC_TRANSFORMERS_KEYS | ENCODER_UNUSED_KEYS,
            convert=lambda value: tuple(value) if isinstance(value, list) else value,
        )
        result = cls(**kwargs)
        for key, value in derived.items():
            if value != getattr(result, key):
                raise ValueError(
                    f"config.json sets {key}={value!r}, but feed_forward_proj={result.feed_forward_proj!r} "
                    f"implies {key}={getattr(result, key)!r}. Fix feed_forward_proj or drop {key}."
                )
        return result

    def to_transformers(self) -> dict[str, Any]:
        """Return a config.json dict that transformers' T5Config accepts (without architectures)."""
        config: dict[str, Any] = {"model_type": MODEL_TYPE, "is_encoder_decoder": False}
        for key, value in dataclasses.asdict(self).items():
            config[key] = list(value) if isinstance(value, tuple) else value
        return config


@flax.struct.dataclass
class T5EncoderOutput:
    """Outputs of `T5EncoderModel`, a pytree that jax.jit can return.

    Attributes:
        last_hidden_state: [B, L, C], the output of the last block after the final layer norm.
        hidden_states: None unless requested. Otherwise num_layers + 1 arrays [B, L, C], in the
            order of transformers 5.25's output_hidden_states: the token embeddings, the output of
            every block except the last, then last_hidden_state.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def relative_position_buckets(
    query_length: int, key_length: int, *, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Compute the bidirectional T5 bucket [L_q, L_k] of each relative distance (key - query).

    Half of the buckets are for keys after the query and half for keys before it (or at it).
    Within each half, the first quarter of `num_buckets` buckets hold one distance each, and the
    rest cover distances up to `max_distance` in logarithmically growing ranges. Larger
    distances share the last bucket. The table is built with numpy in float32, in the order of
    operations of transformers 5.25 (which follows Mesh TensorFlow), so it does not depend on
    the accelerator's log function.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    exact = half // 2
    # np.maximum avoids log(0). Distances below `exact` take the exact branch anyway.
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    log_spaced = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(distance < exact, distance, log_spaced)).astype(np.int32)


def _layer_norm(config: T5Config, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # T5's layer norm is an RMS norm. It runs in float32 for every compute dtype.
    return nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=jnp.float32, rngs=rngs)


class T5Attention(nnx.Module):
    """Bidirectional multi-head self-attention without biases and without logit scaling.

    Only the attention of block 0 owns `relative_attention_bias` (buckets -> one bias per head).
    """

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nnx.Linear(config.d_model, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(config.d_model, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(config.d_model, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.o = nnx.Linear(inner, config.d_model, use_bias=False, dtype=dtype, rngs=rngs)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(self.num_buckets, config.num_heads, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """Look up the float32 bias [1, N, L, L] that every block adds to its attention logits."""
        buckets = relative_position_buckets(
            length, length, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        values = self.relative_attention_bias(jnp.asarray(buckets))  # [L, L, N]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Map x [B, L, C] to [B, L, C]. mask [B, 1, 1, L] is True at keys that may be attended."""
        b, length, _ = x.shape
        heads = (b, length, self.num_heads, self.head_dim)
        q = dense(self.q, x).reshape(heads)  # [B, L, N, D]
        k = dense(self.k, x).reshape(heads)
        v = dense(self.v, x).reshape(heads)
        # T5 does not scale the logits: its initialisation folds 1 / sqrt(D) into the query weights.
        out = dot_product_attention(q, k, v, mask, bias=position_bias, scale=1.0)
        return dense(self.o, out.reshape(b, length, self.num_heads * self.head_dim))


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention: x + SelfAttention(layer_norm(x))."""

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, rngs=rngs
        )
        self.layer_norm = _layer_norm(config, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        # The layer norm returns float32, and adding the bfloat16 attention output to the float32
        # residual stream promotes the sum to float32.
        return x + self.SelfAttention(self.layer_norm(x), position_bias, mask)


class T5DenseActDense(nnx.Module):
    """Feed-forward wo(act(wi x)) of T5 v1.0, computed in float32."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[config.dense_act_fn]
        self.wi = nnx.Linear(config.d_model, config.d_ff, use_bias=False, dtype=jnp.float32, rngs=rngs)
        self.wo = nnx.Linear(config.d_ff, config.d_model, use_bias=False, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.wo, self.activation(dense(self.wi, x)))


class T5DenseGatedActDense(nnx.Module):
    """Gated feed-forward wo(act(wi_0 x) * wi_1 x) of T5 v1.1, computed in float32."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[config.dense_act_fn]
        self.wi_0 = nnx.Linear(config.d_model, config.d_ff, use_bias=False, dtype=jnp.float32, rngs=rngs)
        self.wi_1 = nnx.Linear(config.d_model, config.d_ff, use_bias=False, dtype=jnp.float32, rngs=rngs)
        self.wo = nnx.Linear(config.d_ff, config.d_model, use_bias=False, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.activation(dense(self.wi_0, x))
        return dense(self.wo, gate * dense(self.wi_1, x))


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward: x + DenseReluDense(layer_norm(x)), all in float32."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        # The name DenseReluDense is the checkpoint's, whatever the activation.
        if config.is_gated_act:
            self.DenseReluDense = T5DenseGatedActDense(config, rngs=rngs)
        else:
            self.DenseReluDense = T5DenseActDense(config, rngs=rngs)
        self.layer_norm = _layer_norm(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """One encoder block, whose `layer` is [self-attention, feed-forward] as in the checkpoint keys."""

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(
                    config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, rngs=rngs
                ),
                T5LayerFF(config, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        attention, feed_forward = self.layer
        return feed_forward(attention(x, position_bias, mask))


class T5Stack(nnx.Module):
    """The encoder blocks and the final layer norm (path `encoder`).

    The token embedding lives on `T5EncoderModel.shared`. transformers ties
    encoder.embed_tokens to it, so this module has no copy.
    """

    def __init__(self, config: T5Config, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.block = nnx.List(
            [
                T5Block(config, has_relative_attention_bias=index == 0, dtype=dtype, rngs=rngs)
                for index in range(config.num_layers)
            ]
        )
        self.final_layer_norm = _layer_norm(config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """Run the blocks on embeddings x [B, L, C].

        Returns the hidden states of `T5EncoderOutput.hidden_states`. The last one is the output.
        """
        first_attention = self.block[0].layer[0].SelfAttention
        position_bias = first_attention.position_bias(x.shape[1])  # shared by every block
        hidden_states = [x]
        for block in self.block:
            x = block(x, position_bias, mask)
            hidden_states.append(x)
        # Like transformers, the last block's output is replaced by its normalised form.
        hidden_states[-1] = self.final_layer_norm(x)
        return tuple(hidden_states)


def _key_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array | None:
    """Build the boolean mask [B, 1, 1, L] that hides padding keys, or None without a mask."""
    if attention_mask is None:
        return None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape} but input_ids has shape {input_ids.shape}. "
            "Pass one entry per token, 1 for a real token and 0 for padding."
        )
    return attention_mask.astype(jnp.bool_)[:, None, None, :]


class T5EncoderModel(nnx.Module):
    """The T5 encoder: token embedding, bidirectional blocks with relative position bias, final RMS norm.

    Args:
        config: the hyperparameters.
        dtype: compute dtype of the attention projections q, k, v, o (None or float32 for full
            precision, bfloat16 for mixed precision). The module docstring lists what stays in
            float32. Parameters are float32 either way.
        rngs: initialisation keys. Weights loaded from a checkpoint replace them.
    """

    def __init__(self, config: T5Config, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.encoder = T5Stack(config, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> T5EncoderOutput:
        """Encode input_ids [B, L].

        attention_mask [B, L] (1 or True for real tokens, 0 or False for padding) hides padding
        keys from every query. Queries at padding positions are still computed. A row with no real
        token gets equal attention weights on every key, where transformers' result depends on
        its attention backend. `output_hidden_states` is a Python bool, so mark it static when
        jitting a function that passes it through.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer array [B, L], got shape {input_ids.shape} and dtype "
                f"{input_ids.dtype}. Add a batch axis with input_ids[None]."
            )
        mask = _key_mask(input_ids, attention_mask)
        hidden_states = self.encoder(self.shared(input_ids), mask)
        return T5EncoderOutput(
            last_hidden_state=hidden_states[-1],
            hidden_states=hidden_states if output_hidden_states else None,
        )
