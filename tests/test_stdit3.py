"""STDiT3 (Open-Sora 1.2): jaxgen model against its torch twin, weight conversion, key names and sizes.

Key names and the v1.2 parameter count were checked against Open-Sora's own STDiT3 class
(hpcaitech/Open-Sora tag v1.2.0, opensora/models/stdit/stdit3.py) built with these configs, with
stand-ins for its xformers, timm and colossalai imports.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_npu_backend.stdit3 as torch_stdit3
from conversion.diffusers_io import abstract_model
from conversion.rules import torch_shapes
from jaxgen.models.stdit3 import STDiT3, STDiT3Config, parameter_count, position_embedding_2d
from torch_npu_backend.models import find_twin, jaxgen_model_from_state_dict, jaxgen_twin, torch_state_dict, torch_twin

# fp32 parity: largest |jaxgen - torch| over the largest |torch output|. Measured 4e-6 to 8e-6 on the
# tiny models below (2-core x86, jax 0.10.2, torch 2.13.0). Most of it comes from the sinusoidal timestep
# features at t = 700, where one float32 ulp of difference in the frequencies moves the angle by about 3e-5.
PARITY_TOLERANCE = 2e-5

# Keys of Open-Sora 1.2's STDiT3 state_dict (qk_norm=True), read from the module built by Open-Sora's code.
OPENSORA_KEYS = (
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.2.bias",
    "fps_embedder.mlp.0.weight",
    "fps_embedder.mlp.2.weight",
    "t_block.1.weight",
    "t_block.1.bias",
    "y_embedder.y_embedding",
    "y_embedder.y_proj.fc1.weight",
    "y_embedder.y_proj.fc2.bias",
    "spatial_blocks.0.attn.qkv.weight",
    "spatial_blocks.0.attn.qkv.bias",
    "spatial_blocks.0.attn.q_norm.weight",
    "spatial_blocks.0.attn.k_norm.weight",
    "spatial_blocks.0.attn.proj.weight",
    "spatial_blocks.0.cross_attn.q_linear.weight",
    "spatial_blocks.0.cross_attn.kv_linear.bias",
    "spatial_blocks.0.cross_attn.proj.weight",
    "spatial_blocks.0.mlp.fc1.weight",
    "spatial_blocks.0.mlp.fc2.bias",
    "spatial_blocks.0.scale_shift_table",
    "temporal_blocks.1.attn.qkv.weight",
    "temporal_blocks.1.scale_shift_table",
    "final_layer.linear.weight",
    "final_layer.scale_shift_table",
    "rope.freqs",
)
# Keys outside the blocks: x_embedder 2, t_embedder 4, fps_embedder 4, t_block 2, y_embedder 5, final_layer 3,
# rope 1. Each block has 17 keys, 15 without the q/k norms.
NON_BLOCK_KEYS = 21

TINY = STDiT3Config.from_preset("tiny")


def noisy_torch_model(config: STDiT3Config, seed: int = 0, noise: float = 0.3) -> torch_stdit3.STDiT3:
    """Build the twin and add noise to every weight, so the layers Open-Sora initialises to zero are not zero."""
    torch.manual_seed(seed)
    model = torch_stdit3.STDiT3(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(noise * torch.randn_like(tensor))
    return model


def make_inputs(config: STDiT3Config, seed: int = 0, *, frames: int = 3, height: int = 4, width: int = 6):
    """Return channels-first numpy inputs: x [B, C, T, H, W], timestep, y, a padded text mask and the sizes."""
    rng = np.random.default_rng(seed)
    length = config.model_max_length
    mask = np.ones((2, length), np.int64)
    mask[0, 5:] = 0  # sample 0 has 3 padded tokens at the end
    mask[1, 2] = 0  # sample 1 has one dropped token in the middle
    return {
        "x": rng.standard_normal((2, config.in_channels, frames, height, width)).astype(np.float32),
        "timestep": np.array([3.0, 700.0], np.float32),
        "y": rng.standard_normal((2, 1, length, config.caption_channels)).astype(np.float32),
        "mask": mask,
        "fps": np.array([24.0, 24.0], np.float32),
        "height": np.array([96.0, 96.0], np.float32),
        "width": np.array([160.0, 160.0], np.float32),
    }


def run_torch(model, inputs, **overrides) -> np.ndarray:
    args = {key: None if value is None else torch.as_tensor(value) for key, value in {**inputs, **overrides}.items()}
    with torch.no_grad():
        return model(**args).numpy()


TRACES = []


@nnx.jit
def jaxgen_forward(model, x, timestep, y, mask, options):
    TRACES.append(x.shape)
    return model(x, timestep, y, mask, **options)


def run_jaxgen(model, inputs, **overrides) -> np.ndarray:
    """Run the jitted jaxgen model on channels-first inputs and return a channels-first output.

    Jitted, because one compile of the tiny model took about 3 s and the first eager call 15 s (2-core x86).
    """
    args = {**inputs, **overrides}
    x = jnp.asarray(args.pop("x").transpose(0, 2, 3, 4, 1))
    out = jaxgen_forward(model, x, args.pop("timestep"), args.pop("y"), args.pop("mask"), args)
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def abstract_stdit3(config: STDiT3Config) -> STDiT3:
    return abstract_model(lambda rngs: STDiT3(config, rngs=rngs))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def twins():
    torch_model = noisy_torch_model(TINY)
    return torch_model, jaxgen_twin(torch_model)


# ----- names, registration and conversion ----------------------------------------------------------------


def test_keys_match_opensora():
    jaxgen_keys = set(torch_shapes(nnx.state(abstract_stdit3(TINY))))
    torch_keys = set(torch_stdit3.STDiT3(TINY).state_dict())

    assert jaxgen_keys == torch_keys
    assert set(OPENSORA_KEYS) <= jaxgen_keys
    assert len(jaxgen_keys) == NON_BLOCK_KEYS + 17 * 2 * TINY.depth
    assert not any("pos_embed" in key for key in jaxgen_keys)


def test_keys_without_qk_norm():
    config = dataclasses.replace(TINY, qk_norm=False)
    keys = set(torch_shapes(nnx.state(abstract_stdit3(config))))

    assert keys == set(torch_stdit3.STDiT3(config).state_dict())
    assert len(keys) == NON_BLOCK_KEYS + 15 * 2 * config.depth
    assert "spatial_blocks.0.attn.q_norm.weight" not in keys


def test_twin_is_registered(twins):
    _, jaxgen_model = twins

    assert find_twin(jaxgen_model).torch_class is torch_stdit3.STDiT3
    assert isinstance(torch_twin(jaxgen_model), torch_stdit3.STDiT3)


def test_conversion_torch_to_jaxgen_to_torch_exact(twins):
    torch_model, jaxgen_model = twins
    expected = torch_model.state_dict()
    round_trip = torch_state_dict(jaxgen_model)

    assert set(round_trip) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(round_trip[key], tensor), key


def test_conversion_jaxgen_to_torch_to_jaxgen_exact(twins):
    _, model = twins
    round_trip = jaxgen_model_from_state_dict(STDiT3, TINY, torch_twin(model).state_dict())

    expected = dict(nnx.to_flat_state(nnx.state(model)))
    actual = dict(nnx.to_flat_state(nnx.state(round_trip)))
    assert set(actual) == set(expected)
    for path, variable in expected.items():
        assert type(actual[path]) is type(variable), path
        np.testing.assert_array_equal(np.asarray(actual[path].get_value()), np.asarray(variable.get_value()))


def test_rope_freqs_not_trainable():
    model = abstract_stdit3(TINY)
    trainable = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    assert "rope.freqs" not in trainable
    assert "y_embedder.y_embedding" not in trainable
    assert not torch_stdit3.STDiT3(TINY).rope.freqs.requires_grad


# ----- forward parity ------------------------------------------------------------------------------------


def test_parity_fp32(twins):
    torch_model, jaxgen_model = twins
    inputs = make_inputs(TINY)

    expected = run_torch(torch_model, inputs)
    actual = run_jaxgen(jaxgen_model, inputs)

    assert expected.shape == (2, TINY.out_channels, 3, 4, 6)
    assert relative_error(actual, expected) < PARITY_TOLERANCE


def test_parity_with_frame_mask(twins):
    torch_model, jaxgen_model = twins
    inputs = make_inputs(TINY, seed=1)
    x_mask = np.array([[False, True, True], [True, True, True]])

    expected = run_torch(torch_model, inputs, x_mask=x_mask)
    actual = run_jaxgen(jaxgen_model, inputs, x_mask=x_mask)
    without_mask = run_torch(torch_model, inputs)

    assert relative_error(actual, expected) < PARITY_TOLERANCE
    # Frame 0 of sample 0 is modulated with timestep 0, so the mask must change the output there.
    assert np.abs(expected[0] - without_mask[0]).max() > 1e-3


def test_parity_null_caption(twins):
    torch_model, jaxgen_model = twins
    inputs = make_inputs(TINY, seed=2)
    drop = np.array([1, 0])

    expected = run_torch(torch_model, inputs, force_drop_ids=drop)
    actual = run_jaxgen(jaxgen_model, inputs, force_drop_ids=drop)
    null_y = inputs["y"].copy()
    null_y[0] = np.asarray(jaxgen_model.null_caption(1))[0]
    by_hand = run_jaxgen(jaxgen_model, inputs, y=null_y)

    assert relative_error(actual, expected) < PARITY_TOLERANCE
    np.testing.assert_allclose(actual, by_hand, rtol=0, atol=1e-6)


def test_parity_without_qk_norm():
    config = dataclasses.replace(TINY, qk_norm=False, pred_sigma=False, patch_size=(1, 2, 1))
    # Without the q/k norms the attention logits grow with the weight noise, and so does the float32 error.
    torch_model = noisy_torch_model(config, seed=5, noise=0.1)
    inputs = make_inputs(config, seed=5, frames=2, height=4, width=3)

    expected = run_torch(torch_model, inputs)
    actual = run_jaxgen(jaxgen_twin(torch_model), inputs)

    assert expected.shape == (2, config.in_channels, 2, 4, 3)
    assert relative_error(actual, expected) < PARITY_TOLERANCE


def test_padded_tokens_are_ignored(twins):
    torch_model, jaxgen_model = twins
    inputs = make_inputs(TINY, seed=3)
    changed_padding = inputs["y"].copy()
    changed_padding[0, 0, 6] += 10.0  # padded in sample 0
    changed_padding[1, 0, 2] -= 10.0  # dropped in sample 1
    changed_kept = inputs["y"].copy()
    changed_kept[0, 0, 1] += 10.0

    for run, model in ((run_jaxgen, jaxgen_model), (run_torch, torch_model)):
        reference = run(model, inputs)
        np.testing.assert_array_equal(run(model, inputs, y=changed_padding), reference)
        assert np.abs(run(model, inputs, y=changed_kept)[0] - reference[0]).max() > 1e-3


def test_full_mask_equals_no_mask(twins):
    _, jaxgen_model = twins
    inputs = make_inputs(TINY, seed=4)

    full = run_jaxgen(jaxgen_model, inputs, mask=np.ones_like(inputs["mask"]))
    unmasked = run_jaxgen(jaxgen_model, inputs, mask=None)

    # Two compiled programs, so only float rounding may differ.
    assert relative_error(full, unmasked) < 1e-6


def test_new_sizes_do_not_retrace(twins):
    _, jaxgen_model = twins
    inputs = make_inputs(TINY, seed=6)
    run_jaxgen(jaxgen_model, inputs)
    traces = len(TRACES)

    # The pixel size, timestep and fps are traced values, so the position-embedding scale is not baked in.
    first = run_jaxgen(jaxgen_model, inputs)
    second = run_jaxgen(jaxgen_model, inputs, height=np.array([144.0, 144.0], np.float32),
                        timestep=np.array([10.0, 20.0], np.float32), fps=np.array([12.0, 12.0], np.float32))

    assert len(TRACES) == traces
    assert np.abs(first - second).max() > 1e-3


# ----- position embedding, sizes and errors --------------------------------------------------------------


def test_position_embedding_layout():
    hidden, rows, cols, scale, base_size = 8, 2, 3, 0.5, 2
    table = np.asarray(position_embedding_2d(hidden, rows, cols, scale=scale, base_size=base_size))
    freqs = 10000.0 ** (-np.arange(0, hidden // 2, 2) / (hidden // 2))  # 10000^(-4i/C)

    assert table.shape == (rows * cols, hidden)
    for r in range(rows):
        for c in range(cols):
            col_pos = c / scale * base_size / cols
            row_pos = r / scale * base_size / rows
            expected = np.concatenate([
                np.sin(col_pos * freqs), np.cos(col_pos * freqs), np.sin(row_pos * freqs), np.cos(row_pos * freqs)
            ])
            np.testing.assert_allclose(table[r * cols + c], expected, rtol=0, atol=1e-6)


def test_v12_parameter_count():
    config = STDiT3Config.from_preset("v1.2")
    c, m, e, heads_dim = config.hidden_size, config.mlp_hidden_size, config.caption_channels, config.head_dim
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (linear(c, 3 * c) + 2 * heads_dim + linear(c, c)  # attn
             + linear(c, c) + linear(c, 2 * c) + linear(c, c)  # cross_attn
             + linear(c, m) + linear(m, c) + 6 * c)  # mlp, scale_shift_table  # fmt: skip
    outside = (config.in_channels * 4 * c + c  # x_embedder, kernel 1x2x2
               + 2 * (linear(256, c) + linear(c, c))  # t_embedder, fps_embedder
               + linear(c, 6 * c) + linear(e, c) + linear(c, c)  # t_block, y_embedder.y_proj
               + linear(c, 4 * config.out_channels) + 2 * c)  # final_layer  # fmt: skip
    expected = outside + 2 * config.depth * block

    counts = parameter_count(config)
    with torch.device("meta"):
        torch_model = torch_stdit3.STDiT3(config)
    torch_parameters = sum(parameter.numel() for parameter in torch_model.parameters())

    assert counts["parameters"] == expected
    # Open-Sora 1.2's README and docs/report_03.md call it a 1.1B model. The module shapes give 1.21B.
    assert 1.1e9 < counts["parameters"] < 1.25e9
    assert counts["buffers"] == config.model_max_length * e + heads_dim // 2  # y_embedding, rope.freqs
    # Open-Sora's model.parameters() also lists the frozen rope.freqs.
    assert torch_parameters == expected + heads_dim // 2
    assert config.out_channels == 8


@pytest.mark.parametrize("axis, shape", [("H", (3, 5, 6)), ("W", (3, 4, 7))])
def test_rejects_size_not_multiple_of_patch(twins, axis, shape):
    torch_model, jaxgen_model = twins
    frames, height, width = shape
    inputs = make_inputs(TINY, frames=frames, height=height, width=width)
    size = dict(zip("THW", shape))[axis]

    with pytest.raises(ValueError, match=f"latent {axis}={size} is not a multiple of patch size 2"):
        run_jaxgen(jaxgen_model, inputs)
    with pytest.raises(ValueError, match=f"latent {axis}={size} is not a multiple of patch size 2"):
        run_torch(torch_model, inputs)


def test_rejects_frames_not_multiple_of_patch():
    config = dataclasses.replace(TINY, patch_size=(2, 2, 2))
    inputs = make_inputs(config, frames=3)

    with pytest.raises(ValueError, match="latent T=3 is not a multiple of patch size 2"):
        run_jaxgen(abstract_stdit3(config), inputs)
    with pytest.raises(ValueError, match="latent T=3 is not a multiple of patch size 2"):
        run_torch(torch_stdit3.STDiT3(config), inputs)


# ----- config ---------------------------------------------------------------------------------------------


def test_config_from_opensora():
    opensora = {"model_type": "STDiT3", "architectures": ["STDiT3"], "hidden_size": 1152, "depth": 28,
                "num_heads": 16, "patch_size": [1, 2, 2], "qk_norm": True, "enable_flash_attn": True,
                "enable_layernorm_kernel": True, "enable_sequence_parallelism": False, "drop_path": 0.0,
                "freeze_y_embedder": True}  # fmt: skip
    config = STDiT3Config.from_opensora(opensora)

    assert config == dataclasses.replace(STDiT3Config.from_preset("v1.2"), freeze_y_embedder=True)
    assert STDiT3Config.from_opensora(config.to_opensora()) == config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("enable_sequence_parallelism", True, "enable_sequence_parallelism=True is not supported"),
        ("drop_path", 0.1, "drop_path=0.1 is not supported"),
        ("hiden_size", 64, "nearest supported key is 'hidden_size'"),
    ],
)
def test_config_rejects_unsupported_keys(key, value, message):
    with pytest.raises(ValueError, match=message):
        STDiT3Config.from_opensora({key: value})


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        STDiT3Config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="head dim .* = 9 must be even"):
        STDiT3Config(hidden_size=36, num_heads=4)
    with pytest.raises(ValueError, match="Unknown STDiT3 preset 'xl'"):
        STDiT3Config.from_preset("xl")
