"""Tests of the PyTorch training entry point: the torch twin, the loss, the optimizer, DDP, resume and export.

All runs use the tiny preset of configs/ddpm_digits.py on the CPU with one thread per process, so a run in
this process and one in a subprocess do the same arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from conftest import REPO_ROOT, jaxgen_env
from conversion.diffusers_io import abstract_model
from conversion.rules import nnx_to_torch, torch_shapes
from jaxgen import checkpoint as jaxgen_checkpoint
from jaxgen import config as config_lib
from jaxgen import trainer
from jaxgen.data import BatchLoader, load_digits_split
from jaxgen.diffusion import forward
from jaxgen.sampling import schedule_from_config
from torch_npu_backend import diffusion, models
from torch_npu_backend import train as torch_train
from torch_npu_backend import train_state

NUM_STEPS = 30
CHECKPOINT_EVERY = 5
# Two processes each see half of the batch, so convolutions and the gradient all-reduce sum in another order.
# Measured: the losses of 30 steps differ by at most 3e-7 relative.
DDP_RTOL = 1e-5
# A resumed run repeats the arithmetic of an uninterrupted one with the same thread count.
RESUME_RTOL = 1e-6
# One float32 step of jaxgen and torch from the same weights and inputs. Measured: losses within 2e-7
# relative, and gradients within 6.3e-6 of each tensor's largest magnitude.
LOSS_RTOL = 1e-5
GRAD_RTOL = 5e-5
# Model outputs of jaxgen and torch from the same trained weights, relative to the largest output magnitude.
# Measured: 5e-7.
OUTPUT_RTOL = 1e-5


def tiny_overrides(data_dir: pathlib.Path) -> list[str]:
    return [f"data.data_dir={data_dir}", f"train.num_steps={NUM_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}"]


def tiny_config(data_dir: pathlib.Path, *extra: str) -> config_lib.Config:
    return config_lib.load_config("ddpm_digits", [*tiny_overrides(data_dir), *extra], arg="tiny")


def cli_args(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
    args = ["--cfg", "ddpm_digits", "--cfg-arg", "tiny", "--workdir", str(workdir), "--device", "cpu"]
    for override in tiny_overrides(data_dir):
        args += ["--set", override]
    return args


def torch_env(compile_cache: pathlib.Path) -> dict[str, str]:
    env = jaxgen_env(compile_cache)
    env.update(OMP_NUM_THREADS="1")
    return env


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch on `count` threads inside the block, as a subprocess with OMP_NUM_THREADS=count does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return train_state.CheckpointStore(workdir, max_to_keep=1).steps()


def random_jaxgen_state(config: config_lib.Config, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Return the jaxgen model of `config` with normal random weights, without running its initialisers."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(abstract_model(lambda rngs: models.build_jaxgen_model(config, rngs)))
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        if isinstance(variable, nnx.Param):
            shape = variable.get_value().shape
            variable = variable.replace(jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32))
        flat.append((path, variable))
    return graphdef, nnx.from_flat_state(flat)


def first_batch(config: config_lib.Config) -> dict[str, np.ndarray]:
    images, labels = load_digits_split(config.data.data_dir, "train", image_size=config.data.image_size)
    return next(BatchLoader({"image": images, "label": labels}, config.data.batch_size, seed=config.data.seed))


def assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, rtol: float, name: str,
                          floor: float = 1e-30) -> None:
    """Check |actual - expected| <= rtol * max(max|expected|, floor) elementwise."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(scale, floor), err_msg=name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> pathlib.Path:
    """Train the tiny model once, uninterrupted and in one process."""
    workdir = tmp_path_factory.mktemp("torch_runs") / "reference"
    with torch_threads(1):
        torch_train.train(tiny_config(data_dir), workdir=workdir, device="cpu")
    return workdir


# ---- the torch twin ----------------------------------------------------------------------------------------


def test_twin_keys_equal_jaxgen_torch_keys(data_dir):
    config = tiny_config(data_dir)
    twin = models.build_torch_model(config)
    _, jaxgen_state = nnx.split(abstract_model(lambda rngs: models.build_jaxgen_model(config, rngs)))
    expected = torch_shapes(jaxgen_state)
    shapes = {key: tuple(value.shape) for key, value in twin.state_dict().items()}
    assert sorted(shapes) == sorted(expected)
    assert shapes == expected


def test_twin_round_trip_exact(data_dir):
    config = tiny_config(data_dir)
    _, state = random_jaxgen_state(config, seed=1)
    twin = models.build_torch_model(config)
    models.load_jaxgen_state(twin, state)
    back = nnx.state(models.jaxgen_model_from_torch(twin.state_dict(), config), nnx.Param)
    original = dict(nnx.to_flat_state(state))
    returned = dict(nnx.to_flat_state(back))
    assert sorted(returned) == sorted(original)
    for path, variable in original.items():
        np.testing.assert_array_equal(np.asarray(returned[path].get_value()), np.asarray(variable.get_value()),
                                      err_msg=str(path))


def test_unregistered_config_rejected(data_dir):
    config = config_lib.load_config("digit_classifier", [f"data.data_dir={data_dir}"], arg="tiny")
    with pytest.raises(ValueError, match=r"no torch model is registered for task 'classifier'.*'diffusion'"):
        models.build_torch_model(config)


# ---- loss and one train step against jaxgen --------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type, min_snr_gamma",
                         [("epsilon", None), ("v_prediction", None), ("sample", None), ("epsilon", 5.0),
                          ("v_prediction", 5.0), ("sample", 5.0)])
def test_diffusion_loss_matches_jaxgen(prediction_type, min_snr_gamma):
    config = config_lib.load_config("ddpm_digits", ["diffusion.schedule=squaredcos_cap_v2"])
    rng = np.random.default_rng(0)
    x0, noise, output = (rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(3))  # [B, C, H, W]
    t = np.array([0, 10, 500, 999])
    jax_schedule, torch_schedule = schedule_from_config(config), diffusion.schedule_from_config(config)

    def to_jax(x):
        return jnp.asarray(x.transpose(0, 2, 3, 1))

    expected_x_t = forward.q_sample(jax_schedule, to_jax(x0), jnp.asarray(t), to_jax(noise))
    x_t = diffusion.q_sample(torch_schedule, torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(noise))
    np.testing.assert_allclose(x_t.numpy().transpose(0, 2, 3, 1), np.asarray(expected_x_t), rtol=1e-6, atol=1e-6)

    expected = forward.diffusion_loss(jax_schedule, to_jax(output), to_jax(x0), to_jax(noise), jnp.asarray(t),
                                      prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)
    loss = diffusion.diffusion_loss(torch_schedule, torch.from_numpy(output), torch.from_numpy(x0),
                                    torch.from_numpy(noise), torch.from_numpy(t), prediction_type=prediction_type,
                                    min_snr_gamma=min_snr_gamma)
    np.testing.assert_allclose(loss.numpy(), np.asarray(expected), rtol=1e-6, atol=0)


def test_schedule_equals_jaxgen():
    config = config_lib.load_config("ddpm_digits", ["diffusion.rescale_zero_terminal_snr=true"])
    expected = np.asarray(schedule_from_config(config).alphas_cumprod)
    np.testing.assert_array_equal(diffusion.schedule_from_config(config).alphas_cumprod.numpy(), expected)


def test_drop_labels_uses_null_label():
    labels = torch.tensor([1, 2, 3, 4])
    uniform = torch.tensor([0.05, 0.5, 0.0999, 0.1])
    assert diffusion.drop_labels(labels, 10, 0.1, uniform).tolist() == [10, 2, 10, 4]
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\]"):
        diffusion.drop_labels(labels, 10, 1.5, uniform)


def test_noise_draw_independent_of_step_order():
    first = diffusion.draw_noise(diffusion.step_generator(0, 7), 4, (1, 2, 2), 1000)
    diffusion.draw_noise(diffusion.step_generator(0, 3), 4, (1, 2, 2), 1000)
    again = diffusion.draw_noise(diffusion.step_generator(0, 7), 4, (1, 2, 2), 1000)
    other_seed = diffusion.draw_noise(diffusion.step_generator(1, 7), 4, (1, 2, 2), 1000)
    assert torch.equal(first.noise, again.noise)
    assert torch.equal(first.timesteps, again.timesteps)
    assert not torch.equal(first.noise, other_seed.noise)


def test_train_step_matches_jaxgen(data_dir):
    """Same weights, batch, noise, timesteps and labels: same loss and gradients in both backends (float32)."""
    config = tiny_config(data_dir)
    graphdef, params = random_jaxgen_state(config, seed=2)
    twin = models.build_torch_model(config)
    models.load_jaxgen_state(twin, params)

    batch = first_batch(config)  # channels-last, as the jaxgen trainer reads it
    draws = diffusion.draw_noise(diffusion.step_generator(0, 0), config.data.batch_size, (1, 16, 16), 1000)
    # A drop probability of 0.5 puts both real and null labels into the batch.
    labels = diffusion.drop_labels(torch.from_numpy(batch["label"]).long(), twin.null_label, 0.5, draws.drop_uniform)
    assert 0 < int((labels == twin.null_label).sum()) < config.data.batch_size

    loss = diffusion.training_loss(twin, diffusion.schedule_from_config(config),
                                   torch.from_numpy(batch["image"]).permute(0, 3, 1, 2), labels, draws.noise,
                                   draws.timesteps)
    loss.backward()

    jax_schedule = schedule_from_config(config)

    @jax.jit
    def jax_loss(params, images, noise, t, labels):
        model = nnx.merge(graphdef, params)
        x_t = forward.q_sample(jax_schedule, images, t, noise)
        return forward.diffusion_loss(jax_schedule, model(x_t, t, labels), images, noise, t).mean()

    expected_loss, grads = jax.value_and_grad(jax_loss)(
        params, jnp.asarray(batch["image"]), jnp.asarray(draws.noise.permute(0, 2, 3, 1).numpy()),
        jnp.asarray(draws.timesteps.numpy(), jnp.int32), jnp.asarray(labels.numpy(), jnp.int32))
    np.testing.assert_allclose(loss.item(), float(expected_loss), rtol=LOSS_RTOL, atol=0)
    expected_grads = nnx_to_torch(grads)
    torch_grads = {name: p.grad.numpy() for name, p in twin.named_parameters()}
    assert sorted(torch_grads) == sorted(expected_grads)
    # The cross-attention over one label token ignores its queries, so the norm before it gets a gradient of
    # exactly 0 in jaxgen and about 1e-13 in torch. Measure such tensors against the largest gradient.
    largest = max(float(np.abs(grad).max()) for grad in expected_grads.values())
    for name, grad in torch_grads.items():
        assert_close_to_scale(grad, expected_grads[name], GRAD_RTOL, name, floor=1e-6 * largest)


# ---- optimizer, learning rate and EMA against jaxgen's optax chain --------------------------------------------


@pytest.mark.parametrize("overrides", [
    ["optim.warmup_steps=3"],
    ["optim.warmup_steps=0"],
    ["optim.warmup_steps=2", "optim.decay_steps=8", "optim.end_learning_rate_fraction=0.0"],
])
def test_learning_rate_matches_optax(overrides):
    config = config_lib.load_config("ddpm_digits", [*overrides, "train.num_steps=12"])
    optim = config.optim
    decay_steps = optim.decay_steps or 12
    reference = optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, optim.warmup_steps, max(decay_steps, optim.warmup_steps + 1),
        optim.learning_rate * optim.end_learning_rate_fraction)
    for count in range(16):
        np.testing.assert_allclose(optim.learning_rate * train_state.learning_rate_factor(count, optim, 12),
                                   float(reference(count)), rtol=1e-6, atol=1e-12, err_msg=f"count {count}")


def test_optimizer_matches_jaxgen():
    """AdamW, the schedule, weight decay and clipping: six updates from the same gradients in both backends."""
    config = config_lib.load_config("ddpm_digits", ["optim.warmup_steps=2", "optim.weight_decay=0.1",
                                                    "optim.grad_clip_norm=2.0", "train.num_steps=6"])
    rng = np.random.default_rng(0)
    initial = {"w": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    # Gradient norms alternate below and above grad_clip_norm, so both branches of the clipping run.
    grad_sequence = [{k: (0.1 if i % 2 else 3.0) * rng.standard_normal(v.shape).astype(np.float32)
                      for k, v in initial.items()} for i in range(6)]

    tx = trainer.make_optimizer(config.optim, config.train.num_steps)
    jax_params = {k: jnp.asarray(v) for k, v in initial.items()}
    opt_state = tx.init(jax_params)
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in initial.items()}
    optimizer, scheduler = train_state.make_optimizer(torch_params.values(), config.optim, config.train.num_steps)
    for grads in grad_sequence:
        updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, opt_state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for name, param in torch_params.items():
            param.grad = torch.from_numpy(grads[name].copy())
        norm = train_state.clip_grad_global_norm_(torch_params.values(), config.optim.grad_clip_norm)
        np.testing.assert_allclose(norm.item(), float(optax.tree.norm(grads)), rtol=1e-6)
        optimizer.step()
        scheduler.step()
    # Measured: the parameters differ by at most 3.6e-7, and the updates moved them by up to 5e-3.
    for name, param in torch_params.items():
        np.testing.assert_allclose(param.detach().numpy(), np.asarray(jax_params[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert not np.allclose(np.asarray(jax_params["w"]), initial["w"], rtol=0, atol=1e-3)


def test_resume_takes_optimizer_settings_from_config():
    config = config_lib.load_config("ddpm_digits", ["optim.warmup_steps=2", "train.num_steps=10"])
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer, scheduler = train_state.make_optimizer([parameter], config.optim, 10)
    for _ in range(3):
        parameter.grad = torch.full((3,), 0.5)
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    changed = config_lib.load_config("ddpm_digits", ["optim.warmup_steps=2", "train.num_steps=10",
                                                     "optim.learning_rate=5e-4", "optim.b1=0.8",
                                                     "optim.weight_decay=0.01"])
    restored, restored_scheduler = train_state.make_optimizer([parameter], changed.optim, 10)
    train_state.load_optimizer_state(restored, restored_scheduler, saved, changed.optim)
    group = restored.param_groups[0]
    expected_lr = 5e-4 * train_state.learning_rate_factor(3, changed.optim, 10)
    assert group["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert restored_scheduler.get_last_lr() == [group["lr"]]
    assert group["betas"] == (0.8, config.optim.b2)
    assert group["weight_decay"] == 0.01
    assert torch.equal(restored.state[parameter]["exp_avg"], optimizer.state[parameter]["exp_avg"])
    restored_scheduler.step()
    assert group["lr"] == pytest.approx(5e-4 * train_state.learning_rate_factor(4, changed.optim, 10), rel=1e-12)


def test_ema_decay_matches_jaxgen():
    for step in (0, 1, 10, 5000):
        np.testing.assert_allclose(train_state.ema_decay(step, 0.999),
                                   float(trainer.ema_decay(jnp.int32(step), 0.999)), rtol=1e-6)


# ---- checkpoints, distributed training and resume ---------------------------------------------------------------


def test_partial_checkpoint_ignored(tmp_path):
    store = train_state.CheckpointStore(tmp_path, max_to_keep=2)
    weights = {"w": torch.ones(2)}
    store.save(train_state.Checkpoint(5, weights, weights, {"step": 5}))
    (store.directory / "7").mkdir()  # a step folder without the checkpoint files is skipped too
    partial = store.directory / ".tmp-10-1234"
    partial.mkdir()
    (partial / train_state.MODEL_FILE).write_bytes(b"cut off")
    assert store.latest_step() == 5
    store.remove_partial()
    assert not partial.exists()


def test_reference_run_outputs(reference_run):
    assert sorted(read_losses(reference_run)) == list(range(1, NUM_STEPS + 1))
    assert checkpoint_steps(reference_run) == [NUM_STEPS - CHECKPOINT_EVERY, NUM_STEPS]
    state = torch.load(reference_run / "checkpoints" / str(NUM_STEPS) / train_state.TRAINING_STATE_FILE,
                       weights_only=True)
    assert state["step"] == NUM_STEPS
    assert state["loader"] == {"epoch": 0, "position": NUM_STEPS * 16}
    assert (reference_run / "config.json").is_file()


def test_two_process_run_matches_one_process(reference_run, tmp_path, compile_cache, data_dir):
    workdir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "torch_npu_backend.train", *cli_args(workdir, data_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=torch_env(compile_cache), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) of 8 examples each" in result.stderr
    expected, losses = read_losses(reference_run), read_losses(workdir)
    assert sorted(losses) == sorted(expected)
    for step, loss in losses.items():
        np.testing.assert_allclose(loss, expected[step], rtol=DDP_RTOL, atol=0, err_msg=f"step {step}")


def test_killed_run_resumes_with_same_losses(reference_run, tmp_path, compile_cache, data_dir):
    """A run killed with SIGKILL and restarted logs the same losses as the uninterrupted reference run."""
    workdir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "torch_npu_backend.train", *cli_args(workdir, data_dir)],
                               cwd=REPO_ROOT, env=torch_env(compile_cache), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint_steps(workdir) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_steps(workdir)
    assert killed_at, "the run was killed before it wrote a checkpoint"
    assert killed_at[-1] < NUM_STEPS, "the run finished before it could be killed; raise NUM_STEPS"

    with torch_threads(1):
        torch_train.train(tiny_config(data_dir), workdir=workdir, device="cpu")
    expected, resumed = read_losses(reference_run), read_losses(workdir)
    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
    for step in expected:
        np.testing.assert_allclose(resumed[step], expected[step], rtol=RESUME_RTOL, atol=0, err_msg=f"step {step}")
    final = f"checkpoints/{NUM_STEPS}/{train_state.EMA_FILE}"
    resumed_ema, expected_ema = load_file(workdir / final), load_file(reference_run / final)
    for name, value in expected_ema.items():
        np.testing.assert_allclose(resumed_ema[name].numpy(), value.numpy(), rtol=RESUME_RTOL, atol=1e-7,
                                   err_msg=name)


def test_nan_loss_stops_naming_step(tmp_path, data_dir):
    # A NaN clipping threshold turns the first update's gradients, and so every parameter, into NaN.
    config = config_lib.load_config("ddpm_digits", [f"data.data_dir={data_dir}", "optim.grad_clip_norm=nan",
                                                    "train.num_steps=4"], arg="tiny")
    with torch_threads(1), pytest.raises(trainer.NonFiniteLossError, match=r"at step 2;.*no checkpoint was written"):
        torch_train.train(config, workdir=tmp_path / "nan", device="cpu")
    assert checkpoint_steps(tmp_path / "nan") == []


def test_batch_not_divisible_by_processes_rejected(tmp_path, data_dir):
    process = torch_train.ProcessInfo(rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"data.batch_size=16 does not split over 3 processes"):
        torch_train.TorchTrainingRun(tiny_config(data_dir), tmp_path, process)


def test_cli_unknown_key_exit_code(capsys, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main() sets it when unset, and monkeypatch restores it
    assert torch_train.main(["--cfg", "ddpm_digits", "--set", "optim.learning_rat=1e-3"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


# ---- export to jaxgen ------------------------------------------------------------------------------------------


def test_export_loads_into_jaxgen_with_same_output(reference_run, tmp_path, data_dir):
    config = tiny_config(data_dir)
    exported = torch_train.export_jaxgen(config, reference_run, tmp_path / "jaxgen")
    graphdef, ema_params, rest, step = trainer.build_inference_model(config, exported, use_ema=True)
    assert step == NUM_STEPS

    twin = models.build_torch_model(config).eval()
    checkpoint = train_state.CheckpointStore(reference_run, max_to_keep=1).restore(NUM_STEPS)
    twin.load_state_dict(checkpoint.ema)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((4, 16, 16, 1)).astype(np.float32)  # [B, H, W, C]
    t = np.array([0, 250, 600, 999])
    labels = np.array([0, 4, 9, 10])
    with torch.no_grad():
        torch_out = twin(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(t),
                         torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
    jax_out = jax.jit(lambda p, x, tt, y: nnx.merge(graphdef, p, rest)(x, tt, y))(
        ema_params, jnp.asarray(images), jnp.asarray(t, jnp.int32), jnp.asarray(labels, jnp.int32))
    assert_close_to_scale(np.asarray(jax_out), torch_out, OUTPUT_RTOL, "model output")
    with pytest.raises(jaxgen_checkpoint.RunFolderError, match=rf"already has a checkpoint of step {NUM_STEPS}"):
        torch_train.export_jaxgen(config, reference_run, exported)

    # Adam's moments and step count carry over, so jaxgen.train continues the run.
    tx = trainer.make_optimizer(config.optim, config.train.num_steps)
    template = trainer.TrainState(step=jnp.int32(0), params=ema_params, ema_params=ema_params,
                                  opt_state=tx.init(ema_params))
    state, _ = jaxgen_checkpoint.restore_params(exported, jaxgen_checkpoint.abstract_like(template))
    counts = [int(count) for _, count in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")]
    assert counts == [NUM_STEPS, NUM_STEPS]  # Adam's bias correction and the learning-rate schedule
    mu = nnx_to_torch(optax.tree_utils.tree_get(state.opt_state, "mu"))
    names = checkpoint.training_state["parameter_names"]
    exp_avg = checkpoint.training_state["optimizer"]["state"]
    for index, name in enumerate(names):
        np.testing.assert_array_equal(mu[name], exp_avg[index]["exp_avg"].numpy(), err_msg=name)


# ---- mixed precision -------------------------------------------------------------------------------------------

# The first loss of a bfloat16 run against the float32 run, from the same weights and draws. bfloat16 keeps 8
# bits of mantissa, so the loss moves by about 1e-3 relative; measured: see the test's message.
BFLOAT16_LOSS_RTOL = 3e-2


def two_step_config(data_dir: pathlib.Path) -> config_lib.Config:
    overrides = [f"data.data_dir={data_dir}", "train.num_steps=2", "train.checkpoint_every=2"]
    return config_lib.load_config("ddpm_digits", overrides, arg="tiny")


def test_bfloat16_run_keeps_float32_weights(reference_run, tmp_path, data_dir):
    workdir = tmp_path / "bf16"
    with torch_threads(1):
        torch_train.train(two_step_config(data_dir), workdir=workdir, device="cpu", precision="bfloat16")

    losses = read_losses(workdir)
    expected = read_losses(reference_run)[1]
    relative = abs(losses[1] - expected) / abs(expected)
    assert relative < BFLOAT16_LOSS_RTOL, f"bfloat16 first loss {losses[1]} vs float32 {expected}"
    assert losses[1] != expected  # the forward pass really ran in bfloat16
    assert np.isfinite(losses[2])
    weights = load_file(workdir / "checkpoints" / "2" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}


def test_norms_run_in_float32_under_bfloat16(tmp_path, data_dir):
    process = torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))
    run = torch_train.TorchTrainingRun(tiny_config(data_dir), tmp_path, process, precision="bfloat16")
    seen: dict[str, torch.dtype] = {}

    def record_norm_input(module, args):
        seen.setdefault("norm input", args[0].dtype)  # a pre-hook that returns None keeps the inputs

    def record_conv_output(module, args, output):
        seen.setdefault("conv_in output", output.dtype)

    # keep_norms_in_float32's pre-hook was registered first, so this hook records the input after its cast.
    run.model.unet.down_blocks[0].resnets[0].norm1.register_forward_pre_hook(record_norm_input)
    run.model.unet.conv_in.register_forward_hook(record_conv_output)
    images = torch.zeros((2, 1, 16, 16))
    with torch.no_grad(), run.autocast():
        output = run.model(images, torch.tensor([10, 500]), torch.tensor([1, 2]))

    assert seen["conv_in output"] == torch.bfloat16
    assert seen["norm input"] == torch.float32
    assert torch.isfinite(output).all()


def test_float16_checkpoint_restores_grad_scaler(tmp_path, data_dir):
    config = two_step_config(data_dir)
    with torch_threads(1):
        torch_train.train(config, workdir=tmp_path / "fp16", device="cpu", precision="float16")
    saved = torch.load(tmp_path / "fp16" / "checkpoints" / "2" / "training_state.pt", weights_only=True)

    assert "grad_scaler" in saved
    process = torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))
    resumed = torch_train.TorchTrainingRun(config, tmp_path / "fp16", process, precision="float16")
    assert resumed.resume() == 2
    assert resumed.grad_scaler.state_dict() == saved["grad_scaler"]
    assert np.isfinite(list(read_losses(tmp_path / "fp16").values())).all()


def test_unknown_precision_rejected(tmp_path, data_dir, capsys):
    process = torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"precision 'float8' is invalid; choose one of float32, bfloat16, float16"):
        torch_train.TorchTrainingRun(tiny_config(data_dir), tmp_path, process, precision="float8")
    with pytest.raises(SystemExit):
        torch_train.parse_args(["--cfg", "ddpm_digits", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# ---- run folder safety ----------------------------------------------------------------------------------------


def test_run_folder_locked_by_live_process(tmp_path, data_dir):
    import socket

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / torch_train.LOCK_FILE).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    process = torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))

    with pytest.raises(jaxgen_checkpoint.RunFolderError, match=rf"in use by process {os.getppid()} on host"):
        torch_train.TorchTrainingRun(tiny_config(data_dir), tmp_path, process)


def test_stale_lock_replaced(tmp_path, data_dir):
    import socket

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    (tmp_path / torch_train.LOCK_FILE).write_text(f"{socket.gethostname()} {finished.stdout.strip()}\n")
    process = torch_train.ProcessInfo(rank=0, world_size=1, device=torch.device("cpu"))

    run = torch_train.TorchTrainingRun(tiny_config(data_dir), tmp_path, process)
    assert (tmp_path / torch_train.LOCK_FILE).read_text().split() == [socket.gethostname(), str(os.getpid())]
    run.release()
    assert not (tmp_path / torch_train.LOCK_FILE).exists()


def test_broken_metrics_line_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')

    jaxgen_checkpoint.truncate_metrics(path, 2)

    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_interrupted_rewrite_restores_previous_checkpoint(tmp_path):
    store = train_state.CheckpointStore(tmp_path, max_to_keep=2)
    weights = {"w": torch.ones(2)}
    store.save(train_state.Checkpoint(4, weights, weights, {"step": 4}))
    # A run killed between save's two renames leaves the old step-4 folder under its temporary name.
    os.replace(store.directory / "4", store.directory / ".tmp-stale-4-123")

    store.remove_partial()

    assert store.steps() == [4]
    assert torch.equal(store.restore(4).model["w"], weights["w"])


def test_corrupt_checkpoint_file_named(tmp_path):
    store = train_state.CheckpointStore(tmp_path, max_to_keep=2)
    weights = {"w": torch.ones(2)}
    store.save(train_state.Checkpoint(4, weights, weights, {"step": 4}))
    (store.directory / "4" / "ema.safetensors").write_bytes(b"\x00" * 12)

    with pytest.raises(train_state.CorruptCheckpointError, match=r"4/ema.safetensors is unreadable.*delete"):
        store.restore(4)


def test_changed_model_setting_named(tmp_path, data_dir):
    config = tiny_config(data_dir)
    (tmp_path / "run").mkdir()
    config_lib.save_config(config, tmp_path / "run" / jaxgen_checkpoint.CONFIG_FILE)
    changed = tiny_config(data_dir, "model.norm_num_groups=8")

    with pytest.raises(jaxgen_checkpoint.RunFolderError, match=r"model.norm_num_groups was 4, now 8.*--workdir"):
        jaxgen_checkpoint.check_run_folder(tmp_path / "run", changed)


def test_jaxgen_sample_points_torch_run_to_torch_sampler(reference_run, capsys):
    from jaxgen import sample as jaxgen_sample

    assert jaxgen_sample.main(["--run", str(reference_run)]) == 2
    assert "sample it with python -m torch_npu_backend.sample" in capsys.readouterr().err
