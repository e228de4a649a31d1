"""UNet2DConditionModel: parity with diffusers, config handling, input checks, jit and shared layers.

Parity metric: max |jaxgen - diffusers| / max |diffusers| over the whole output, in float32.
The tolerance is 1e-5; measured values are about 1e-6 on a 2-core x86 CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from flax import nnx

from conversion.diffusers_io import abstract_model, load_unet, read_config, save_unet
from conversion.rules import torch_shapes
from jaxgen.attention import dot_product_attention
from jaxgen.models import UNet2DConditionConfig, UNet2DConditionModel
from jaxgen.models.layers import dense, pointwise_conv

PARITY_RTOL = 1e-5

SD1_STYLE = dict(
    sample_size=8,
    in_channels=4,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=8,
    num_class_embeds=5,
)
# Stable Diffusion 2.x / XL options that are only config: linear projections, a head count per
# block and two transformer layers per attention block.
SD2_STYLE = dict(
    SD1_STYLE,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
    attention_head_dim=(4, 8),
    transformer_layers_per_block=2,
)
# The remaining supported options, away from their defaults.
OTHER_OPTIONS = dict(
    SD1_STYLE,
    mid_block_type=None,
    layers_per_block=(1, 2),
    resnet_time_scale_shift="scale_shift",
    downsample_padding=0,
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    num_class_embeds=None,
)
DIGITS = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=8,
    num_class_embeds=11,
)


def save_diffusers_unet(config: dict, folder, seed: int = 0) -> DiffusersUNet:
    """Build a diffusers U-Net with perturbed weights, save it to `folder` and return it."""
    torch.manual_seed(seed)
    model = DiffusersUNet(**config).eval()
    with torch.no_grad():
        # Norm weights start at exactly 1 and biases at 0; perturbing every tensor makes a
        # transposed or swapped parameter change the output.
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return model


def make_inputs(config: dict, batch: int = 2, height: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config["in_channels"], height, height)).astype(np.float32)
    context = rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32)
    timesteps = np.array([10, 999])[:batch]
    labels = None
    if config.get("num_class_embeds"):
        labels = np.arange(batch) % config["num_class_embeds"]
    return sample, timesteps, context, labels


def diffusers_forward(model: DiffusersUNet, sample, timesteps, context, labels) -> np.ndarray:
    """Run diffusers on NCHW input and return its output as NHWC numpy."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample),
            torch.from_numpy(np.asarray(timesteps)),
            torch.from_numpy(context),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


class JittedUNet:
    """Jitted forward over (graphdef, state) that counts how often it is traced."""

    def __init__(self, model: UNet2DConditionModel):
        self.graphdef, self.state = nnx.split(model)
        self.traces = 0

        def forward(state, sample, timesteps, context, labels):
            self.traces += 1
            return nnx.merge(self.graphdef, state)(sample, timesteps, context, labels)

        self._forward = jax.jit(forward)

    def __call__(self, sample_nchw, timesteps, context, labels) -> np.ndarray:
        sample = jnp.asarray(sample_nchw.transpose(0, 2, 3, 1))
        return np.asarray(self._forward(self.state, sample, timesteps, context, labels))


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1_unet")
    reference = save_diffusers_unet(SD1_STYLE, folder)
    return reference, JittedUNet(load_unet(folder)), folder


@pytest.fixture(scope="module")
def abstract_unet():
    """A model without weights: enough for the input checks, which run before any compute."""
    config = UNet2DConditionConfig(**SD1_STYLE)
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))


# ----- parity with diffusers -------------------------------------------------------------------


def test_parity_sd1_style(sd1):
    reference, jitted, _ = sd1
    inputs = make_inputs(SD1_STYLE)
    expected = diffusers_forward(reference, *inputs)
    actual = jitted(*inputs)
    assert actual.shape == (2, 8, 8, 3)
    assert max_relative_error(actual, expected) <= PARITY_RTOL


@pytest.mark.parametrize("name, config", [("sd2_style", SD2_STYLE), ("other_options", OTHER_OPTIONS)])
def test_parity_config_variants(tmp_path, name, config):
    reference = save_diffusers_unet(config, tmp_path, seed=1)
    jitted = JittedUNet(load_unet(tmp_path))
    sample, _, context, labels = make_inputs(config)
    # A float scalar timestep exercises the broadcast to [B] and non-integer timesteps.
    expected = diffusers_forward(reference, sample, np.float32(500.5), context, labels)
    actual = jitted(sample, np.float32(500.5), context, labels)
    assert max_relative_error(actual, expected) <= PARITY_RTOL, name


def test_bfloat16_compute_close_to_float32(sd1):
    _, jitted, folder = sd1
    inputs = make_inputs(SD1_STYLE)
    bf16 = JittedUNet(load_unet(folder, dtype=jnp.bfloat16))
    reference = jitted(*inputs)
    actual = bf16(*inputs)
    assert actual.dtype == np.float32  # Output follows the input dtype.
    # bfloat16 keeps 8 mantissa bits; through ~20 layers a few percent is expected.
    assert max_relative_error(actual, reference) <= 5e-2
    assert max_relative_error(actual, reference) > 0  # The bf16 path really ran.


# ----- jit behaviour ---------------------------------------------------------------------------


def test_jit_does_not_recompile(sd1):
    _, jitted, _ = sd1
    sample, timesteps, context, labels = make_inputs(SD1_STYLE)
    jitted(sample, timesteps, context, labels)
    traces = jitted.traces
    other_sample, other_timesteps, other_context, _ = make_inputs(SD1_STYLE, seed=1)
    jitted(other_sample, other_timesteps, other_context, labels[::-1].copy())
    assert jitted.traces == traces


def test_out_of_range_label_gives_nan_under_jit(sd1):
    _, jitted, _ = sd1
    sample, timesteps, context, _ = make_inputs(SD1_STYLE)
    out = jitted(sample, timesteps, context, np.array([1, SD1_STYLE["num_class_embeds"]]))
    assert np.all(np.isfinite(out[0]))
    assert np.all(np.isnan(out[1]))


# ----- config ----------------------------------------------------------------------------------


def test_config_matches_diffusers_config(sd1):
    reference, _, _ = sd1
    config = UNet2DConditionConfig.from_diffusers(dict(reference.config))
    assert config == UNet2DConditionConfig(**SD1_STYLE)


def test_config_round_trips_through_diffusers_dict():
    config = UNet2DConditionConfig(**SD2_STYLE)
    as_dict = config.to_diffusers()
    assert as_dict["_class_name"] == "UNet2DConditionModel"
    assert as_dict["attention_head_dim"] == [4, 8]
    assert UNet2DConditionConfig.from_diffusers(as_dict) == config


def test_config_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="'cross_attention_dims'.*nearest supported key is 'cross_attention_dim'"):
        UNet2DConditionConfig.from_diffusers({"cross_attention_dims": 16})


def test_config_unsupported_option_named():
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNet2DConditionConfig.from_diffusers({"class_embed_type": "timestep"})
    # The same key at its default is accepted, and private keys are ignored.
    config = UNet2DConditionConfig.from_diffusers({"class_embed_type": None, "_name_or_path": "x"})
    assert config == UNet2DConditionConfig()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"norm_num_groups": 12}, "not divisible by norm_num_groups 12"),
        ({"attention_head_dim": 3}, "not divisible by its 3 attention heads"),
        ({"attention_head_dim": (8, 8, 8)}, "attention_head_dim has 3 entries"),
        ({"down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D")}, "'AttnDownBlock2D' in down_block_types"),
        ({"num_attention_heads": 8}, "num_attention_heads=8 is not supported"),
        ({"only_cross_attention": True}, "only_cross_attention=True"),
        ({"act_fn": "tanh"}, "act_fn 'tanh'"),
    ],
)
def test_config_rejects_invalid(override, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionConfig(**dict(SD1_STYLE, **override))


# ----- input checks ----------------------------------------------------------------------------


def _valid_call_args():
    sample, timesteps, context, labels = make_inputs(SD1_STYLE)
    return dict(
        sample=jnp.asarray(sample.transpose(0, 2, 3, 1)),
        timestep=timesteps,
        encoder_hidden_states=context,
        class_labels=labels,
    )


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"sample": np.zeros((8, 8, 4), np.float32)}, ValueError, r"\[B, H, W, C\] channels-last"),
        ({"sample": np.zeros((2, 4, 8, 8), np.float32)}, ValueError, "looks NCHW"),
        ({"sample": np.zeros((2, 8, 8, 4), np.int32)}, TypeError, "floating-point"),
        ({"sample": np.zeros((2, 7, 8, 4), np.float32)}, ValueError, "7x8 is not divisible by 2"),
        ({"timestep": np.zeros((3,))}, ValueError, r"timestep must be a scalar or have shape \[B\]"),
        ({"encoder_hidden_states": None}, ValueError, "encoder_hidden_states is required"),
        ({"encoder_hidden_states": np.zeros((2, 7, 12), np.float32)}, ValueError, "last dim 12.*=16"),
        ({"encoder_hidden_states": np.zeros((3, 7, 16), np.float32)}, ValueError, "batch 3"),
        ({"class_labels": None}, ValueError, "class_labels is required because num_class_embeds=5"),
        ({"class_labels": np.array([0, 5])}, ValueError, r"class_labels \[5\] are outside \[0, 5\)"),
        ({"class_labels": np.array([-1, 0])}, ValueError, r"class_labels \[-1\] are outside"),
        ({"class_labels": np.array([0.0, 1.0])}, TypeError, "integer array"),
        ({"class_labels": np.array([0, 1, 2])}, ValueError, r"shape \[B\] = \[2\]"),
    ],
)
def test_input_validation(abstract_unet, override, error, message):
    kwargs = dict(_valid_call_args(), **override)
    with pytest.raises(error, match=message):
        abstract_unet(**kwargs)


def test_rejects_unused_conditioning():
    config = UNet2DConditionConfig(
        **dict(
            SD1_STYLE,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            mid_block_type=None,
            num_class_embeds=None,
        )
    )
    model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    kwargs = _valid_call_args()
    with pytest.raises(ValueError, match="no cross-attention blocks"):
        model(kwargs["sample"], kwargs["timestep"], encoder_hidden_states=kwargs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="no class embedding"):
        model(kwargs["sample"], kwargs["timestep"], class_labels=kwargs["class_labels"])


# ----- the digits model ------------------------------------------------------------------------


def test_digits_config_traces_forward_and_backward():
    config = UNet2DConditionConfig(**DIGITS)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    params = jax.tree.leaves(state)
    assert sum(int(np.prod(p.shape)) for p in params) == _diffusers_parameter_count(DIGITS)

    def loss(state, sample, timesteps, context, labels):
        return jnp.mean(nnx.merge(graphdef, state)(sample, timesteps, context, labels) ** 2)

    batch = 4
    grads = jax.eval_shape(
        jax.grad(loss),
        state,
        jax.ShapeDtypeStruct((batch, 16, 16, 1), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, 1, 64), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    assert [g.shape for g in jax.tree.leaves(grads)] == [p.shape for p in params]


def _diffusers_parameter_count(config: dict) -> int:
    return sum(p.numel() for p in DiffusersUNet(**config).parameters())


def test_model_attribute_paths_follow_diffusers(abstract_unet):
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(abstract_unet))}
    expected = {
        "conv_in.kernel",
        "time_embedding.linear_1.kernel",
        "class_embedding.embedding",
        "down_blocks.0.resnets.0.time_emb_proj.kernel",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.kernel",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.kernel",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.kernel",
        "down_blocks.0.downsamplers.0.conv.kernel",
        "mid_block.attentions.0.proj_in.kernel",
        "up_blocks.0.upsamplers.0.conv.kernel",
        "up_blocks.1.resnets.0.conv_shortcut.kernel",
        "conv_norm_out.scale",
        "conv_out.bias",
    }
    assert expected <= paths


# ----- SDXL: added text/time conditioning and asymmetric transformer depths ---------------------

# Tiny SDXL-like U-Net: DownBlock2D first, per-block heads and depths (the mid block takes the last
# depth, 2), linear projections and the "text_time" added embedding with 6 time ids.
POOLED_DIM = 12
SDXL_STYLE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM,
    cross_attention_dim=32,
    norm_num_groups=8,
)
# Per-layer transformer depths with separate up-block depths (as in distilled SDXL variants), and
# 5 time ids as in the SDXL refiner (sizes, crop, aesthetic score).
ASYMMETRIC_FIVE_TIME_IDS = dict(
    SDXL_STYLE,
    transformer_layers_per_block=((1, 2), (2, 1)),
    reverse_transformer_layers_per_block=((1, 3, 2), (1, 1, 2)),
    projection_class_embeddings_input_dim=5 * 8 + POOLED_DIM,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the keys that differ from the defaults.
SDXL_BASE = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def make_sdxl_inputs(config: dict, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Return NCHW inputs for a text_time U-Net; the number of time ids follows from the config."""
    rng = np.random.default_rng(seed)
    num_time_ids = (config["projection_class_embeddings_input_dim"] - POOLED_DIM) // config["addition_time_embed_dim"]
    size = config["sample_size"]
    return dict(
        sample=rng.standard_normal((batch, config["in_channels"], size, size)).astype(np.float32),
        timestep=np.array([10, 999])[:batch],
        encoder_hidden_states=rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32),
        text_embeds=rng.standard_normal((batch, POOLED_DIM)).astype(np.float32),
        # Pixel sizes and crop offsets, as SDXL pipelines pass them.
        time_ids=rng.integers(0, 1024, (batch, num_time_ids)).astype(np.float32),
    )


def diffusers_sdxl_forward(model: DiffusersUNet, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run diffusers with added_cond_kwargs and return its output as NHWC numpy."""
    tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in inputs.items()}
    added = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
    with torch.no_grad():
        out = model(
            tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


class JittedSDXLUNet:
    """Jitted forward of a text_time U-Net that takes the NCHW inputs of make_sdxl_inputs."""

    def __init__(self, model: UNet2DConditionModel):
        self.model = model
        graphdef, self.state = nnx.split(model)

        def forward(state, sample, timestep, context, text_embeds, time_ids):
            unet = nnx.merge(graphdef, state)
            return unet(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids)

        self._forward = jax.jit(forward)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Return the output for NCHW inputs as NHWC numpy."""
        sample = jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1))
        context, text_embeds, time_ids = inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"]
        return np.asarray(self._forward(self.state, sample, inputs["timestep"], context, text_embeds, time_ids))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_unet")
    reference = save_diffusers_unet(SDXL_STYLE, folder)
    return reference, JittedSDXLUNet(load_unet(folder)), folder


@pytest.fixture(scope="module")
def abstract_sdxl_unet():
    config = UNet2DConditionConfig(**SDXL_STYLE)
    return abstract_model(lambda rngs: UNet2DConditionModel(config, rngs=rngs))


def test_parity_sdxl_style(sdxl):
    reference, jitted, _ = sdxl
    inputs = make_sdxl_inputs(SDXL_STYLE)
    expected = diffusers_sdxl_forward(reference, inputs)
    actual = jitted(inputs)
    assert actual.shape == (2, 16, 16, 4)
    assert max_relative_error(actual, expected) <= PARITY_RTOL


def test_sdxl_time_ids_change_output(sdxl):
    # Guards against an added embedding that is built but not added to the time embedding.
    _, jitted, _ = sdxl
    inputs = make_sdxl_inputs(SDXL_STYLE)
    shifted = dict(inputs, time_ids=inputs["time_ids"] + 64.0)
    difference = max_relative_error(jitted(shifted), jitted(inputs))
    assert difference > 1e-3


def test_parity_asymmetric_five_time_ids(tmp_path):
    reference = save_diffusers_unet(ASYMMETRIC_FIVE_TIME_IDS, tmp_path, seed=2)
    model = load_unet(tmp_path)
    assert len(model.up_blocks[0].attentions[1].transformer_blocks) == 3
    assert len(model.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(model.mid_block.attentions[0].transformer_blocks) == 2  # First depth of the last down block.
    inputs = make_sdxl_inputs(ASYMMETRIC_FIVE_TIME_IDS, seed=2)
    expected = diffusers_sdxl_forward(reference, inputs)
    actual = JittedSDXLUNet(model)(inputs)
    assert max_relative_error(actual, expected) <= PARITY_RTOL


def test_sdxl_save_round_trip(sdxl, tmp_path):
    reference, jitted, _ = sdxl
    model = jitted.model
    save_unet(model, tmp_path)
    saved_config = read_config(tmp_path, "UNet2DConditionModel")
    assert UNet2DConditionConfig.from_diffusers(saved_config) == UNet2DConditionConfig(**SDXL_STYLE)

    # diffusers loads the saved folder strictly and computes what the original model computes.
    reloaded = DiffusersUNet.from_pretrained(tmp_path).eval()
    inputs = make_sdxl_inputs(SDXL_STYLE, seed=3)
    np.testing.assert_allclose(
        diffusers_sdxl_forward(reloaded, inputs), diffusers_sdxl_forward(reference, inputs), rtol=0, atol=1e-6
    )

    # And jaxgen reads back the same weights.
    reread = load_unet(tmp_path)
    for (path, original), (_, copy) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reread, nnx.Param))
    ):
        np.testing.assert_array_equal(np.asarray(copy.get_value()), np.asarray(original.get_value()), err_msg=str(path))


def test_sdxl_config_matches_diffusers_config(sdxl):
    reference, _, _ = sdxl
    assert UNet2DConditionConfig.from_diffusers(dict(reference.config)) == UNet2DConditionConfig(**SDXL_STYLE)


def test_sdxl_base_layout_matches_diffusers():
    # The full-size SDXL base U-Net (2.6e9 parameters) without weights: diffusers on torch's meta
    # device, jaxgen as an abstract state. Every checkpoint key and shape must agree.
    with torch.device("meta"):
        reference = DiffusersUNet(**SDXL_BASE)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    config = UNet2DConditionConfig.from_diffusers(dict(reference.config))
    model = abstract_model(lambda rngs: UNet2DConditionModel(config, rngs=rngs))
    actual = torch_shapes(nnx.state(model))
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert actual == expected


def _valid_sdxl_call_args():
    inputs = make_sdxl_inputs(SDXL_STYLE)
    inputs["sample"] = jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1))
    return inputs


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"text_embeds": None}, ValueError, "text_embeds is required because addition_embed_type='text_time'"),
        ({"time_ids": None}, ValueError, "time_ids is required because addition_embed_type='text_time'"),
        ({"text_embeds": np.zeros((POOLED_DIM,), np.float32)}, ValueError, r"text_embeds must be a 2-D"),
        ({"time_ids": np.zeros((3, 6), np.float32)}, ValueError, "time_ids has batch 3"),
        ({"time_ids": np.zeros((2, 6), bool)}, TypeError, "time_ids must be an int or float array"),
        (
            {"time_ids": np.zeros((2, 5), np.float32)},
            ValueError,
            r"12 \+ 5 \* 8 \(addition_time_embed_dim\) = 52 features, but projection_class_embeddings_input_dim=60",
        ),
        ({"text_embeds": np.zeros((2, 20), np.float32)}, ValueError, "= 68 features"),
    ],
)
def test_sdxl_input_validation(abstract_sdxl_unet, override, error, message):
    kwargs = dict(_valid_sdxl_call_args(), **override)
    with pytest.raises(error, match=message):
        abstract_sdxl_unet(**kwargs)


def test_sdxl_added_conditioning_is_keyword_only(abstract_sdxl_unet):
    args = _valid_sdxl_call_args()
    with pytest.raises(TypeError, match="positional"):
        abstract_sdxl_unet(
            args["sample"], args["timestep"], args["encoder_hidden_states"], None, args["text_embeds"], args["time_ids"]
        )


def test_added_conditioning_rejected_without_text_time(abstract_unet):
    kwargs = _valid_call_args()
    with pytest.raises(ValueError, match="text_embeds was passed, but the model has no added conditioning"):
        abstract_unet(**kwargs, text_embeds=np.zeros((2, POOLED_DIM), np.float32))
    with pytest.raises(ValueError, match="time_ids was passed"):
        abstract_unet(**kwargs, time_ids=np.zeros((2, 6), np.float32))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"addition_embed_type": "text"}, "Unsupported addition_embed_type 'text'"),
        ({"addition_time_embed_dim": None}, "needs addition_time_embed_dim as a positive int"),
        ({"projection_class_embeddings_input_dim": 8}, "leaves no room for the pooled text embeddings"),
        (
            {"addition_embed_type": None, "projection_class_embeddings_input_dim": None},
            "addition_time_embed_dim=8 is only used with addition_embed_type='text_time'",
        ),
        (
            {"transformer_layers_per_block": ((1, 1), 2)},
            "gives per-layer depths, so the up blocks need their own",
        ),
        (
            {"transformer_layers_per_block": ((1, 1, 1), 2), "reverse_transformer_layers_per_block": (1, 1)},
            r"transformer_layers_per_block entry 0 is \(1, 1, 1\), but block 0 has 2 layers",
        ),
        ({"reverse_transformer_layers_per_block": (1, 1, 1)}, r"one entry per up block \(2\)"),
        (
            {"reverse_transformer_layers_per_block": ((1, 1), 1)},
            r"reverse_transformer_layers_per_block entry 0 is \(1, 1\), but block 0 has 3 layers",
        ),
        ({"reverse_transformer_layers_per_block": (0, 1)}, "must be a positive int"),
    ],
)
def test_sdxl_config_rejects_invalid(override, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionConfig(**dict(SDXL_STYLE, **override))


def test_sdxl_config_accepts_nested_lists():
    # config.json stores the nested depths as lists of lists.
    as_json = dict(
        ASYMMETRIC_FIVE_TIME_IDS,
        transformer_layers_per_block=[[1, 2], [2, 1]],
        reverse_transformer_layers_per_block=[[1, 3, 2], [1, 1, 2]],
    )
    config = UNet2DConditionConfig.from_diffusers(as_json)
    assert config == UNet2DConditionConfig(**ASYMMETRIC_FIVE_TIME_IDS)
    assert config.to_diffusers()["reverse_transformer_layers_per_block"] == [[1, 3, 2], [1, 1, 2]]


# ----- shared layers ---------------------------------------------------------------------------


def _naive_attention(q, k, v, mask=None):
    logits = np.einsum("blnd,bsnd->bnls", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnd->blnd", weights, v)


def test_attention_matches_softmax_formula():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    k = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)
    v = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)
    mask = rng.random((5, 6)) > 0.3
    mask[:, 0] = True  # Every query keeps at least one key.
    np.testing.assert_allclose(dot_product_attention(q, k, v), _naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, mask), _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "shapes, mask, error, message",
    [
        (((2, 5, 12), (2, 6, 12), (2, 6, 12)), None, ValueError, "rank 4"),
        (((2, 5, 3, 4), (2, 6, 3, 8), (2, 6, 3, 8)), None, ValueError, "equal B, N and D"),
        (((2, 5, 3, 4), (2, 6, 3, 4), (2, 6, 3, 4)), np.ones((5, 6), np.float32), TypeError, "boolean mask"),
    ],
)
def test_attention_rejects_bad_inputs(shapes, mask, error, message):
    q, k, v = (np.zeros(shape, np.float32) for shape in shapes)
    with pytest.raises(error, match=message):
        dot_product_attention(q, k, v, mask)


def test_flattened_layers_match_direct_call():
    # Zero initialisers skip the slow per-shape compile of random ones; numpy fills the weights.
    zeros = nnx.initializers.zeros_init()
    rngs = nnx.Rngs(0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
    linear = nnx.Linear(8, 5, kernel_init=zeros, rngs=rngs)
    conv = nnx.Conv(8, 5, kernel_size=(1, 1), kernel_init=zeros, rngs=rngs)
    for layer in (linear, conv):
        layer.kernel[...] = rng.standard_normal(layer.kernel.shape).astype(np.float32)
        layer.bias[...] = rng.standard_normal(layer.bias.shape).astype(np.float32)
    np.testing.assert_allclose(dense(linear, x), linear(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pointwise_conv(conv, x), conv(x), rtol=1e-5, atol=1e-5)

    wide = nnx.eval_shape(lambda: nnx.Conv(8, 5, kernel_size=(3, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="1x1 convolution with stride 1"):
        pointwise_conv(wide, x)
