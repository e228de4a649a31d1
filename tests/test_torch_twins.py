"""Torch twins by jaxgen model class: parity both ways, exact weight round trips and strict key checks.

Every case is a tiny float32 model. A reference built by diffusers or transformers (or our torch
LabelConditionedUNet), with seeded random weights plus seeded noise on every tensor so that norm scales
are not 1 and biases not 0, goes through `jaxgen_twin` and back through `torch_twin`.

Parity metric: max |jaxgen - torch| / max |torch| over each whole output. The tolerance is 1e-5. Measured:
at most 1.4e-6, on the VAE reconstruction (2-core x86 CPU, jax 0.10.2, torch 2.13.0, diffusers 0.42.1,
transformers 5.25.0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from torch import nn

from conversion.diffusers_io import abstract_model
from conversion.rules import CheckpointMismatchError
from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxgen.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxgen.models.label_unet import LabelConditionedUNet as JaxLabelConditionedUNet
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from torch_npu_backend import models
from torch_npu_backend.attention import NPUAttnProcessor

PARITY_RTOL = 1e-5
BATCH = 2

VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=8,
)
LABEL_UNET = dict(UNET, in_channels=1, out_channels=1, num_class_embeds=5)
EOS = 50
CLIP = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    projection_dim=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=EOS,
)
INPUT_IDS = np.array([[0, 70, 12, EOS, 1, 1], [0, 12, 33, 99, 98, EOS]], dtype=np.int64)


def perturb(module: nn.Module, seed: int) -> nn.Module:
    """Add seeded noise to every parameter and return the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().transpose(0, 2, 3, 1)


@dataclasses.dataclass(frozen=True)
class Case:
    """A jaxgen model, how to build its reference torch module, and how to run each on the same inputs.

    Inputs are a dict of numpy arrays, images channels-last; both runners return a dict of numpy
    outputs, images channels-last.
    """

    jaxgen_class: type
    config: object
    build_reference: Callable[[], nn.Module]
    make_inputs: Callable[[np.random.Generator], dict]
    run_torch: Callable[[nn.Module, dict], dict]
    run_jaxgen: Callable[[nnx.Module, dict], dict]


def vae_inputs(rng):
    return {"images": rng.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32)}


def run_torch_vae(module, inputs):
    images = nchw(inputs["images"])
    with torch.no_grad():
        mean = module.encode(images).latent_dist.mean
        reconstruction = module(images, sample_posterior=False).sample
    return {"latent mean": nhwc(mean), "reconstruction": nhwc(reconstruction)}


def run_jaxgen_vae(model, inputs):
    images = jnp.asarray(inputs["images"])
    return {"latent mean": model.encode(images).mean, "reconstruction": model(images)}


def unet_inputs(rng, in_channels=4):
    return {
        "sample": rng.standard_normal((BATCH, 8, 8, in_channels)).astype(np.float32),
        "timesteps": np.array([10, 999]),
        "context": rng.standard_normal((BATCH, 7, UNET["cross_attention_dim"])).astype(np.float32),
        "labels": np.array([0, LABEL_UNET["num_class_embeds"] - 1]),
    }


def run_torch_unet(module, inputs):
    with torch.no_grad():
        out = module(nchw(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                     encoder_hidden_states=torch.from_numpy(inputs["context"])).sample
    return {"sample": nhwc(out)}


def run_jaxgen_unet(model, inputs):
    out = model(jnp.asarray(inputs["sample"]), jnp.asarray(inputs["timesteps"]),
                encoder_hidden_states=jnp.asarray(inputs["context"]))
    return {"sample": out}


def run_torch_label_unet(module, inputs):
    with torch.no_grad():
        out = module(nchw(inputs["sample"]), torch.from_numpy(inputs["timesteps"]), torch.from_numpy(inputs["labels"]))
    return {"sample": nhwc(out)}


def run_jaxgen_label_unet(model, inputs):
    out = model(jnp.asarray(inputs["sample"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["labels"]))
    return {"sample": out}


def clip_inputs(rng, attention_mask=None):
    return {"input_ids": INPUT_IDS, "attention_mask": attention_mask}


def run_torch_clip(module, inputs):
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = module(torch.from_numpy(inputs["input_ids"]),
                     attention_mask=None if mask is None else torch.from_numpy(mask))
    outputs = {"last_hidden_state": out.last_hidden_state.numpy()}
    if hasattr(out, "text_embeds"):
        outputs["text_embeds"] = out.text_embeds.numpy()
    else:
        outputs["pooler_output"] = out.pooler_output.numpy()
    return outputs


def run_jaxgen_clip(model, inputs):
    mask = inputs["attention_mask"]
    out = model(jnp.asarray(inputs["input_ids"]), None if mask is None else jnp.asarray(mask))
    outputs = {"last_hidden_state": out.last_hidden_state}
    if out.text_embeds is not None:
        outputs["text_embeds"] = out.text_embeds
    else:
        outputs["pooler_output"] = out.pooler_output
    return outputs


def seeded(build: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build_reference() -> nn.Module:
        torch.manual_seed(seed)
        return perturb(build(), seed + 1)

    return build_reference


CASES = {
    "vae": Case(AutoencoderKL, AutoencoderKLConfig(**VAE), seeded(lambda: diffusers.AutoencoderKL(**VAE), 0),
                vae_inputs, run_torch_vae, run_jaxgen_vae),
    "unet": Case(UNet2DConditionModel, UNet2DConditionConfig(**UNET),
                 seeded(lambda: diffusers.UNet2DConditionModel(**UNET), 10), unet_inputs, run_torch_unet,
                 run_jaxgen_unet),
    "clip_text": Case(CLIPTextModel, CLIPTextConfig(**CLIP),
                      seeded(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 20),
                      clip_inputs, run_torch_clip, run_jaxgen_clip),
    "clip_text_projection": Case(
        CLIPTextModelWithProjection, CLIPTextConfig(**CLIP),
        seeded(lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP)), 30),
        clip_inputs, run_torch_clip, run_jaxgen_clip),
    "label_unet": Case(JaxLabelConditionedUNet, UNet2DConditionConfig(**LABEL_UNET),
                       seeded(lambda: models.LabelConditionedUNet(UNet2DConditionConfig(**LABEL_UNET)), 40),
                       lambda rng: unet_inputs(rng, in_channels=1), run_torch_label_unet, run_jaxgen_label_unet),
}


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@functools.cache
def jitted(run: Callable) -> Callable:
    return nnx.jit(run)


def jaxgen_outputs(case: Case, model: nnx.Module, inputs: dict) -> dict:
    """Run the case's jaxgen runner under nnx.jit and return numpy outputs.

    One compile per case graph is much faster here than eager mode, which compiles every op separately.
    """
    return {name: np.asarray(value) for name, value in jitted(case.run_jaxgen)(model, inputs).items()}


def random_jaxgen_model(jaxgen_class: type, config: object, seed: int) -> nnx.Module:
    """Return a registered jaxgen model with seeded random weights, set without running its initialisers.

    Eager Flax initialisers compile once per parameter shape: 40 s for the tiny U-Net on a loaded 2-core
    machine. Kernels get std 1 / sqrt(fan_in), norm scales 1 + noise and everything else small noise.
    """
    rng = np.random.default_rng(seed)
    build = models.find_twin(jaxgen_class).build_jaxgen
    graphdef, abstract = nnx.split(abstract_model(lambda rngs: build(config, rngs)))
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        if isinstance(variable, nnx.Param):
            shape = variable.get_value().shape
            noise = rng.standard_normal(shape)
            if path[-1] == "kernel":
                value = noise / math.sqrt(math.prod(shape[:-1]))
            elif path[-1] == "scale":
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            variable = variable.replace(jnp.asarray(value, jnp.float32))
        flat.append((path, variable))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def assert_outputs_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        error = max_relative_error(actual[name], value)
        assert error <= PARITY_RTOL, f"{name}: max relative error {error:.2e} > {PARITY_RTOL}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run torch on one thread: these models are tiny, and with two threads on a shared 2-core machine a
    forward pass that takes 10 ms can take seconds while the threads wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=sorted(CASES))
def from_reference(request):
    """A case, its reference torch module and the jaxgen twin of that reference."""
    case = CASES[request.param]
    reference = case.build_reference()
    return case, reference, models.jaxgen_twin(reference)


# ----- reference -> jaxgen -> torch ----------------------------------------------------------------------


def test_jaxgen_twin_matches_reference(from_reference):
    case, reference, model = from_reference
    assert type(model) is case.jaxgen_class
    assert model.config == case.config
    inputs = case.make_inputs(np.random.default_rng(0))
    assert_outputs_close(jaxgen_outputs(case, model, inputs), case.run_torch(reference, inputs))


def test_round_trip_state_dict_bit_identical(from_reference):
    case, reference, model = from_reference
    twin = models.torch_twin(model)
    assert type(twin) is type(reference)
    expected = reference.state_dict()
    returned = twin.state_dict()
    assert list(returned) == list(expected)
    for key, tensor in expected.items():
        assert returned[key].dtype == tensor.dtype, key
        assert torch.equal(returned[key], tensor), key


def test_round_trip_twin_matches_reference(from_reference):
    # The twin runs NPUAttnProcessor (diffusers) or eager attention (CLIP), the reference its default.
    case, reference, model = from_reference
    inputs = case.make_inputs(np.random.default_rng(1))
    assert_outputs_close(case.run_torch(models.torch_twin(model), inputs), case.run_torch(reference, inputs))


# ----- jaxgen init -> torch ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_twin_of_random_jaxgen_model(name):
    case = CASES[name]
    model = random_jaxgen_model(case.jaxgen_class, case.config, seed=3)
    twin = models.torch_twin(model)
    assert type(twin) is models.find_twin(case.jaxgen_class).torch_class
    assert not twin.training
    inputs = case.make_inputs(np.random.default_rng(2))
    actual = jaxgen_outputs(case, model, inputs)
    for output, value in actual.items():
        assert np.std(value) > 1e-3, f"{output} is nearly constant, so parity would prove little"
    assert_outputs_close(actual, case.run_torch(twin, inputs))


@pytest.mark.parametrize("name", ["vae", "unet", "label_unet"])
def test_diffusers_twins_use_npu_processor(name):
    case = CASES[name]
    twin = models.torch_twin(random_jaxgen_model(case.jaxgen_class, case.config, seed=0))
    processors = twin.attn_processors if hasattr(twin, "attn_processors") else twin.unet.attn_processors
    assert processors
    for key, processor in processors.items():
        assert isinstance(processor, NPUAttnProcessor), key


def test_clip_twin_matches_jaxgen_with_left_padding():
    # The first two queries of row 0 attend to no key. transformers' SDPA path returns other values
    # than jaxgen for them (0.96 relative, measured), and the twin's eager attention matches every row.
    case = CASES["clip_text"]
    model = random_jaxgen_model(case.jaxgen_class, case.config, seed=4)
    twin = models.torch_twin(model)
    assert twin.config._attn_implementation == models.CLIP_ATTENTION
    inputs = clip_inputs(None, attention_mask=np.array([[0, 0, 1, 1, 1, 1], [1] * 6]))
    assert_outputs_close(jaxgen_outputs(case, model, inputs), run_torch_clip(twin, inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_twin_on_cuda(monkeypatch):
    # NOTE: this test has not run on a GPU yet, because the machines it was written on had none.
    # cuDNN runs convolutions in TF32 by default, which rounds to about 1e-3 relative; turn it off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    case = CASES["unet"]
    model = random_jaxgen_model(case.jaxgen_class, case.config, seed=5)
    twin = models.torch_twin(model, device="cuda")
    assert next(twin.parameters()).device.type == "cuda"
    inputs = case.make_inputs(np.random.default_rng(3))
    with torch.no_grad():
        out = twin(nchw(inputs["sample"]).cuda(), torch.from_numpy(inputs["timesteps"]).cuda(),
                   encoder_hidden_states=torch.from_numpy(inputs["context"]).cuda()).sample
    assert max_relative_error(nhwc(out), jaxgen_outputs(case, model, inputs)["sample"]) <= PARITY_RTOL


# ----- strict keys ---------------------------------------------------------------------------------------

FC1 = "encoder.layers.0.mlp.fc1"


def without_fc1_bias(state_dict):
    del state_dict[f"{FC1}.bias"]


def with_extra_key(state_dict):
    state_dict["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(3)


def with_transposed_fc1(state_dict):
    state_dict[f"{FC1}.weight"] = state_dict[f"{FC1}.weight"].T.contiguous()


STATE_DICT_EDITS = [
    pytest.param(without_fc1_bias, f"missing key: {FC1}.bias\n", id="missing"),
    pytest.param(with_extra_key, "unexpected key: encoder.layers.0.mlp.fc3.weight\n", id="extra"),
    pytest.param(with_transposed_fc1, f"wrong shape: {FC1}.weight: checkpoint [32, 48], model expects [48, 32]",
                 id="transposed"),
]


@pytest.mark.parametrize("edit, expected_line", STATE_DICT_EDITS)
def test_state_dict_mismatch_named(edit, expected_line):
    # CLIPTextModel's twin lacks the "text_model." module, so the message must use the twin's key names.
    state_dict = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).state_dict()
    edit(state_dict)
    with pytest.raises(CheckpointMismatchError) as raised:
        models.jaxgen_model_from_state_dict(CLIPTextModel, CLIPTextConfig(**CLIP), state_dict)
    message = str(raised.value)
    assert expected_line in message
    assert "text_model." not in message


def drop_final_norm_bias(model):
    model.text_model.final_layer_norm.bias = None


def add_extra_param(model):
    model.text_model.extra = nnx.Param(jnp.zeros(3))


def transpose_fc1_kernel(model):
    kernel = model.text_model.encoder.layers[0].mlp.fc1.kernel
    kernel.set_value(kernel.get_value().T)


MODEL_EDITS = [
    pytest.param(drop_final_norm_bias, "missing key: final_layer_norm.bias\n", id="missing"),
    pytest.param(add_extra_param, "unexpected key: extra\n", id="extra"),
    pytest.param(transpose_fc1_kernel, f"wrong shape: {FC1}.weight: checkpoint [32, 48], model expects [48, 32]",
                 id="transposed"),
]


@pytest.mark.parametrize("edit, expected_line", MODEL_EDITS)
def test_torch_twin_mismatch_named(edit, expected_line):
    model = random_jaxgen_model(CLIPTextModel, CLIPTextConfig(**CLIP), seed=0)
    edit(model)
    with pytest.raises(CheckpointMismatchError) as raised:
        models.torch_twin(model)
    assert expected_line in str(raised.value)


def test_unregistered_jaxgen_model_named():
    linear = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"No torch twin is registered for flax\.nnx\.nn\.linear\.Linear") as raised:
        models.torch_twin(linear)
    assert "torch_npu_backend.models.register_twin" in str(raised.value)


def test_unregistered_torch_module_named():
    with pytest.raises(TypeError, match=r"No torch twin is registered for torch\.nn\.modules\.linear\.Linear"):
        models.jaxgen_twin(nn.Linear(2, 3))


def test_torch_module_passed_as_jaxgen_model():
    with pytest.raises(TypeError, match=r"transformers\..*CLIPTextModel is a torch twin; pass a jaxgen model"):
        models.torch_twin(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)))


# ----- registering a new pair ----------------------------------------------------------------------------


class ToyJaxgen(nnx.Module):
    """A conv, a layer norm and a linear head: the three layout rules a new model needs."""

    def __init__(self, config: int, *, rngs: nnx.Rngs):
        self.config = config
        self.conv = nnx.Conv(3, config, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(config, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(config, 2, rngs=rngs)

    def __call__(self, images):  # [B, H, W, 3] -> [B, 2]
        return self.head(self.norm(self.conv(images)).mean(axis=(1, 2)))


class ToyTorch(nn.Module):
    def __init__(self, config: int):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(3, config, 3, padding=1)
        self.norm = nn.LayerNorm(config)
        self.head = nn.Linear(config, 2)

    def forward(self, images):  # [B, 3, H, W] -> [B, 2]
        return self.head(self.norm(self.conv(images).permute(0, 2, 3, 1)).mean(dim=(1, 2)))


def test_register_twin_new_pair(monkeypatch):
    monkeypatch.setattr(models, "MODEL_TWINS", dict(models.MODEL_TWINS))
    models.register_twin(ToyJaxgen, ToyTorch, build_torch=ToyTorch, read_config=lambda module: module.config)
    model = random_jaxgen_model(ToyJaxgen, 6, seed=0)
    images = np.random.default_rng(0).standard_normal((BATCH, 5, 5, 3)).astype(np.float32)

    twin = models.torch_twin(model)
    with torch.no_grad():
        expected = twin(nchw(images)).numpy()
    actual = np.asarray(nnx.jit(lambda toy, x: toy(x))(model, jnp.asarray(images)))
    assert max_relative_error(actual, expected) <= PARITY_RTOL

    back = models.jaxgen_twin(twin)
    assert type(back) is ToyJaxgen
    assert back.config == 6
    original = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    returned = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert sorted(returned) == sorted(original)
    for path, variable in original.items():
        np.testing.assert_array_equal(np.asarray(returned[path].get_value()), np.asarray(variable.get_value()),
                                      err_msg=str(path))


def test_register_twin_rejects_second_twin(monkeypatch):
    monkeypatch.setattr(models, "MODEL_TWINS", dict(models.MODEL_TWINS))
    with pytest.raises(ValueError, match=r"AutoencoderKL already has the torch twin diffusers\..*AutoencoderKL"):
        models.register_twin(AutoencoderKL, ToyTorch, build_torch=ToyTorch, read_config=lambda module: module.config)
    with pytest.raises(ValueError, match=r"AutoencoderKL is already the twin of jaxgen\..*AutoencoderKL"):
        models.register_twin(ToyJaxgen, diffusers.AutoencoderKL, build_torch=ToyTorch,
                             read_config=lambda module: module.config)
