"""Conditional 2D U-Net of Stable Diffusion as a Flax NNX module with diffusers' names.

`UNet2DConditionModel` mirrors `diffusers.UNet2DConditionModel` (version 0.42.1): its attribute
paths are diffusers' module paths, so `conversion.rules` converts checkpoints by name, and its
config fields are diffusers' config.json keys. Inputs are channels-last.

Axis letters: B batch, H height, W width, C channels, S context tokens, E context features
(cross_attention_dim), T time-embedding features (4 * block_out_channels[0]), P pooled text
features, K micro-conditioning time ids (6 for SDXL base, 5 for the SDXL refiner).

Supported: the SD 1.x, 2.x and XL layouts (DownBlock2D, CrossAttnDownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D), linear projections, per-block head counts,
per-block and per-layer transformer depths with `reverse_transformer_layers_per_block`
(asymmetric U-Nets such as distilled SDXL variants), SDXL's added conditioning
(addition_embed_type="text_time": pooled text embeddings plus sinusoidal time ids), and
class-label conditioning through `num_class_embeds`. Not supported: the other addition_embed_type
values ("text", "text_image", "image", "image_hint"), other class-embedding types, attention masks
and ControlNet residuals. `from_diffusers` rejects configs that need them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.models.config_dict import config_kwargs
from jaxgen.models.embeddings import ACTIVATIONS, TimestepEmbedding, Timesteps
from jaxgen.models.resnet import group_norm
from jaxgen.models.unet_blocks import (
    BlockSettings,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    TransformerLayers,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers UNet2DConditionModel config keys that this model does not implement, with the
# diffusers default under which they change nothing. `from_diffusers` accepts them only at
# that value.
UNSUPPORTED_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    # Only read by addition_embed_type="text", which is not supported.
    "addition_embed_type_num_heads": 64,
}

PerBlockInt = int | tuple[int, ...]
# Transformer depth per block: one int for all blocks, or one entry per block that is an int or a
# tuple with one depth per layer of that block.
PerBlockDepth = int | tuple[TransformerLayers, ...]


def _to_tuples(value: Any) -> Any:
    """Turn lists, also nested ones, into tuples (config.json stores tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(item) for item in value)
    return value


def _to_lists(value: Any) -> Any:
    """Turn tuples, also nested ones, into lists, the form diffusers writes to config.json."""
    if isinstance(value, (list, tuple)):
        return [_to_lists(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """U-Net hyperparameters; field names and defaults are diffusers' UNet2DConditionModel config.

    Quirk kept from diffusers: `attention_head_dim` is the number of attention heads per block
    (an int for all blocks or one per down block), and each head is block_out_channels[i] /
    heads wide. `num_attention_heads` must stay None because diffusers 0.42.1 rejects it too.
    `sample_size` is only metadata (the default pipeline resolution); any size divisible by
    2 ** (len(block_out_channels) - 1) runs. `upcast_attention` is kept for checkpoint configs
    but changes nothing, because the attention softmax always computes in float32.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: PerBlockInt = 2
    downsample_padding: int = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: PerBlockDepth = 1
    reverse_transformer_layers_per_block: tuple[TransformerLayers, ...] | None = None
    attention_head_dim: PerBlockInt = 8
    num_attention_heads: PerBlockInt | None = None
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, field.name, _to_tuples(value))
        self._validate()

    # ----- per-block views ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def _per_block(self, name: str) -> tuple[int, ...]:
        value = getattr(self, name)
        return (value,) * self.num_blocks if isinstance(value, int) else tuple(value)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each down block (diffusers' attention_head_dim, see the class doc)."""
        return self._per_block("attention_head_dim")

    @property
    def layers_per_down_block(self) -> tuple[int, ...]:
        return self._per_block("layers_per_block")

    @property
    def transformer_layers_per_down_block(self) -> tuple[TransformerLayers, ...]:
        """Transformer depth of each down block: an int, or a tuple with one depth per layer."""
        value = self.transformer_layers_per_block
        return (value,) * self.num_blocks if isinstance(value, int) else tuple(value)

    @property
    def transformer_layers_per_up_block(self) -> tuple[TransformerLayers, ...]:
        """Transformer depth of each up block, deepest block first.

        reverse_transformer_layers_per_block when set, else the down blocks' depths in reverse.
        """
        if self.reverse_transformer_layers_per_block is not None:
            return tuple(self.reverse_transformer_layers_per_block)
        return self.transformer_layers_per_down_block[::-1]

    @property
    def mid_block_transformer_layers(self) -> int:
        """Transformer depth of the mid block's single transformer.

        diffusers passes the last down block's depth to the mid block, which takes the first entry
        when that depth is given per layer.
        """
        depth = self.transformer_layers_per_down_block[-1]
        return depth if isinstance(depth, int) else depth[0]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_downsamplers(self) -> int:
        return self.num_blocks - 1

    @property
    def has_cross_attention(self) -> bool:
        return "CrossAttnDownBlock2D" in self.down_block_types or "CrossAttnUpBlock2D" in self.up_block_types or (
            self.mid_block_type == "UNetMidBlock2DCrossAttn"
        )

    # ----- validation --------------------------------------------------------------------

    def _validate(self) -> None:
        n = self.num_blocks
        if n == 0:
            raise ValueError("block_out_channels is empty; give one channel count per down block.")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length."
            )
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for block_type in getattr(self, name):
                if block_type not in allowed:
                    raise ValueError(f"Unsupported entry {block_type!r} in {name}; use one of {allowed}.")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"Unsupported mid_block_type {self.mid_block_type!r}; use one of {MID_BLOCK_TYPES}.")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"Unsupported act_fn {self.act_fn!r}; use one of {sorted(ACTIVATIONS)}.")
        if self.resnet_time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
            raise ValueError(
                f"Unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}; use one of "
                f"{RESNET_TIME_SCALE_SHIFTS}."
            )
        only_cross = self.only_cross_attention
        if (isinstance(only_cross, bool) and only_cross) or (isinstance(only_cross, tuple) and any(only_cross)):
            raise ValueError(
                f"only_cross_attention={only_cross!r} is not supported; set it to False (self-attention "
                "plus cross-attention in every transformer block)."
            )
        if self.num_attention_heads is not None:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads!r} is not supported, as in diffusers "
                "0.42.1; set attention_head_dim to the number of heads and num_attention_heads to None."
            )
        if not isinstance(self.norm_num_groups, int) or self.norm_num_groups <= 0:
            raise ValueError(f"norm_num_groups must be a positive int, got {self.norm_num_groups!r}.")
        if not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim <= 0:
            raise ValueError(
                f"cross_attention_dim must be one positive int, got {self.cross_attention_dim!r}; per-block "
                "context widths are not supported."
            )
        if self.num_class_embeds is not None and (
            not isinstance(self.num_class_embeds, int) or self.num_class_embeds <= 0
        ):
            raise ValueError(f"num_class_embeds must be None or a positive int, got {self.num_class_embeds!r}.")
        if self.downsample_padding < 0:
            raise ValueError(f"downsample_padding must be >= 0, got {self.downsample_padding}.")

        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but there are {n} down blocks; give one per block.")
        for name in ("layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if not all(_is_positive_int(v) for v in self._per_block(name)):
                raise ValueError(f"{name} must be a positive int or a tuple of them, got {value!r}.")
        self._validate_transformer_layers()
        self._validate_added_conditioning()

        for channels in self.block_out_channels:
            if channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"block_out_channels entry {channels} is not divisible by norm_num_groups "
                    f"{self.norm_num_groups}; GroupNorm needs whole groups."
                )
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads_per_block)):
            if channels % heads != 0:
                raise ValueError(
                    f"Block {i} has {channels} channels, not divisible by its {heads} attention heads "
                    "(attention_head_dim); pick a head count that divides the channel count."
                )

    def _validate_transformer_layers(self) -> None:
        n = self.num_blocks
        down_depths = self.transformer_layers_per_block
        _check_block_depths(
            "transformer_layers_per_block", down_depths, self.transformer_layers_per_down_block,
            self.layers_per_down_block,
        )
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None:
            if any(isinstance(depth, tuple) for depth in self.transformer_layers_per_down_block):
                raise ValueError(
                    f"transformer_layers_per_block={down_depths!r} gives per-layer depths, so the up blocks "
                    "need their own: set reverse_transformer_layers_per_block (as diffusers requires)."
                )
            return
        if not isinstance(reverse, tuple) or len(reverse) != n:
            raise ValueError(
                f"reverse_transformer_layers_per_block must have one entry per up block ({n}), got {reverse!r}."
            )
        # Up block i mirrors down block n-1-i and has one layer more.
        up_layers = tuple(layers + 1 for layers in self.layers_per_down_block[::-1])
        _check_block_depths("reverse_transformer_layers_per_block", reverse, reverse, up_layers)

    def _validate_added_conditioning(self) -> None:
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"Unsupported addition_embed_type {self.addition_embed_type!r}; use None or 'text_time' "
                "(SDXL's pooled text embeddings plus time ids)."
            )
        sizes = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if self.addition_embed_type is None:
            for name in sizes:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is only used with addition_embed_type='text_time'; "
                        "set it to None or set addition_embed_type."
                    )
            return
        for name in sizes:
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(
                    f"addition_embed_type='text_time' needs {name} as a positive int, got {getattr(self, name)!r}."
                )
        if self.projection_class_embeddings_input_dim <= self.addition_time_embed_dim:
            raise ValueError(
                f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} leaves no "
                f"room for the pooled text embeddings next to time ids of addition_time_embed_dim="
                f"{self.addition_time_embed_dim}; it must be P + K * addition_time_embed_dim for P pooled "
                "features and K time ids."
            )

    # ----- diffusers config.json ---------------------------------------------------------

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNet2DConditionConfig:
        """Build a config from a diffusers config.json dict.

        Keys starting with "_" (such as _class_name) are ignored. Keys of diffusers features this
        model lacks are accepted only at their diffusers default, and unknown keys raise a
        ValueError that names the nearest supported key.
        """
        kwargs = config_kwargs(cls, config, model_name="UNet2DConditionModel",
                               unsupported_defaults=UNSUPPORTED_DIFFUSERS_DEFAULTS, convert=_to_tuples)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """Return a config.json dict that diffusers' UNet2DConditionModel accepts."""
        config: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for field in dataclasses.fields(self):
            config[field.name] = _to_lists(getattr(self, field.name))
        return config


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_block_depths(
    name: str, value: Any, depths: tuple[Any, ...], layers_per_block: tuple[int, ...]
) -> None:
    """Check transformer depths: a positive int per block, or a tuple with one per layer of the block."""
    for i, (depth, layers) in enumerate(zip(depths, layers_per_block)):
        if isinstance(depth, tuple):
            if len(depth) != layers or not all(_is_positive_int(d) for d in depth):
                raise ValueError(
                    f"{name} entry {i} is {depth!r}, but block {i} has {layers} layers; give {layers} "
                    "positive ints or a single positive int."
                )
        elif not _is_positive_int(depth):
            raise ValueError(
                f"{name} must be a positive int, or per block an int or a tuple of per-layer ints, got {value!r}."
            )


class UNet2DConditionModel(nnx.Module):
    """Conditional U-Net with diffusers' module tree; see the module docstring for the layout.

    Args:
        config: the hyperparameters.
        dtype: compute dtype of convolutions, linear layers and attention (None or float32 for
            full precision, bfloat16 for mixed precision). Parameters are float32 either way, and
            norms and the attention softmax compute in float32.
        rngs: initialisation keys; weights loaded from a checkpoint replace them.
    """

    def __init__(self, config: UNet2DConditionConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        channels = config.block_out_channels
        settings = BlockSettings(
            temb_channels=config.time_embed_dim,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            act_fn=config.act_fn,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
            cross_attention_dim=config.cross_attention_dim,
            use_linear_projection=config.use_linear_projection,
            dtype=dtype,
        )

        self.conv_in = nnx.Conv(config.in_channels, channels[0], kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                                dtype=dtype, rngs=rngs)
        self.time_proj = Timesteps(
            channels[0], flip_sin_to_cos=config.flip_sin_to_cos, downscale_freq_shift=config.freq_shift
        )
        self.time_embedding = TimestepEmbedding(
            channels[0], config.time_embed_dim, act_fn=config.act_fn, dtype=dtype, rngs=rngs
        )
        if config.num_class_embeds is not None:
            self.class_embedding = nnx.Embed(config.num_class_embeds, config.time_embed_dim, rngs=rngs)
        else:
            self.class_embedding = None
        if config.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(
                config.addition_time_embed_dim,
                flip_sin_to_cos=config.flip_sin_to_cos,
                downscale_freq_shift=config.freq_shift,
            )
            # diffusers builds this MLP with its default SiLU and ignores act_fn here.
            self.add_embedding = TimestepEmbedding(
                config.projection_class_embeddings_input_dim, config.time_embed_dim, act_fn="silu", dtype=dtype,
                rngs=rngs,
            )
        else:
            self.add_time_proj = None
            self.add_embedding = None

        self.down_blocks = nnx.List([])
        out_ch = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            common = dict(
                num_layers=config.layers_per_down_block[i],
                add_downsample=i < config.num_blocks - 1,
                downsample_padding=config.downsample_padding,
                settings=settings,
                rngs=rngs,
            )
            if block_type == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(
                    in_ch,
                    out_ch,
                    transformer_layers=config.transformer_layers_per_down_block[i],
                    heads=config.heads_per_block[i],
                    **common,
                )
            else:
                block = DownBlock2D(in_ch, out_ch, **common)
            self.down_blocks.append(block)

        if config.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1],
                transformer_layers=config.mid_block_transformer_layers,
                heads=config.heads_per_block[-1],
                settings=settings,
                rngs=rngs,
            )
        else:
            self.mid_block = None

        # Up block i mirrors down block n-1-i; per-block settings are read in reverse.
        reversed_channels = channels[::-1]
        reversed_heads = config.heads_per_block[::-1]
        reversed_layers = config.layers_per_down_block[::-1]
        reversed_transformer_layers = config.transformer_layers_per_up_block
        self.up_blocks = nnx.List([])
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            skip_ch = reversed_channels[min(i + 1, config.num_blocks - 1)]
            common = dict(
                num_layers=reversed_layers[i] + 1,
                add_upsample=i < config.num_blocks - 1,
                settings=settings,
                rngs=rngs,
            )
            if block_type == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(
                    skip_ch,
                    prev_ch,
                    out_ch,
                    transformer_layers=reversed_transformer_layers[i],
                    heads=reversed_heads[i],
                    **common,
                )
            else:
                block = UpBlock2D(skip_ch, prev_ch, out_ch, **common)
            self.up_blocks.append(block)

        self.conv_norm_out = group_norm(channels[0], config.norm_num_groups, config.norm_eps, rngs=rngs)
        self.conv_act = ACTIVATIONS[config.act_fn]
        self.conv_out = nnx.Conv(channels[0], config.out_channels, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                                 dtype=dtype, rngs=rngs)

    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array | int | float,
        encoder_hidden_states: jax.Array | None = None,
        class_labels: jax.Array | None = None,
        *,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the model output (noise, v or x0, as trained) for a noisy sample.

        Args:
            sample: [B, H, W, in_channels], channels-last; H and W divisible by
                2 ** (len(block_out_channels) - 1).
            timestep: a scalar or [B] array of timesteps (int or float).
            encoder_hidden_states: context [B, S, cross_attention_dim]; required when the model has
                cross-attention blocks, rejected otherwise.
            class_labels: int [B] in [0, num_class_embeds); required when num_class_embeds is set,
                rejected otherwise. Concrete out-of-range labels raise a ValueError. Under jit the
                values cannot be checked, so an out-of-range label turns that sample's output into
                NaN instead of silently reading a clamped embedding row.
            text_embeds: pooled text embeddings [B, P], diffusers' added_cond_kwargs["text_embeds"];
                required when addition_embed_type is "text_time", rejected otherwise.
            time_ids: micro-conditioning values [B, K], diffusers' added_cond_kwargs["time_ids"]
                (SDXL base: original height and width, crop top and left, target height and width);
                required with text_embeds. P + K * addition_time_embed_dim must equal
                projection_class_embeddings_input_dim.

        Returns:
            [B, H, W, out_channels] in the dtype of `sample`.
        """
        batch = self._check_sample(sample)
        timesteps = self._broadcast_timestep(timestep, batch)
        self._check_context(encoder_hidden_states, batch)
        self._check_class_labels(class_labels, batch)
        self._check_added_conditioning(text_embeds, time_ids, batch)
        config = self.config

        if config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embedding(self.time_proj(timesteps))  # [B, T]
        if self.class_embedding is not None:
            labels = jnp.asarray(class_labels)
            valid = (labels >= 0) & (labels < config.num_class_embeds)
            class_emb = self.class_embedding(jnp.where(valid, labels, 0))
            emb = emb + jnp.where(valid[:, None], class_emb, jnp.nan)
        if self.add_embedding is not None:
            emb = emb + self._added_embedding(text_embeds, time_ids)

        h = self.conv_in(sample)
        skips: tuple[jax.Array, ...] = (h,)
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips += block_skips

        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states)

        for block in self.up_blocks:
            count = len(block.resnets)
            h = block(h, skips[-count:], emb, encoder_hidden_states)
            skips = skips[:-count]

        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return h.astype(sample.dtype)

    def _added_embedding(self, text_embeds: jax.Array, time_ids: jax.Array) -> jax.Array:
        """Embed SDXL's added conditioning: [text_embeds, sinusoids of each time id] through an MLP."""
        batch = text_embeds.shape[0]
        time_embeds = self.add_time_proj(jnp.asarray(time_ids).reshape(-1))  # [B * K, addition_time_embed_dim]
        time_embeds = time_embeds.reshape(batch, -1)  # [B, K * addition_time_embed_dim]
        added = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_embeds], axis=-1)
        return self.add_embedding(added)  # [B, T]

    # ----- input checks ------------------------------------------------------------------

    def _check_sample(self, sample: jax.Array) -> int:
        config = self.config
        shape = getattr(sample, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(
                f"sample must be a [B, H, W, C] channels-last array, got shape {shape}; add the batch "
                "axis or transpose NCHW input with x.transpose(0, 2, 3, 1)."
            )
        if not jnp.issubdtype(sample.dtype, jnp.floating):
            raise TypeError(f"sample must be a floating-point array, got dtype {sample.dtype}; cast it first.")
        b, h, w, c = shape
        if c != config.in_channels:
            hint = ""
            if shape[1] == config.in_channels:
                hint = " The input looks NCHW; transpose it with x.transpose(0, 2, 3, 1)."
            raise ValueError(
                f"sample has {c} channels on its last axis, but the model expects in_channels="
                f"{config.in_channels} (shape {tuple(shape)} read as [B, H, W, C]).{hint}"
            )
        factor = 2**config.num_downsamplers
        if h % factor != 0 or w % factor != 0:
            raise ValueError(
                f"sample spatial size {h}x{w} is not divisible by {factor} (2 ** {config.num_downsamplers} "
                f"downsamplers); pad or resize the input to a multiple of {factor}."
            )
        return b

    @staticmethod
    def _broadcast_timestep(timestep: jax.Array | int | float, batch: int) -> jax.Array:
        timesteps = jnp.asarray(timestep)
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
            raise ValueError(
                f"timestep must be a scalar or have shape [B] = [{batch}], got shape {timesteps.shape}."
            )
        if not (jnp.issubdtype(timesteps.dtype, jnp.integer) or jnp.issubdtype(timesteps.dtype, jnp.floating)):
            raise TypeError(f"timestep must be int or float, got dtype {timesteps.dtype}.")
        return jnp.broadcast_to(timesteps.reshape(-1), (batch,))

    def _check_context(self, context: jax.Array | None, batch: int) -> None:
        config = self.config
        if context is None:
            if config.has_cross_attention:
                raise ValueError(
                    "encoder_hidden_states is required because the model has cross-attention blocks; pass a "
                    f"[B, S, {config.cross_attention_dim}] array."
                )
            return
        if not config.has_cross_attention:
            raise ValueError(
                "encoder_hidden_states was passed, but the model has no cross-attention blocks; drop the "
                "argument or use CrossAttn block types."
            )
        shape = getattr(context, "shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(f"encoder_hidden_states must be [B, S, E], got shape {shape}.")
        if shape[0] != batch:
            raise ValueError(f"encoder_hidden_states has batch {shape[0]}, but sample has batch {batch}.")
        if shape[-1] != config.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states has last dim {shape[-1]}, but the model expects cross_attention_dim="
                f"{config.cross_attention_dim}; project the context to that width or change the config."
            )

    def _check_added_conditioning(
        self, text_embeds: jax.Array | None, time_ids: jax.Array | None, batch: int
    ) -> None:
        config = self.config
        if config.addition_embed_type is None:
            for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
                if value is not None:
                    raise ValueError(
                        f"{name} was passed, but the model has no added conditioning (addition_embed_type is "
                        "None); drop the argument or use an addition_embed_type='text_time' config."
                    )
            return
        for name, value, shape in (("text_embeds", text_embeds, "[B, P]"), ("time_ids", time_ids, "[B, K]")):
            if value is None:
                raise ValueError(
                    f"{name} is required because addition_embed_type='text_time'; pass a {shape} array "
                    "(diffusers' added_cond_kwargs) as a keyword argument."
                )
        shapes = {}
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            value = value if hasattr(value, "shape") else np.asarray(value)
            shape = tuple(value.shape)
            if len(shape) != 2:
                raise ValueError(f"{name} must be a 2-D [B, features] array, got shape {shape}.")
            if shape[0] != batch:
                raise ValueError(f"{name} has batch {shape[0]}, but sample has batch {batch}.")
            if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
                raise TypeError(f"{name} must be an int or float array, got dtype {value.dtype}.")
            shapes[name] = shape
        pooled = shapes["text_embeds"][1]
        num_ids = shapes["time_ids"][1]
        width = pooled + num_ids * config.addition_time_embed_dim
        if width != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds [B, {pooled}] and time_ids [B, {num_ids}] give {pooled} + {num_ids} * "
                f"{config.addition_time_embed_dim} (addition_time_embed_dim) = {width} features, but "
                f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}; "
                "check the pooled text width and the number of time ids."
            )

    def _check_class_labels(self, class_labels: jax.Array | None, batch: int) -> None:
        num_classes = self.config.num_class_embeds
        if num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels was passed, but the model has no class embedding (num_class_embeds is None); "
                    "drop the argument or set num_class_embeds."
                )
            return
        if class_labels is None:
            raise ValueError(
                f"class_labels is required because num_class_embeds={num_classes}; pass int labels of shape [B]."
            )
        labels = class_labels if isinstance(class_labels, jax.Array) else np.asarray(class_labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"class_labels must be an integer array, got dtype {labels.dtype}; cast with astype(int).")
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape [B] = [{batch}], got {labels.shape}.")
        if isinstance(labels, jax.core.Tracer):
            return  # Values are unknown under jit; __call__ maps bad labels to NaN instead.
        values = np.asarray(labels)
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise ValueError(
                f"class_labels {bad.tolist()} are outside [0, {num_classes}); num_class_embeds={num_classes}."
            )
