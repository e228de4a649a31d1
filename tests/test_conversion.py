"""conversion.rules and conversion.diffusers_io: layouts, mismatch errors, folders and round trips."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from flax import nnx
from safetensors.torch import save_file as save_torch_safetensors

from conversion.diffusers_io import abstract_model, load_unet, read_state_dict, save_unet
from conversion.rules import CheckpointMismatchError, nnx_to_torch, torch_key, torch_shapes, torch_to_nnx
from jaxgen.models import UNet2DConditionConfig, UNet2DConditionModel

TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=2,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=8,
    attention_head_dim=4,
    num_class_embeds=3,
    resnet_time_scale_shift="scale_shift",
)


# ----- rules on one module of each kind --------------------------------------------------------


class TorchZoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 5)
        self.conv = torch.nn.Conv2d(2, 4, kernel_size=3)
        self.conv1d = torch.nn.Conv1d(2, 3, kernel_size=2)
        self.blocks = torch.nn.ModuleList([torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(5)])
        self.bn = torch.nn.BatchNorm2d(4)
        self.emb = torch.nn.Embedding(7, 3)
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 6))


class NnxZoo(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 5, rngs=rngs)
        self.conv = nnx.Conv(2, 4, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.conv1d = nnx.Conv(2, 3, kernel_size=(2,), padding="VALID", rngs=rngs)
        self.blocks = nnx.List([nnx.GroupNorm(4, num_groups=2, rngs=rngs), nnx.LayerNorm(5, rngs=rngs)])
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.emb = nnx.Embed(7, 3, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, 6)))


@pytest.fixture()
def zoo():
    torch.manual_seed(0)
    reference = TorchZoo()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
        reference.bn.running_mean.normal_()
        reference.bn.running_var.uniform_(0.5, 2.0)
    state_dict = {key: value.numpy().copy() for key, value in reference.state_dict().items()}
    return reference, state_dict, NnxZoo(nnx.Rngs(0))


def test_rules_convert_every_layer_kind(zoo):
    reference, state_dict, model = zoo
    nnx.update(model, torch_to_nnx(state_dict, nnx.state(model)))
    rng = np.random.default_rng(0)

    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(
        model.linear(jnp.asarray(x)), reference.linear(torch.from_numpy(x)).detach().numpy(), rtol=1e-6, atol=1e-6
    )
    image = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)  # NCHW
    expected = reference.conv(torch.from_numpy(image)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(model.conv(jnp.asarray(image.transpose(0, 2, 3, 1))), expected, rtol=1e-5, atol=1e-5)
    signal = rng.standard_normal((2, 2, 5)).astype(np.float32)  # NCW
    expected = reference.conv1d(torch.from_numpy(signal)).detach().numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(model.conv1d(jnp.asarray(signal.transpose(0, 2, 1))), expected, rtol=1e-5, atol=1e-5)

    np.testing.assert_array_equal(model.blocks[0].scale[...], state_dict["blocks.0.weight"])
    np.testing.assert_array_equal(model.blocks[1].bias[...], state_dict["blocks.1.bias"])
    np.testing.assert_array_equal(model.bn.mean[...], state_dict["bn.running_mean"])
    np.testing.assert_array_equal(model.bn.var[...], state_dict["bn.running_var"])
    np.testing.assert_array_equal(model.emb.embedding[...], state_dict["emb.weight"])
    np.testing.assert_array_equal(model.pos_embed[...], state_dict["pos_embed"])


def test_rules_round_trip_exactly(zoo):
    reference, state_dict, model = zoo
    nnx.update(model, torch_to_nnx(state_dict, nnx.state(model)))
    back = nnx_to_torch(nnx.state(model))
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # num_batches_tracked is written back, so torch's strict loading accepts the dict.
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in back.items()}, strict=True)


def test_rules_fill_an_abstract_state(zoo):
    _, state_dict, _ = zoo
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxZoo(nnx.Rngs(0))))
    filled = torch_to_nnx(state_dict, abstract)
    for path, variable in nnx.to_flat_state(filled):
        assert isinstance(variable.get_value(), jax.Array), path
    model = nnx.merge(graphdef, filled)
    np.testing.assert_array_equal(model.linear.kernel[...], state_dict["linear.weight"].T)


def test_torch_key_names():
    assert torch_key(("down_blocks", 0, "resnets", 1, "conv1", "kernel"), 4) == "down_blocks.0.resnets.1.conv1.weight"
    assert torch_key(("norm", "scale"), 1) == "norm.weight"
    assert torch_key(("emb", "embedding"), 2) == "emb.weight"
    assert torch_key(("pos_embed",), 2) == "pos_embed"


@pytest.mark.parametrize(
    "edit, expected_line",
    [
        (lambda sd: sd.pop("linear.bias"), "missing key: linear.bias"),
        (lambda sd: sd.update({"linear.extra": np.zeros(3)}), "unexpected key: linear.extra"),
        (
            lambda sd: sd.update({"conv.weight": np.zeros((4, 2, 5, 5), np.float32)}),
            "wrong shape: conv.weight: checkpoint [4, 2, 5, 5], model expects [4, 2, 3, 3]",
        ),
    ],
)
def test_mismatch_named_in_error(zoo, edit, expected_line):
    _, state_dict, model = zoo
    edit(state_dict)
    with pytest.raises(CheckpointMismatchError) as info:
        torch_to_nnx(state_dict, nnx.state(model))
    assert expected_line in [line.strip() for line in str(info.value).splitlines()]


def test_mismatches_reported_together(zoo):
    _, state_dict, model = zoo
    del state_dict["emb.weight"]
    state_dict["head.weight"] = np.zeros((2, 2), np.float32)
    state_dict["linear.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        torch_to_nnx(state_dict, nnx.state(model))
    error = info.value
    assert isinstance(error, ValueError)
    assert error.missing == ["emb.weight"]
    assert error.unexpected == ["head.weight"]
    assert error.shape_mismatches == [("linear.weight", (5, 4), (5, 3))]


# ----- diffusers folders -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    reference = DiffusersUNet(**TINY_UNET).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    reference.save_pretrained(folder)
    return reference, folder


def _torch_output(model: DiffusersUNet) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 8, 8, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([3, 700]), context, class_labels=torch.tensor([0, 2])).sample.numpy()


def test_diffusers_round_trip(diffusers_folder, tmp_path):
    reference, folder = diffusers_folder
    save_unet(load_unet(folder), tmp_path)
    reloaded = DiffusersUNet.from_pretrained(tmp_path).eval()

    expected = reference.state_dict()
    actual = reloaded.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key].numpy(), value.numpy(), err_msg=key)
    for key in TINY_UNET:
        # config.json turns the tuples that the reference was built with into lists.
        assert np.array_equal(reloaded.config[key], reference.config[key]), key
    np.testing.assert_array_equal(_torch_output(reloaded), _torch_output(reference))


def test_load_matches_every_tensor(diffusers_folder):
    reference, folder = diffusers_folder
    loaded = nnx_to_torch(nnx.state(load_unet(folder)))
    expected = {key: value.numpy() for key, value in reference.state_dict().items()}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_load_pickle_and_sharded_weights(diffusers_folder, tmp_path):
    reference, folder = diffusers_folder
    expected = read_state_dict(folder)

    pickled = tmp_path / "pickled"
    reference.save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()

    for other in (pickled, sharded):
        actual = nnx_to_torch(nnx.state(load_unet(other)))
        assert sorted(actual) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(actual[key], value, err_msg=f"{other.name}: {key}")


def test_read_bfloat16_safetensors(tmp_path):
    weights = {"a.weight": torch.randn(3, 2).to(torch.bfloat16)}
    save_torch_safetensors(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(weights, tmp_path / "diffusion_pytorch_model.fp16.bin")
    from_safetensors = read_state_dict(tmp_path)["a.weight"]
    from_pickle = read_state_dict(tmp_path, variant="fp16")["a.weight"]
    expected = weights["a.weight"].float().numpy()
    for array in (from_safetensors, from_pickle):
        assert array.dtype == jnp.bfloat16
        np.testing.assert_array_equal(array.astype(np.float32), expected)


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        load_unet(missing)


def test_load_pipeline_root_suggests_subfolder(tmp_path):
    for name, class_name in (("text_encoder", "CLIPTextModel"), ("unet", "UNet2DConditionModel")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'unet'} contains a UNet2DConditionModel"):
        load_unet(tmp_path)


def test_load_wrong_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="describes a 'AutoencoderKL', not a 'UNet2DConditionModel'"):
        load_unet(tmp_path)


def test_load_missing_weights(diffusers_folder, tmp_path):
    _, folder = diffusers_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No weights in .*diffusion_pytorch_model.safetensors"):
        load_unet(tmp_path)


def test_load_config_mismatch_lists_keys(diffusers_folder, tmp_path):
    _, folder = diffusers_folder
    config = json.loads((folder / "config.json").read_text())
    config["layers_per_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="missing key: down_blocks.0.resnets.1.conv1.weight"):
        load_unet(tmp_path)


# ----- full-size layouts -----------------------------------------------------------------------

SD15_SHAPED = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
)
SD21_SHAPED = dict(SD15_SHAPED, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
# SDXL's block layout without its added text/time embeddings, which jaxgen does not implement yet.
SDXL_SHAPED = dict(
    SD21_SHAPED,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
)


@pytest.mark.parametrize("name, config", [("sd15", SD15_SHAPED), ("sd21", SD21_SHAPED), ("sdxl", SDXL_SHAPED)])
def test_full_size_layout_matches_diffusers(name, config):
    with torch.device("meta"):  # Shapes only, no memory.
        reference = DiffusersUNet(**config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    unet_config = UNet2DConditionConfig.from_diffusers(dict(reference.config))
    model = abstract_model(lambda rngs: UNet2DConditionModel(unet_config, rngs=rngs))
    assert torch_shapes(nnx.state(model)) == expected, name


def test_abstract_model_matches_eval_shape():
    config = UNet2DConditionConfig(**TINY_UNET)
    fast = abstract_model(lambda rngs: UNet2DConditionModel(config, rngs=rngs))
    reference = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(fast) == nnx.graphdef(reference)
    fast_shapes = {path: (v.get_value().shape, v.get_value().dtype) for path, v in nnx.to_flat_state(nnx.state(fast))}
    reference_shapes = {
        path: (v.get_value().shape, v.get_value().dtype) for path, v in nnx.to_flat_state(nnx.state(reference))
    }
    assert fast_shapes == reference_shapes
