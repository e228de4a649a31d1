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

from conversion.diffusers_io import load_unet
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
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        UNet2DConditionConfig.from_diffusers({"addition_embed_type": "text_time"})
    # The same key at its default is accepted, and private keys are ignored.
    config = UNet2DConditionConfig.from_diffusers({"addition_embed_type": None, "_name_or_path": "x"})
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
