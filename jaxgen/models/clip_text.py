"""CLIP text encoders as Flax NNX modules with the module paths of transformers' checkpoints.

`CLIPTextModel` and `CLIPTextModelWithProjection` mirror the transformers classes of the same
names (version 5.25.0). Their attribute paths are the keys of the published checkpoints, such as
Stable Diffusion's text_encoder/ and SDXL's text_encoder_2/ folders:

    text_model.embeddings.{token_embedding, position_embedding}
    text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.{fc1, fc2}, layer_norm2}
    text_model.final_layer_norm
    text_projection                      (CLIPTextModelWithProjection only, no bias)

so `conversion.rules` converts their weights by name. Config fields are the keys of transformers'
CLIPTextConfig.

Axis letters: B batch, L tokens, C hidden features (hidden_size), N heads, D head dim
(C / N), F MLP features (intermediate_size), P projection features (projection_dim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.attention import dot_product_attention
from jaxgen.models.config_dict import config_kwargs
from jaxgen.models.layers import dense

__all__ = [
    "ACTIVATIONS",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextTransformer",
]

MODEL_TYPE = "clip_text_model"

# Old configs set eos_token_id to 2 although the tokenizer's end-of-text id is 49407. For them
# transformers pools at the largest input id, because the end-of-text id is the largest id of the
# CLIP vocabulary. Any other eos_token_id pools at its first occurrence.
LEGACY_EOS_TOKEN_ID = 2


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# hidden_act names of transformers' ACT2FN that this model implements, mapped to JAX functions.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,  # SD 1.x (OpenAI CLIP ViT-L/14)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # SD 2.x, SDXL's OpenCLIP bigG
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# transformers CLIPTextConfig keys of features this model lacks, with the value under which they
# change nothing. `from_transformers` accepts them only at that value. "dropout" appears in
# configs written by transformers 4.x.
UNSUPPORTED_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

# Keys of transformers' generic PretrainedConfig (4.x and 5.x) that do not describe the
# architecture: names, dtypes, output switches and generation settings. `from_transformers`
# ignores them, along with every key that starts with "_".
GENERIC_TRANSFORMERS_KEYS = frozenset(
    {
        "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
        "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
        "diversity_penalty", "do_sample", "dtype", "early_stopping", "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
        "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
        "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size",
        "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
        "output_hidden_states", "output_scores", "prefix", "problem_type", "pruned_heads",
        "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate",
        "sep_token_id", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
        "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
        "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text encoder hyperparameters; names and defaults are transformers' CLIPTextConfig.

    `eos_token_id` selects the pooled token (see `LEGACY_EOS_TOKEN_ID`). `projection_dim` is
    used only by CLIPTextModelWithProjection. `initializer_range`, `initializer_factor`,
    `pad_token_id` and `bos_token_id` are kept for the config.json round trip. The model does not
    read them, and its random initialisation is Flax's default.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides the hidden size."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; use one of {sorted(ACTIVATIONS)}.")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim <= 0):
            raise ValueError(f"projection_dim must be None or a positive int, got {self.projection_dim!r}.")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(
                f"eos_token_id must be one int, got {self.eos_token_id!r}; set it to the tokenizer's "
                "end-of-text id (49407 for CLIP), which selects the pooled token."
            )
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Build a config from a transformers config.json dict of a CLIP text encoder.

        Generic PretrainedConfig keys (`GENERIC_TRANSFORMERS_KEYS`) and keys starting with "_"
        are ignored. Keys of features this model lacks are accepted only at their no-op value,
        and unknown keys raise a ValueError that names the nearest supported key.
        """
        model_type = config.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r}. For a full CLIPModel "
                "config (model_type 'clip'), pass its 'text_config' dict instead."
            )
        kwargs = config_kwargs(cls, config, model_name="CLIPTextModel", ignored_keys=GENERIC_TRANSFORMERS_KEYS,
                               unsupported_defaults=UNSUPPORTED_TRANSFORMERS_DEFAULTS)
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """Return a config.json dict that transformers' CLIPTextConfig accepts (without architectures)."""
        config: dict[str, Any] = {"model_type": MODEL_TYPE}
        config.update(dataclasses.asdict(self))
        return config


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs of the CLIP text encoders, a pytree that jax.jit can return.

    Attributes:
        last_hidden_state: [B, L, C] after the final layer norm.
        pooler_output: [B, C], the row of last_hidden_state at the end-of-text token.
        hidden_states: num_hidden_layers + 1 arrays [B, L, C]: the embeddings, then the output of
            each encoder layer before the final layer norm. hidden_states[-2] is the penultimate
            layer that SDXL and "clip skip" use.
        text_embeds: [B, P], pooler_output through text_projection; None for CLIPTextModel.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


def _layer_norm(config: CLIPTextConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Computed in float32 for every compute dtype. use_fast_variance=False computes E[(x - mean)^2]
    # as torch does, rather than E[x^2] - mean^2.
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Map input_ids [B, L] to embeddings [B, L, C]; positions are 0 .. L - 1."""
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q_proj, k_proj, v_proj and out_proj."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Map x [B, L, C] to [B, L, C]; mask [B, 1, L, L] is True where a query may see a key."""
        b, length, _ = x.shape
        heads = (b, length, self.num_heads, self.head_dim)
        q = dense(self.q_proj, x).reshape(heads)  # [B, L, N, D]
        k = dense(self.k_proj, x).reshape(heads)
        v = dense(self.v_proj, x).reshape(heads)
        out = dot_product_attention(q, k, v, mask)  # scale 1 / sqrt(D), as in transformers
        return dense(self.out_proj, out.reshape(b, length, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
    """fc1 (C -> F), the config's activation, fc2 (F -> C)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.fc2, self.activation(dense(self.fc1, x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(config, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        # The residual stream stays float32: the layer norms return float32, and adding a
        # bfloat16 branch output to it promotes back to float32.
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of `num_hidden_layers` encoder layers."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        """Return the input and each layer's output, num_hidden_layers + 1 arrays [B, L, C]."""
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


def _attention_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Return the boolean [B, 1, L, L] mask: causal, and without padding keys when a mask is given."""
    length = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]  # [1, 1, L, L]
    if attention_mask is None:
        return mask
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape} but input_ids has shape {input_ids.shape}; "
            "pass one entry per token, 1 for a real token and 0 for padding."
        )
    keys = attention_mask.astype(jnp.bool_)[:, None, None, :]  # [B, 1, 1, L]
    # NOTE: With left padding, a padding query sees no key, so it gets equal weights on every
    # key as in transformers' eager attention. Its SDPA path differs there. Rows of real tokens
    # do not depend on these rows.
    return mask & keys


def _pool(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Pick the row [B, C] of last_hidden_state [B, L, C] at each sequence's end-of-text token."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        positions = jnp.argmax(input_ids, axis=-1)
    else:
        # The first match, because padding may reuse the end-of-text id. A sequence without the
        # token pools at position 0, as in transformers.
        positions = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nnx.Module):
    """Embeddings, causal encoder, final layer norm and end-of-text pooling (path `text_model`)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer array [B, L], got shape {input_ids.shape} and dtype "
                f"{input_ids.dtype}; add a batch axis with input_ids[None]."
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; tokenize with max_length="
                f"{self.config.max_position_embeddings} and truncation."
            )
        mask = _attention_mask(input_ids, attention_mask)
        hidden_states = self.encoder(self.embeddings(input_ids), mask)
        last_hidden_state = self.final_layer_norm(hidden_states[-1])
        return CLIPTextOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=_pool(last_hidden_state, input_ids, self.config.eos_token_id),
            hidden_states=hidden_states,
        )


class CLIPTextModel(nnx.Module):
    """CLIP text encoder without projection, as in Stable Diffusion's text_encoder/ folder.

    Args:
        config: the hyperparameters.
        dtype: compute dtype of the linear layers and attention (None or float32 for full
            precision, bfloat16 for mixed precision). Parameters are float32 either way, and the
            embeddings, layer norms, residual stream and attention softmax stay in float32.
        rngs: initialisation keys; weights loaded from a checkpoint replace them.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encode input_ids [B, L] (L <= max_position_embeddings).

        attention_mask [B, L] (1 or True for real tokens, 0 or False for padding) hides padding
        keys on top of the causal mask. Stable Diffusion pipelines pass none.
        """
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(nnx.Module):
    """CLIP text encoder plus text_projection (C -> P, no bias), as in SDXL's text_encoder_2/.

    Arguments as for `CLIPTextModel`; config.projection_dim must be set.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        if config.projection_dim is None:
            raise ValueError(
                "CLIPTextModelWithProjection needs config.projection_dim; set it to the width of "
                "text_projection (1280 for SDXL's text_encoder_2)."
            )
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)
        self.text_projection = nnx.Linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encode input_ids [B, L] as `CLIPTextModel` does and add text_embeds [B, P]."""
        output = self.text_model(input_ids, attention_mask)
        return output.replace(text_embeds=self.text_projection(output.pooler_output))
