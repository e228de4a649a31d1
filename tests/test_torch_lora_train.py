"""Tests of LoRA fine-tuning with the PyTorch backend (torch_npu_backend.train_lora) against jaxgen.

The runs use the tiny preset of configs/sdxl_lora.py (32x32 digit captions in one bucket, batch 2) on a tiny
random SDXL base. They run on the CPU with one thread per process, so a run in this process and one in a
subprocess do the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO_ROOT
from jaxgen import config as config_lib
from test_torch_train import assert_close_to_scale, checkpoint_steps, read_losses, torch_env, torch_threads
from torch_npu_backend import train as torch_train
from torch_npu_backend import train_lora, train_state

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

NUM_STEPS = 4
CHECKPOINT_EVERY = 2
# Attention projections that carry adapters (lora_A and lora_B each) in the tiny SDXL and SD U-Nets.
NUM_ADAPTED_LAYERS = 64
NUM_ADAPTED_LAYERS_SD = 32
# One float32 step of jaxgen and torch from the same weights, adapters, batch and draws. Measured for SD and
# SDXL: equal losses, and adapter gradients within 1e-5 of each tensor's largest magnitude.
LOSS_RTOL = 1e-5
GRAD_RTOL = 5e-5
# Two processes each see half of the batch, so the reductions sum in another order. Measured: 2.3e-7 relative.
DDP_RTOL = 1e-5
# A resumed run repeats the arithmetic of an uninterrupted one with the same thread count.
RESUME_RTOL = 1e-6
# U-Net outputs of jaxgen and torch with the same base and adapters, relative to the largest output
# magnitude. Measured: 1.2e-6 (diffusers with the file and the trained peft U-Net: equal).
OUTPUT_RTOL = 1e-5
# XLA options that halve the compile time of the jaxgen programs here. The float32 results stay within the
# tolerances above.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_overrides(base: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
    # A high learning rate moves the adapters far enough from zero in four steps that the LoRA file
    # visibly changes the U-Net's output.
    return [f"model.random_base_dir={base}", f"data.data_dir={data_dir}", f"train.num_steps={NUM_STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "optim.learning_rate=1e-2"]


def tiny_config(base: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> config_lib.Config:
    return config_lib.load_config("sdxl_lora", [*tiny_overrides(base, data_dir), *extra], arg="tiny")


def cli_args(workdir: pathlib.Path, base: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
    args = ["--cfg", "sdxl_lora", "--cfg-arg", "tiny", "--workdir", str(workdir), "--device", "cpu"]
    for override in tiny_overrides(base, data_dir):
        args += ["--set", override]
    return args


def cpu_process() -> torch_train.ProcessInfo:
    return torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """Return the folder of the tiny random SDXL base, written by the first run that needs it."""
    return tmp_path_factory.mktemp("lora_base") / "tiny_sdxl_base"


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> pathlib.Path:
    """Return the folder of the tiny random Stable Diffusion base, written by the first test that needs it."""
    return tmp_path_factory.mktemp("lora_base") / "tiny_sd_base"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, base, data_dir) -> train_lora.LoRATrainingRun:
    """Train the tiny adapters once, uninterrupted and in one process, and keep the run's models."""
    workdir = tmp_path_factory.mktemp("torch_lora_runs") / "reference"
    with torch_threads(1):
        run = train_lora.LoRATrainingRun(tiny_config(base, data_dir), workdir, cpu_process())
        run.run()
    return run


def to_torch_layout(x: jax.Array) -> torch.Tensor:
    """Convert a channels-last [B, h, w, C] array to a channels-first torch tensor."""
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


# ---- one train step against jaxgen -----------------------------------------------------------------------------


# SDXL runs two text encoders, the pooled embedding and time_ids. SD runs the single-encoder path.
@pytest.mark.parametrize("cfg", ["sd_lora", "sdxl_lora"])
def test_train_step_matches_jaxgen(cfg, base, sd_base, data_dir):
    """Same base, adapters, batch and draws: same loss and adapter gradients in both backends (float32)."""
    from jaxgen.lora import LoRAWeight, lora_modules
    from jaxgen.tasks_text_to_image import TextToImageLoRATask

    # Batch 4 and a drop probability of 0.5, so that the batch has both dropped and kept captions.
    config = config_lib.load_config(cfg, [*tiny_overrides(sd_base if cfg == "sd_lora" else base, data_dir),
                                          "data.batch_size=4", "diffusion.caption_dropout_prob=0.5"], arg="tiny")
    train_data, held_out = TextToImageLoRATask.load_data(config)
    task = TextToImageLoRATask(config, held_out)
    batch = next(task.make_loader(train_data))
    model = task.build_model(nnx.Rngs(0))
    # lora_B starts at zero, which would leave lora_A without gradient, so both get random values.
    rng = np.random.default_rng(0)
    layers = lora_modules(model.unet)
    assert len(layers) == (NUM_ADAPTED_LAYERS if config.model.xl else NUM_ADAPTED_LAYERS_SD)
    for layer in layers.values():
        layer.lora_B.set_value(jnp.asarray(0.1 * rng.standard_normal(layer.lora_B.get_value().shape), jnp.float32))

    key = jax.random.key(3)
    graphdef, adapters, rest = nnx.split(model, LoRAWeight, ...)
    jax_batch = jax.tree.map(jnp.asarray, batch)

    def jax_loss(adapters, rest, batch, key):
        return task.loss_fn(nnx.merge(graphdef, adapters, rest), batch, key)[0]

    lowered = jax.jit(jax.value_and_grad(jax_loss)).lower(adapters, rest, jax_batch, key)
    expected_loss, grads = lowered.compile(FAST_COMPILE)(adapters, rest, jax_batch, key)

    # The draws that loss_fn takes from `key`, in its order of splits.
    latent_key, drop_key, t_key, noise_key = jax.random.split(key, 4)
    batch_size, height, width, _ = batch["image"].shape
    factor = task.pipeline.vae_scale_factor
    latent_shape = (batch_size, height // factor, width // factor, model.vae.config.latent_channels)  # [B, h, w, C]
    drop_uniform = jax.random.uniform(drop_key, (batch_size,))
    dropped = np.asarray(jax.random.bernoulli(drop_key, 0.5, (batch_size,)))
    np.testing.assert_array_equal(np.asarray(drop_uniform < 0.5), dropped)
    assert 0 < dropped.sum() < batch_size
    timesteps = jax.random.randint(t_key, (batch_size,), 0, task.schedule.num_train_timesteps)
    draws = train_lora.LoRANoiseDraw(
        drop_uniform=torch.from_numpy(np.array(drop_uniform)),
        timesteps=torch.from_numpy(np.array(timesteps)).long(),
        latent_noise=to_torch_layout(jax.random.normal(latent_key, latent_shape)),
        noise=to_torch_layout(jax.random.normal(noise_key, latent_shape)),
    )

    components = train_lora.load_lora_components(task.folder, config.model)
    with torch.no_grad():
        for path, layer in layers.items():
            peft = components.unet.get_submodule(path)
            # jaxgen's lora_A [in, r] and lora_B [r, out] are peft's Linear weights [r, in] and [out, r], transposed.
            peft.lora_A[train_lora.ADAPTER_NAME].weight.copy_(torch.from_numpy(np.array(layer.lora_A.get_value()).T))
            peft.lora_B[train_lora.ADAPTER_NAME].weight.copy_(torch.from_numpy(np.array(layer.lora_B.get_value()).T))
    empty_ids = tuple(torch.from_numpy(np.asarray(ids, np.int64)) for ids in task.empty_ids)
    loss = train_lora.text_to_image_loss(components, train_lora.schedule_to_torch(task.schedule),
                                         train_lora.batch_to_tensors(batch, slice(None), "cpu"), draws,
                                         empty_ids=empty_ids, caption_dropout_prob=0.5,
                                         prediction_type=task.prediction_type)
    loss.backward()

    np.testing.assert_allclose(loss.item(), float(expected_loss), rtol=LOSS_RTOL, atol=0)
    flat_grads = {tuple(str(part) for part in path): value for path, value in nnx.to_flat_state(grads)}
    for path in layers:
        peft = components.unet.get_submodule(path)
        prefix = ("unet", *path.split("."))
        for name, torch_weight in (("lora_A", peft.lora_A[train_lora.ADAPTER_NAME].weight),
                                   ("lora_B", peft.lora_B[train_lora.ADAPTER_NAME].weight)):
            expected = np.asarray(flat_grads[(*prefix, name)].get_value()).T  # [in, r] -> [r, in]
            assert np.abs(expected).max() > 0, f"{path}.{name} has no gradient in jaxgen"
            assert_close_to_scale(torch_weight.grad.numpy(), expected, GRAD_RTOL, f"{path}.{name}")


# ---- the training run ------------------------------------------------------------------------------------------


def test_reference_run_outputs(reference_run):
    workdir = reference_run.workdir
    assert sorted(read_losses(workdir)) == list(range(1, NUM_STEPS + 1))
    assert checkpoint_steps(workdir) == [NUM_STEPS - CHECKPOINT_EVERY, NUM_STEPS]
    assert sorted(p.name for p in (workdir / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert not list(workdir.glob(".lora.partial-*"))
    # The checkpoint contains the adapters and nothing else.
    weights = load_file(workdir / "checkpoints" / str(NUM_STEPS) / train_state.MODEL_FILE)
    assert len(weights) == 2 * NUM_ADAPTED_LAYERS
    assert all(".lora_A." in name or ".lora_B." in name for name in weights)
    state = torch.load(workdir / "checkpoints" / str(NUM_STEPS) / train_state.TRAINING_STATE_FILE, weights_only=True)
    assert state["step"] == NUM_STEPS
    assert sorted(state["parameter_names"]) == sorted(weights)


def test_only_adapters_trained(reference_run, base):
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    from torch_npu_backend.attention import NPUAttnProcessor

    unet = reference_run.components.unet
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * NUM_ADAPTED_LAYERS
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    for module in (reference_run.components.vae, *reference_run.components.text_encoders):
        assert not any(p.requires_grad for p in module.parameters())
    # set_attn_processor replaced the processors and kept peft's layers in the projections they call.
    processors = unet.attn_processors
    assert processors and all(isinstance(processor, NPUAttnProcessor) for processor in processors.values())
    assert sum(isinstance(module, LoraLayer) for module in unet.modules()) == NUM_ADAPTED_LAYERS

    # The base weights are those of the folder. peft moved each adapted layer's weights to base_layer.
    original = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    trained = {name.replace(".base_layer.", "."): value for name, value in unet.state_dict().items()
               if ".lora_" not in name}
    assert sorted(trained) == sorted(original)
    for name, value in original.items():
        assert torch.equal(trained[name], value), name
    lora_B = [p for name, p in unet.named_parameters() if ".lora_B." in name]
    assert all(float(p.detach().abs().max()) > 0 for p in lora_B), "an adapter's lora_B stayed at zero"


def test_stopped_run_resumes_with_same_losses(reference_run, tmp_path, caplog):
    """A copy of the run folder cut back to an earlier checkpoint continues to the same losses and adapters."""
    workdir = tmp_path / "resumed"
    shutil.copytree(reference_run.workdir, workdir)
    # What a run killed after the first checkpoint leaves: later metrics lines, no later checkpoint.
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    shutil.rmtree(workdir / "lora")
    with torch_threads(1), caplog.at_level("INFO", logger="torch_npu_backend.train"):
        resumed = train_lora.LoRATrainingRun(reference_run.config, workdir, cpu_process())
        assert resumed.run() == workdir
    # A restart from step 0 would log the same losses, so the log must show the resume.
    assert f"resumed from the checkpoint of step {NUM_STEPS - CHECKPOINT_EVERY}" in caplog.text
    expected, losses = read_losses(reference_run.workdir), read_losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    for step, loss in expected.items():
        np.testing.assert_allclose(losses[step], loss, rtol=RESUME_RTOL, atol=0, err_msg=f"step {step}")
    final = f"checkpoints/{NUM_STEPS}/{train_state.MODEL_FILE}"
    resumed_weights, expected_weights = load_file(workdir / final), load_file(reference_run.workdir / final)
    for name, value in expected_weights.items():
        np.testing.assert_allclose(resumed_weights[name].numpy(), value.numpy(), rtol=RESUME_RTOL, atol=1e-8,
                                   err_msg=name)


def test_two_process_run_matches_one_process(reference_run, base, tmp_path, compile_cache, data_dir):
    workdir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "torch_npu_backend.train", *cli_args(workdir, base, data_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=torch_env(compile_cache), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) of 1 examples each" in result.stderr
    expected, losses = read_losses(reference_run.workdir), read_losses(workdir)
    assert sorted(losses) == sorted(expected)
    for step, loss in losses.items():
        np.testing.assert_allclose(loss, expected[step], rtol=DDP_RTOL, atol=0, err_msg=f"step {step}")


def test_unsupported_task_rejected():
    with pytest.raises(ValueError, match=r"task 'classifier' has no torch training job.*'diffusion', "
                                         r"'text_to_image_lora'"):
        torch_train.training_run_class("classifier")


def test_non_linear_target_rejected(base, reference_run):
    # The reference run wrote the base. conv1 of the U-Net's resnets is a Conv2d.
    model = dataclasses.replace(reference_run.config.model, target_modules=("to_q", "conv1"))
    with pytest.raises(ValueError, match=r"LoRA supports Linear layers only.*resnets\.0\.conv1 \(Conv2d\)"):
        train_lora.load_lora_components(base, model)


def test_cli_export_jaxgen_rejected_for_lora(caplog, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main() sets it when unset, and monkeypatch restores it
    assert torch_train.main(["--cfg", "sdxl_lora", "--cfg-arg", "tiny", "--export-jaxgen", "out"]) == 2
    assert "--export-jaxgen converts diffusion checkpoints, not task 'text_to_image_lora'" in caplog.text


# ---- the LoRA file in jaxgen and diffusers ---------------------------------------------------------------------


def unet_inputs(unet_config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "sample": rng.standard_normal((2, 4, 4, unet_config.in_channels)).astype(np.float32),  # [B, h, w, C]
        "timestep": np.array([10, 600]),
        "context": rng.standard_normal((2, 7, unet_config.cross_attention_dim)).astype(np.float32),  # [B, L, E]
        "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
        "time_ids": np.array([[32, 32, 0, 0, 32, 32], [48, 96, 0, 8, 32, 32]], np.float32),
    }


def torch_unet_output(unet: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    added = {key: torch.from_numpy(inputs[key]) for key in ("text_embeds", "time_ids")}
    with torch.no_grad():
        out = unet(torch.from_numpy(inputs["sample"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["timestep"]),
                   encoder_hidden_states=torch.from_numpy(inputs["context"]), added_cond_kwargs=added)
    return out.sample.permute(0, 2, 3, 1).numpy()


def test_lora_file_matches_torch_unet(reference_run, base):
    """The LoRA file loads into jaxgen's and diffusers' U-Nets, which then both match the trained peft U-Net."""
    from conversion.diffusers_io import load_unet
    from conversion.lora_io import load_lora_weights

    workdir = reference_run.workdir
    unet = reference_run.components.unet.eval()
    # optim.ema_decay is 0 in the LoRA configs, so the file's EMA adapters are the trained ones.
    assert reference_run.config.optim.ema_decay == 0.0
    checkpoint = train_state.CheckpointStore(workdir, max_to_keep=1).restore(NUM_STEPS)
    for name, value in checkpoint.model.items():
        assert torch.equal(checkpoint.ema[name], value), name

    inputs = unet_inputs(unet.config)
    expected = torch_unet_output(unet, inputs)
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32)
    base_output = torch_unet_output(reference.unet, inputs)
    # Measured: the trained adapters change the output by 2% of its largest magnitude.
    assert np.abs(expected - base_output).max() > 100 * OUTPUT_RTOL * np.abs(expected).max(), \
        "the trained adapters barely change the U-Net's output"
    reference.load_lora_weights(workdir / "lora")
    assert_close_to_scale(torch_unet_output(reference.unet, inputs), expected, OUTPUT_RTOL, "diffusers output")

    jax_unet = load_unet(base / "unet")
    result = load_lora_weights(workdir / "lora", {"unet": jax_unet})
    assert len(result.adapted["unet"]) == NUM_ADAPTED_LAYERS
    with safe_open(workdir / "lora" / "pytorch_lora_weights.safetensors", framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (reference_run.config.model.rank,
                                                                 reference_run.config.model.alpha)

    graphdef, state = nnx.split(jax_unet)
    arrays = {key: jnp.asarray(value) for key, value in inputs.items()}

    def forward(state, arrays):
        model = nnx.merge(graphdef, state)
        return model(arrays["sample"], arrays["timestep"], arrays["context"], text_embeds=arrays["text_embeds"],
                     time_ids=arrays["time_ids"])

    output = jax.jit(forward).lower(state, arrays).compile(FAST_COMPILE)(state, arrays)
    assert_close_to_scale(np.asarray(output), expected, OUTPUT_RTOL, "jaxgen output")

