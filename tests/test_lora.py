"""jaxgen.lora and conversion.lora_io: adapters, merging, training filters, and LoRA files vs diffusers."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils.peft_utils import get_peft_kwargs
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from flax import nnx
from safetensors.numpy import save_file

from conversion.diffusers_io import abstract_model, load_unet, read_state_dict
from conversion.lora_io import (
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    LoRAFileError,
    kohya_names,
    ldm_unet_paths,
    load_lora_weights,
    lora_state_dict,
    read_lora_adapters,
    save_lora_weights,
)
from conversion.rules import nnx_to_torch, torch_to_nnx
from conversion.transformers_io import load_clip_text
from jaxgen.lora import (
    CLIP_TARGET_MODULES,
    LoRALinear,
    LoRAWeight,
    apply_lora,
    lora_modules,
    lora_state,
    merge_lora,
)
from jaxgen.models import UNet2DConditionConfig, UNet2DConditionModel

# One block level keeps the first (op-by-op compiled) forward pass short. proj_in/proj_out are
# 1x1 convolutions here (use_linear_projection=False), as in SD 1.x.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=8,
    attention_head_dim=4,
)
# fp32 outputs of jaxgen and diffusers (or transformers) differed by at most 2.1e-6, with outputs
# up to about 3 (2-core x86 CPU, jax 0.10.2, torch 2.13.0).
UNET_ATOL = 2e-5
UNET_RTOL = 1e-5


# ----- tiny NNX modules ----------------------------------------------------------------------


class TinyAttention(nnx.Module):
    """Attention projections named like diffusers' Attention, with to_out in an nnx.List."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.to_q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(dim, dim, rngs=rngs)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1)
        return self.to_out[0](self.norm(weights @ v))


def _randomize_adapters(model: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Give every adapter non-zero random A and B."""
    rng = np.random.default_rng(seed)
    for layer in lora_modules(model).values():
        for variable in (layer.lora_A, layer.lora_B):
            shape = variable.get_value().shape
            variable.set_value(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32))


# ----- LoRALinear and module surgery ---------------------------------------------------------


def test_lora_linear_starts_equal_to_base():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    expected = model(x)

    paths = apply_lora(model, rank=4, alpha=4, rngs=nnx.Rngs(2))

    assert paths == ["to_k", "to_out.0", "to_q", "to_v"]
    assert isinstance(model.to_out[0], LoRALinear)
    np.testing.assert_allclose(model(x), expected, atol=1e-6, rtol=1e-6)
    for layer in lora_modules(model).values():
        np.testing.assert_array_equal(layer.lora_B.get_value(), 0.0)
        lora_A = np.asarray(layer.lora_A.get_value())
        assert np.abs(lora_A).max() <= 1 / np.sqrt(8), "lora_A outside peft's +-1/sqrt(in) range"
        assert np.abs(lora_A).max() > 0.5 / np.sqrt(8), "lora_A not spread over peft's +-1/sqrt(in) range"


def test_lora_linear_keeps_base_state_paths():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    base = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    apply_lora(model, rank=2, alpha=2, rngs=nnx.Rngs(1))

    adapted = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert sorted(adapted) == sorted(base)
    for path, variable in base.items():
        np.testing.assert_array_equal(adapted[path].get_value(), variable.get_value(), err_msg=str(path))
    adapter_paths = sorted(path for path, _ in nnx.to_flat_state(lora_state(model)))
    assert adapter_paths == sorted(
        (*layer, leaf) for layer in [("to_k",), ("to_out", 0), ("to_q",), ("to_v",)] for leaf in ("lora_A", "lora_B")
    )


@pytest.mark.parametrize("rank, alpha", [(2, 2.0), (2, 8.0), (4, 1.0)])
def test_lora_linear_scales_by_alpha_over_rank(rank, alpha):
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    expected_base = np.asarray(base(x))
    rng = np.random.default_rng(0)
    lora_A = rng.standard_normal((6, rank)).astype(np.float32)
    lora_B = rng.standard_normal((rank, 5)).astype(np.float32)

    layer = LoRALinear.from_arrays(base, lora_A, lora_B, alpha=alpha)

    expected = expected_base + (alpha / rank) * (np.asarray(x) @ lora_A @ lora_B)
    np.testing.assert_allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_apply_lora_rejects_bad_targets():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"No module of TinyAttention matches target_modules=\['q_proj'\]"):
        apply_lora(model, rank=2, alpha=2, target_modules=("q_proj",), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"nnx.Linear layers only.*norm \(LayerNorm\)"):
        apply_lora(model, rank=2, alpha=2, target_modules=("to_q", "norm"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        apply_lora(model, rank=0, alpha=2, rngs=nnx.Rngs(1))

    apply_lora(model, rank=2, alpha=2, target_modules=("to_q",), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already have LoRA adapters: to_q"):
        apply_lora(model, rank=2, alpha=2, target_modules=("to_q",), rngs=nnx.Rngs(1))


def test_merge_lora_restores_linear_with_same_output():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    apply_lora(model, rank=3, alpha=6, rngs=nnx.Rngs(1))
    _randomize_adapters(model, seed=2)
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    unmerged = np.asarray(model(x))

    merged = merge_lora(model)

    assert merged == ["to_k", "to_out.0", "to_q", "to_v"]
    assert type(model.to_out[0]) is nnx.Linear
    assert not lora_modules(model)
    assert not jax.tree.leaves(lora_state(model))
    np.testing.assert_allclose(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_train_step_updates_only_adapters():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=4, rngs=nnx.Rngs(1))
    _randomize_adapters(model, seed=2)
    base_before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    lora_before = jax.tree.map(np.array, lora_state(model))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=LoRAWeight)
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            return jnp.mean(model(x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAWeight))(model)
        optimizer.update(model, grads)
        return loss, grads

    _, grads = train_step(model, optimizer)

    grad_types = {type(variable) for _, variable in nnx.to_flat_state(grads)}
    assert grad_types == {LoRAWeight}
    for (path, before), (_, after) in zip(
        nnx.to_flat_state(base_before), nnx.to_flat_state(nnx.state(model, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(after.get_value(), before.get_value(), err_msg=str(path))
    for (path, before), (_, after) in zip(
        nnx.to_flat_state(lora_before), nnx.to_flat_state(lora_state(model)), strict=True
    ):
        assert np.abs(np.asarray(after.get_value()) - before.get_value()).max() > 1e-6, f"{path} did not change"


# ----- U-Net: base conversion, diffusers parity, files ----------------------------------------


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    reference = DiffusersUNet(**TINY_UNET).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)  # [B, H, W, C]
    context = rng.standard_normal((2, 5, 8)).astype(np.float32)  # [B, S, E]
    return sample, np.array([3, 700]), context


def _jax_output(model: UNet2DConditionModel, inputs) -> np.ndarray:
    sample, timesteps, context = inputs
    return np.asarray(model(jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)))


def _torch_output(model: DiffusersUNet, inputs) -> np.ndarray:
    sample, timesteps, context = inputs
    with torch.no_grad():
        sample_nchw = torch.from_numpy(sample).permute(0, 3, 1, 2)
        out = model(sample_nchw, torch.from_numpy(timesteps), torch.from_numpy(context))
    return out.sample.permute(0, 2, 3, 1).numpy()


def _fold_into_torch(model: torch.nn.Module, updates: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    """Add scale * up @ down to the weight of each module path, as peft's merge does."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (down, up, scale) in updates.items():
            # transformers 5 names CLIPTextModel's modules without the text_model. level.
            weight = (modules.get(path) or modules[path.removeprefix("text_model.")]).weight
            delta = scale * (up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1))
            weight.add_(torch.from_numpy(delta.astype(np.float32)).reshape(weight.shape))


def _peft_scale(fields: dict, path: str) -> tuple[int, float]:
    """Return (rank, scale) of a layer from LoraConfig fields, following peft's get_pattern_key."""

    def lookup(patterns, default):
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        return default

    rank = lookup(fields["rank_pattern"], fields["r"])
    return rank, lookup(fields["alpha_pattern"], fields["lora_alpha"]) / rank


def _mixed_lora_unet(folder) -> UNet2DConditionModel:
    """Load the U-Net and add rank-2 adapters (alpha 3) on to_q/to_k, rank-3 (alpha 1.5) on to_v/to_out.0."""
    model = load_unet(folder)
    apply_lora(model, rank=2, alpha=3.0, target_modules=("to_q", "to_k"), rngs=nnx.Rngs(0))
    apply_lora(model, rank=3, alpha=1.5, target_modules=("to_v", "to_out.0"), rngs=nnx.Rngs(1))
    _randomize_adapters(model, seed=5)
    return model


def test_base_conversion_ignores_adapters(unet_folder):
    model = load_unet(unet_folder)
    base_keys = sorted(nnx_to_torch(nnx.state(model)))
    apply_lora(model, rank=2, alpha=2, rngs=nnx.Rngs(0))
    _randomize_adapters(model, seed=1)
    adapters = jax.tree.map(np.array, lora_state(model))

    assert sorted(nnx_to_torch(nnx.state(model))) == base_keys
    reloaded = torch_to_nnx(read_state_dict(unet_folder), nnx.state(model))
    nnx.update(model, reloaded)
    for (path, before), (_, after) in zip(
        nnx.to_flat_state(adapters), nnx.to_flat_state(lora_state(model)), strict=True
    ):
        np.testing.assert_array_equal(after.get_value(), before.get_value(), err_msg=str(path))


def test_peft_file_matches_diffusers(unet_folder, unet_inputs, tmp_path):
    model = _mixed_lora_unet(unet_folder)
    file = save_lora_weights(tmp_path, {"unet": model})
    assert file.name == LORA_WEIGHT_NAME

    # diffusers' own reader returns the tensors and the header metadata.
    state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(tmp_path), weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True
    )
    assert network_alphas is None
    fields = {key.removeprefix("unet."): value for key, value in metadata.items()}
    # 16 layers each way: ties go to the smaller value, and the other 16 layers get patterns.
    assert (fields["r"], fields["lora_alpha"]) == (2, 1.5)
    assert len(fields["rank_pattern"]) == 16
    assert len(fields["alpha_pattern"]) == 16

    reference = DiffusersUNet.from_pretrained(unet_folder).eval()
    expected_base = _torch_output(reference, unet_inputs)
    updates = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        up = state_dict[key.replace(".lora_A.", ".lora_B.")]
        rank, scale = _peft_scale(fields, path)
        assert down.shape[0] == rank, path
        expected_scale = 1.5 if path.endswith(("to_q", "to_k")) else 0.5
        assert scale == pytest.approx(expected_scale), path
        updates[path] = (down.numpy(), up.numpy(), scale)
    assert sorted(updates) == sorted(lora_modules(model))
    _fold_into_torch(reference, updates)
    expected = _torch_output(reference, unet_inputs)

    assert np.abs(expected - expected_base).max() > 1e-2, "the LoRA barely changes the output"
    np.testing.assert_allclose(_jax_output(model, unet_inputs), expected, atol=UNET_ATOL, rtol=UNET_RTOL)

    merge_lora(model)
    np.testing.assert_allclose(_jax_output(model, unet_inputs), expected, atol=UNET_ATOL, rtol=UNET_RTOL)


def test_peft_file_round_trip(unet_folder, tmp_path):
    model = _mixed_lora_unet(unet_folder)
    save_lora_weights(tmp_path / "adapter.safetensors", {"unet": model})

    fresh = load_unet(unet_folder)
    result = load_lora_weights(tmp_path / "adapter.safetensors", {"unet": fresh})

    assert result.adapted["unet"] == sorted(lora_modules(model))
    assert result.unmatched_keys == []
    for path, layer in lora_modules(model).items():
        loaded = lora_modules(fresh)[path]
        assert (loaded.rank, loaded.alpha) == (layer.rank, layer.alpha), path
        np.testing.assert_array_equal(loaded.lora_A.get_value(), layer.lora_A.get_value(), err_msg=path)
        np.testing.assert_array_equal(loaded.lora_B.get_value(), layer.lora_B.get_value(), err_msg=path)


def test_peft_without_metadata_scales_by_one(unet_folder):
    model = _mixed_lora_unet(unet_folder)
    state_dict, _ = lora_state_dict({"unet": model})

    adapters, _ = read_lora_adapters(state_dict, {"unet": load_unet(unet_folder)})

    # diffusers builds the LoraConfig from the shapes alone: alpha = r for every layer.
    ranks = {
        f"^{key.removeprefix('unet.').removesuffix('.lora_B.weight')}": value.shape[1]
        for key, value in state_dict.items()
        if key.endswith(".lora_B.weight")
    }
    peft_kwargs = get_peft_kwargs(ranks, None, state_dict)
    for path, adapter in adapters["unet"].items():
        _, diffusers_scale = _peft_scale(peft_kwargs, path)
        assert adapter.alpha / adapter.rank == diffusers_scale == 1.0, path


def test_lora_state_dict_layout(unet_folder):
    model = _mixed_lora_unet(unet_folder)
    state_dict, metadata = lora_state_dict({"unet": model})
    reference = dict(DiffusersUNet.from_pretrained(unet_folder).named_modules())

    layer = lora_modules(model)["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert state_dict[f"{key}.lora_A.weight"].shape == (2, 8)  # [r, in]: to_k reads the 8-wide context
    assert state_dict[f"{key}.lora_B.weight"].shape == (2 * 8, 2)  # [out, r]
    np.testing.assert_array_equal(state_dict[f"{key}.lora_A.weight"], np.asarray(layer.lora_A.get_value()).T)
    for key in state_dict:
        path = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        assert isinstance(reference.get(path), torch.nn.Linear), key
    assert sorted(metadata["unet.target_modules"]) == sorted(lora_modules(model))
    json.dumps(metadata)  # The header must be JSON-serialisable.


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def test_kohya_file_matches_diffusers_conversion(unet_folder, unet_inputs, tmp_path):
    rng = np.random.default_rng(7)
    rank = 4
    layers = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16, 1.0),
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0": (16, 16, 8.0),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (16, 128, 2.0),
        "down_blocks.0.attentions.0.proj_in": (16, 16, 3.0),  # a 1x1 conv: [r, in, 1, 1]
    }
    kohya = {}
    for path, (fan_in, fan_out, alpha) in layers.items():
        conv = path.endswith("proj_in")
        down = rng.standard_normal((rank, fan_in, 1, 1) if conv else (rank, fan_in)).astype(np.float32) * 0.3
        up = rng.standard_normal((fan_out, rank, 1, 1) if conv else (fan_out, rank)).astype(np.float32) * 0.3
        kohya[f"{_kohya_name(path)}.lora_down.weight"] = down
        kohya[f"{_kohya_name(path)}.lora_up.weight"] = up
        kohya[f"{_kohya_name(path)}.alpha"] = np.array(alpha, np.float32)
    file = tmp_path / "kohya.safetensors"
    save_file(kohya, file)

    # diffusers' own kohya conversion must name the same layers and alphas.
    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(
        {key: torch.from_numpy(value) for key, value in kohya.items()}
    )
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert sorted({key.split(".lora_")[0] for key in peft_keys}) == sorted(layers)
    assert sorted(network_alphas.values()) == sorted(alpha for _, _, alpha in layers.values())

    model = load_unet(unet_folder)
    with pytest.raises(ValueError, match=r"can only be folded.*down_blocks.0.attentions.0.proj_in.*merge=True"):
        load_lora_weights(file, {"unet": model})
    assert not lora_modules(model)

    adapters, _ = read_lora_adapters(file, {"unet": model})
    assert {path: adapter.alpha for path, adapter in adapters["unet"].items()} == {
        path: alpha for path, (_, _, alpha) in layers.items()
    }
    result = load_lora_weights(file, {"unet": model}, merge=True)
    assert result.adapted["unet"] == sorted(layers)
    assert not lora_modules(model)

    reference = DiffusersUNet.from_pretrained(unet_folder).eval()
    _fold_into_torch(
        reference,
        {
            path: (kohya[f"{_kohya_name(path)}.lora_down.weight"], kohya[f"{_kohya_name(path)}.lora_up.weight"],
                   alpha / rank)
            for path, (_, _, alpha) in layers.items()
        },
    )
    np.testing.assert_allclose(_jax_output(model, unet_inputs), _torch_output(reference, unet_inputs),
                               atol=UNET_ATOL, rtol=UNET_RTOL)


def test_kohya_alpha_defaults_to_rank(unet_folder):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    kohya = {
        f"{_kohya_name(path)}.lora_down.weight": np.ones((2, 16), np.float32),
        f"{_kohya_name(path)}.lora_up.weight": np.ones((16, 2), np.float32),
    }
    adapters, _ = read_lora_adapters(kohya, {"unet": load_unet(unet_folder)})
    assert adapters["unet"][path].alpha == 2.0


def _block_layout_unet(**overrides) -> UNet2DConditionModel:
    """An abstract U-Net (shapes only) with tiny channels and a given block layout."""
    config = dict(
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
        sample_size=8,
    )
    config.update(overrides)
    unet_config = UNet2DConditionConfig.from_diffusers(config)
    return abstract_model(lambda rngs: UNet2DConditionModel(unet_config, rngs=rngs))


def test_ldm_names_of_sd15_layout():
    # SD 1.5's block types with layers_per_block=2. The names are those of its original checkpoint.
    names = ldm_unet_paths(_block_layout_unet())
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.0": "input_blocks.1.0",
        "down_blocks.0.attentions.0": "input_blocks.1.1",
        "down_blocks.0.attentions.1": "input_blocks.2.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.3.resnets.1": "input_blocks.11.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "up_blocks.0.resnets.2": "output_blocks.2.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
        "conv_out": "out.2",
    }
    for path, ldm in expected.items():
        assert names.get(path) == ldm, path
    assert "down_blocks.3.downsamplers.0.conv" not in names


def test_kohya_ldm_names_match_diffusers_sgm_mapping():
    # SDXL's block layout: no attention in the first down block and the last up block.
    model = _block_layout_unet(
        block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
    )
    ldm_layers = [
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.8.1.transformer_blocks.1.attn2.to_out.0",
        "middle_block.1.transformer_blocks.1.ff.net.2",
        "output_blocks.0.1.proj_in",
        "output_blocks.5.1.transformer_blocks.0.attn1.to_k",
    ]
    kohya = {}
    for name in ldm_layers:
        layer = "lora_unet_" + name.replace(".", "_")
        kohya[f"{layer}.lora_down.weight"] = torch.zeros(2, 4)
        kohya[f"{layer}.lora_up.weight"] = torch.zeros(4, 2)

    class Config:
        layers_per_block = 2

    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(kohya, Config))
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    expected = sorted({key.split(".lora_")[0] for key in peft_keys})

    names = kohya_names(model)
    assert sorted(names.get(name.replace(".", "_")) for name in ldm_layers) == expected
    # Resnet sublayers, which diffusers' SDXL mapping does not rename, have LDM names too.
    assert names["input_blocks_1_0_emb_layers_1"] == "down_blocks.0.resnets.0.time_emb_proj"
    assert names["output_blocks_8_0_skip_connection"] == "up_blocks.2.resnets.2.conv_shortcut"


# ----- CLIP text encoder ---------------------------------------------------------------------

CLIP_CONFIG = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=49,
)
CLIP_INPUT_IDS = np.array([[0, 7, 12, 49, 49], [0, 30, 31, 32, 49]], dtype=np.int32)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoder")
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)).eval()
    reference.save_pretrained(folder)
    return folder


def _clip_torch_output(model: transformers.CLIPTextModel) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(CLIP_INPUT_IDS).long()).last_hidden_state.numpy()


def test_apply_lora_to_clip_targets(clip_folder):
    clip = load_clip_text(clip_folder)
    paths = apply_lora(clip, rank=2, alpha=4, target_modules=CLIP_TARGET_MODULES, rngs=nnx.Rngs(1))
    assert paths == [
        f"text_model.encoder.layers.{i}.self_attn.{name}"
        for i in range(2)
        for name in ("k_proj", "out_proj", "q_proj", "v_proj")
    ]
    fc1 = clip.text_model.encoder.layers[1].mlp.fc1
    assert type(fc1) is nnx.Linear


def test_text_encoder_keys_without_text_model_level(clip_folder):
    # Under transformers 5, diffusers names CLIP modules without "text_model.", and both spellings load.
    state_dict = {
        "text_encoder.encoder.layers.0.self_attn.v_proj.lora_A.weight": np.ones((2, 16), np.float32),
        "text_encoder.encoder.layers.0.self_attn.v_proj.lora_B.weight": np.ones((16, 2), np.float32),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight": np.ones((2, 16), np.float32),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight": np.ones((16, 2), np.float32),
    }
    adapters, unmatched = read_lora_adapters(state_dict, {"text_encoder": load_clip_text(clip_folder)})
    assert sorted(adapters["text_encoder"]) == [
        "text_model.encoder.layers.0.self_attn.v_proj",
        "text_model.encoder.layers.1.self_attn.v_proj",
    ]
    assert unmatched == []


def test_kohya_text_encoder_matches_transformers(clip_folder):
    rng = np.random.default_rng(0)
    rank = 2
    layers = {  # kohya name -> (dotted path, fan_in, fan_out, alpha)
        "text_model_encoder_layers_1_self_attn_q_proj": ("text_model.encoder.layers.1.self_attn.q_proj", 16, 16, 1.0),
        "text_model_encoder_layers_0_mlp_fc1": ("text_model.encoder.layers.0.mlp.fc1", 16, 24, 8.0),
    }
    kohya = {}
    for name, (_, fan_in, fan_out, alpha) in layers.items():
        kohya[f"lora_te_{name}.lora_down.weight"] = 0.3 * rng.standard_normal((rank, fan_in)).astype(np.float32)
        kohya[f"lora_te_{name}.lora_up.weight"] = 0.3 * rng.standard_normal((fan_out, rank)).astype(np.float32)
        kohya[f"lora_te_{name}.alpha"] = np.array(alpha, np.float32)

    # diffusers' kohya conversion names the same layers (q_proj by its older name to_q_lora).
    converted, _ = _convert_non_diffusers_lora_to_diffusers({k: torch.from_numpy(v) for k, v in kohya.items()})
    assert sorted(converted) == sorted(
        f"text_encoder.text_model.encoder.{layer}.{matrix}.weight"
        for layer in ("layers.1.self_attn.to_q_lora", "layers.0.mlp.fc1.lora_linear_layer")
        for matrix in ("down", "up")
    )

    clip = load_clip_text(clip_folder)
    result = load_lora_weights(kohya, {"text_encoder": clip})
    assert result.adapted == {"text_encoder": sorted(path for path, *_ in layers.values())}
    layer = clip.text_model.encoder.layers[0].mlp.fc1
    assert (layer.rank, layer.alpha) == (2, 8.0)

    reference = transformers.CLIPTextModel.from_pretrained(clip_folder).eval()
    expected_base = _clip_torch_output(reference)
    _fold_into_torch(
        reference,
        {
            path: (kohya[f"lora_te_{name}.lora_down.weight"], kohya[f"lora_te_{name}.lora_up.weight"], alpha / rank)
            for name, (path, _, _, alpha) in layers.items()
        },
    )
    expected = _clip_torch_output(reference)
    assert np.abs(expected - expected_base).max() > 1e-2, "the LoRA barely changes the output"
    actual = np.asarray(clip(jnp.asarray(CLIP_INPUT_IDS)).last_hidden_state)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


def test_clip_peft_round_trip(clip_folder, tmp_path):
    clip = load_clip_text(clip_folder)
    apply_lora(clip, rank=2, alpha=4, target_modules=CLIP_TARGET_MODULES, rngs=nnx.Rngs(1))
    _randomize_adapters(clip, seed=3)
    expected = np.asarray(clip(jnp.asarray(CLIP_INPUT_IDS)).last_hidden_state)
    file = save_lora_weights(tmp_path / "te.safetensors", {"text_encoder": clip})

    fresh = load_clip_text(clip_folder)
    load_lora_weights(file, {"text_encoder": fresh})

    actual = np.asarray(fresh(jnp.asarray(CLIP_INPUT_IDS)).last_hidden_state)
    np.testing.assert_array_equal(actual, expected)


# ----- mismatched files ----------------------------------------------------------------------


def test_file_matching_nothing_raises(tmp_path):
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    file = tmp_path / "other.safetensors"
    save_file({"unet.encoder.q.lora_A.weight": np.zeros((2, 8), np.float32),
               "unet.encoder.q.lora_B.weight": np.zeros((8, 2), np.float32)}, file)

    with pytest.raises(LoRAFileError, match=r"No key of the LoRA file matches.*unet.encoder.q.lora_A.weight.*"
                       r"Expected keys such as unet: unet.to_k.lora_A.weight"):
        load_lora_weights(file, {"unet": model})
    with pytest.raises(LoRAFileError, match="No key of the LoRA file matches"):
        load_lora_weights(file, {"unet": model}, strict=False)
    assert not lora_modules(model)


def test_partial_match_lists_unmatched_keys():
    model = TinyAttention(8, rngs=nnx.Rngs(0))
    state_dict = {
        "unet.to_q.lora_A.weight": np.ones((2, 8), np.float32),
        "unet.to_q.lora_B.weight": np.ones((8, 2), np.float32),
        "unet.to_x.lora_A.weight": np.ones((2, 8), np.float32),
        "unet.to_x.lora_B.weight": np.ones((8, 2), np.float32),
        "text_encoder.q_proj.lora_A.weight": np.ones((2, 8), np.float32),
        "text_encoder.q_proj.lora_B.weight": np.ones((8, 2), np.float32),
    }
    with pytest.raises(LoRAFileError, match=r"4 LoRA file keys match no layer.*text_encoder.q_proj.lora_A.weight.*"
                       r"unet.to_x.lora_B.weight"):
        load_lora_weights(state_dict, {"unet": model})
    assert not lora_modules(model)

    result = load_lora_weights(state_dict, {"unet": model}, strict=False)
    assert result.adapted == {"unet": ["to_q"]}
    assert result.unmatched_keys == sorted(key for key in state_dict if "to_q" not in key)


@pytest.mark.parametrize(
    "state_dict, message",
    [
        ({"unet.to_q.lora_A.weight": np.ones((2, 8), np.float32)}, "lack their down .lora_A. or up .lora_B."),
        ({"unet.to_q.lora_A.weight": np.ones((2, 8), np.float32),
          "unet.to_q.lora_B.weight": np.ones((8, 3), np.float32)}, r"do not fit these layers.*to_q: down \(2, 8\)"),
        ({"unet.to_q.lora_A.weight": np.ones((2, 8), np.float32),
          "unet.to_q.lora_B.weight": np.ones((8, 2), np.float32),
          "unet.to_q.lora_magnitude_vector": np.ones((8,), np.float32)}, "DoRA adapters are not supported"),
        ({"lora_unet_to_q.lora_down.weight": np.ones((2, 8, 3, 3), np.float32),
          "lora_unet_to_q.lora_up.weight": np.ones((8, 2, 1, 1), np.float32)}, "do not fit these layers"),
    ],
    ids=["incomplete", "shape", "dora", "conv3x3"],
)
def test_bad_files_raise(state_dict, message):
    with pytest.raises(LoRAFileError, match=message):
        read_lora_adapters(state_dict, {"unet": TinyAttention(8, rngs=nnx.Rngs(0))})


def test_metadata_rank_must_match_shapes():
    state_dict = {
        "unet.to_q.lora_A.weight": np.ones((2, 8), np.float32),
        "unet.to_q.lora_B.weight": np.ones((8, 2), np.float32),
    }
    with pytest.raises(LoRAFileError, match="has rank 2, but the file's lora_adapter_metadata header gives rank 4"):
        read_lora_adapters(state_dict, {"unet": TinyAttention(8, rngs=nnx.Rngs(0))},
                           metadata={"unet.r": 4, "unet.lora_alpha": 4})
    adapters, _ = read_lora_adapters(state_dict, {"unet": TinyAttention(8, rngs=nnx.Rngs(0))},
                                     metadata={"unet.r": 2, "unet.lora_alpha": 4, "unet.use_rslora": True})
    # rsLoRA scales by alpha / sqrt(r).
    assert adapters["unet"]["to_q"].alpha / 2 == pytest.approx(4 / np.sqrt(2))
    assert METADATA_KEY == "lora_adapter_metadata"
