"""LoRA fine-tuning from the command line (configs/sd_lora.py, configs/sdxl_lora.py) on tiny random pipelines.

The runs use the `tiny` presets: 32x32 images of the built-in digit caption folder in one bucket, and a
tiny random base pipeline that the first run writes on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, jaxgen_env, run_module, train_args
from jaxgen import config as config_lib
from test_train import checkpoint_steps, read_losses

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

# Short runs at a high learning rate, so that the adapters move far from zero and the loss visibly drops.
NUM_STEPS = 100
PROMPT = "a handwritten digit three in red on a white background, in the centre"
SD_OVERRIDES = ("--set", f"train.num_steps={NUM_STEPS}", "--set", "train.checkpoint_every=25",
                "--set", "optim.learning_rate=1e-2", "--set", "data.batch_size=4")
# Only the uninterrupted run draws samples, because sampling settings do not change the training losses and
# the first generation of a process compiles for about 25 s (2-core CPU).
SAMPLE_OVERRIDES = ("--set", f"sample.prompts=({PROMPT!r},)", "--set", "sample.num_steps=2")
# fp32 U-Net outputs of jaxgen and diffusers on the same weights and adapters differed by at most 1e-6,
# with outputs up to about 1 (2-core x86 CPU, jax 0.10.2, torch 2.13.0, diffusers 0.42.1, peft 0.21.2).
UNET_ATOL = 2e-5
UNET_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: pathlib.Path
    base: pathlib.Path  # the random base pipeline folder
    stderr: str  # the run's log, or while it runs in the background the path of the log file


def lora_args(cfg: str, workdir: pathlib.Path, base: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list[str]:
    return train_args(cfg, workdir, data_dir, "--set", f"model.random_base_dir={base}", *extra)


@pytest.fixture(scope="module")
def sdxl_process(tmp_path_factory, compile_cache):
    """Start the SDXL run in the background; XLA compiles on one thread, so it overlaps the SD runs' compilation.

    It has its own data folder, because two processes that prepare one data set at once could collide.
    """
    root = tmp_path_factory.mktemp("sdxl_lora")
    run = Run(root / "run", root / "tiny_sdxl_base", str(root / "stderr.txt"))
    args = lora_args("sdxl_lora", run.workdir, run.base, root / "tfds", "--set", "optim.learning_rate=1e-2")
    with open(run.stderr, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "jaxgen.train", *args], cwd=REPO_ROOT,
                                   env=jaxgen_env(compile_cache), stdout=subprocess.DEVNULL, stderr=stderr)
    yield process, run
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def sdxl_run(sdxl_process) -> Run:
    process, run = sdxl_process
    returncode = process.wait(timeout=600)
    stderr = pathlib.Path(run.stderr).read_text()
    assert returncode == 0, f"the SDXL run exited {returncode}:\n{stderr[-4000:]}"
    return dataclasses.replace(run, stderr=stderr)


@pytest.fixture(scope="module")
def sd_run(sdxl_process, tmp_path_factory, compile_cache, data_dir) -> Run:
    """An SD LoRA run whose random base pipeline does not exist yet, so the run writes it."""
    root = tmp_path_factory.mktemp("sd_lora")
    base, workdir = root / "tiny_sd_base", root / "reference"
    result = run_module("jaxgen.train", lora_args("sd_lora", workdir, base, data_dir, *SD_OVERRIDES,
                                                  *SAMPLE_OVERRIDES), jaxgen_env(compile_cache))
    return Run(workdir, base, result.stderr)


def folder_digest(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---- configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, xl", [("sd_lora", False), ("sdxl_lora", True)])
def test_lora_configs_load(cfg, xl):
    config = config_lib.load_config(cfg, ["model.pretrained=/models/base"], arg="tiny")
    assert config.task == "text_to_image_lora"
    assert config.model.xl is xl
    assert config.model.pretrained == "/models/base"
    assert config.data.image_size == 32
    with pytest.raises(config_lib.ConfigError, match="unknown .* preset"):
        config_lib.load_config(cfg, arg="huge")


def test_lora_config_rejects_bad_rank():
    with pytest.raises(config_lib.ConfigError, match="model.rank"):
        config_lib.load_config("sd_lora", ["model.rank=0"])


def test_sdxl_time_ids_order():
    from jaxgen.tasks_text_to_image import sdxl_time_ids

    time_ids = sdxl_time_ids(jnp.asarray([[24, 48], [48, 24]]), jnp.asarray([[0, 8], [8, 0]]), (48, 80))
    expected = np.asarray([[24, 48, 0, 8, 48, 80], [48, 24, 8, 0, 48, 80]], np.float32)
    np.testing.assert_array_equal(np.asarray(time_ids), expected)


# ---- training runs -------------------------------------------------------------------------------------------


def test_tiny_run_writes_lora_and_samples(sd_run):
    losses = read_losses(sd_run.workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(v) for v in losses.values())
    assert checkpoint_steps(sd_run.workdir)[-1] == NUM_STEPS
    assert (sd_run.workdir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (sd_run.workdir / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert (sd_run.workdir / "samples" / f"step_{NUM_STEPS:06d}.png").is_file()


def test_random_base_written_and_logged(sd_run):
    assert (sd_run.base / "model_index.json").is_file()
    assert "no pretrained weights" in sd_run.stderr
    assert "model.pretrained=PATH" in sd_run.stderr


def test_loss_decreases_at_high_learning_rate(sd_run):
    losses = read_losses(sd_run.workdir)
    first = np.mean([losses[step] for step in range(1, 21)])
    last = np.mean([losses[step] for step in range(NUM_STEPS - 19, NUM_STEPS + 1)])
    assert last < 0.95 * first, f"mean loss of the first 20 steps {first:.4f}, of the last 20 steps {last:.4f}"


def test_checkpoint_holds_only_adapters(sd_run):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(sd_run.workdir / "checkpoints", item_names=("state", "meta"))
    try:
        restored = manager.restore(NUM_STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                       meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    params = jax.tree_util.tree_flatten_with_path(restored.state["params"])[0]
    paths = [jax.tree_util.keystr(path) for path, _ in params]
    # lora_A and lora_B of 32 projections: four transformer blocks (one down, one mid, two up), each with
    # attn1 and attn2 of four projections.
    assert len(paths) == 2 * 32
    non_adapters = [path for path in paths if "'lora_A'" not in path and "'lora_B'" not in path]
    assert not non_adapters
    assert all(path.startswith("['unet']") for path in paths)
    # AdamW keeps two moments per trained value; its step counts and schedule state are scalars.
    num_values = sum(np.size(value) for _, value in params)
    moments = [np.size(leaf) for leaf in jax.tree.leaves(restored.state["opt_state"]) if np.ndim(leaf) > 0]
    assert sum(moments) == 2 * num_values


def test_killed_run_resumes_with_same_losses(sd_run, tmp_path, compile_cache, data_dir):
    """A run killed with SIGKILL and restarted logs the same loss at every step as one uninterrupted run."""
    env = jaxgen_env(compile_cache)
    base_digest = folder_digest(sd_run.base)
    interrupted = tmp_path / "interrupted"
    args = lora_args("sd_lora", interrupted, sd_run.base, data_dir, *SD_OVERRIDES)
    process = subprocess.Popen([sys.executable, "-m", "jaxgen.train", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint_steps(interrupted) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_steps(interrupted)
    assert killed_at, "the run was killed before it wrote a checkpoint"
    assert killed_at[-1] < NUM_STEPS, "the run finished before it could be killed; raise NUM_STEPS"

    run_module("jaxgen.train", args, env)
    expected, resumed = read_losses(sd_run.workdir), read_losses(interrupted)
    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
    for step in expected:
        np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-6, atol=0, err_msg=f"step {step}")
    assert folder_digest(sd_run.base) == base_digest, "training changed the base pipeline folder"


# ---- the LoRA file in jaxgen and diffusers -------------------------------------------------------------------


def unet_inputs(xl: bool, cross_attention_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),  # [B, h, w, C]
        "timestep": np.array([10, 600]),
        "context": rng.standard_normal((2, 7, cross_attention_dim)).astype(np.float32),  # [B, L, E]
    }
    if xl:
        inputs["text_embeds"] = rng.standard_normal((2, 32)).astype(np.float32)
        inputs["time_ids"] = np.array([[32, 32, 0, 0, 32, 32], [48, 96, 0, 8, 32, 32]], np.float32)
    return inputs


def diffusers_unet_output(unet, inputs) -> np.ndarray:
    added = {key: torch.from_numpy(inputs[key]) for key in ("text_embeds", "time_ids") if key in inputs}
    with torch.no_grad():
        out = unet(torch.from_numpy(inputs["sample"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["timestep"]),
                   torch.from_numpy(inputs["context"]), added_cond_kwargs=added or None)
    return out.sample.permute(0, 2, 3, 1).numpy()


def jaxgen_unet_output(unet, inputs) -> np.ndarray:
    added = {key: jnp.asarray(inputs[key]) for key in ("text_embeds", "time_ids") if key in inputs}
    # Compiled as one program: the op-by-op first call of the U-Net takes about three times longer.
    forward = nnx.jit(lambda model, sample, timestep, context, added: model(sample, timestep, context, **added))
    return np.asarray(forward(unet, jnp.asarray(inputs["sample"]), jnp.asarray(inputs["timestep"]),
                              jnp.asarray(inputs["context"]), added))


@pytest.mark.parametrize("name, xl, num_layers", [("sd", False, 32), ("sdxl", True, 64)])
def test_lora_file_matches_diffusers(name, xl, num_layers, request):
    from conversion.diffusers_io import load_unet
    from conversion.lora_io import load_lora_weights

    run = request.getfixturevalue(f"{name}_run")
    lora_folder = run.workdir / "lora"
    pipeline_class = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    reference = pipeline_class.from_pretrained(run.base, dtype=torch.float32)
    inputs = unet_inputs(xl, reference.unet.config.cross_attention_dim)
    expected_base = diffusers_unet_output(reference.unet, inputs)
    reference.load_lora_weights(lora_folder)
    expected = diffusers_unet_output(reference.unet, inputs)

    unet = load_unet(run.base / "unet")
    result = load_lora_weights(lora_folder, {"unet": unet})
    assert len(result.adapted["unet"]) == num_layers
    output = jaxgen_unet_output(unet, inputs)

    assert np.abs(expected - expected_base).max() > 100 * UNET_ATOL, "the trained LoRA barely changes the output"
    np.testing.assert_allclose(output, expected, atol=UNET_ATOL, rtol=UNET_RTOL)


def test_sdxl_tiny_run_finishes(sdxl_run):
    losses = read_losses(sdxl_run.workdir)
    assert sorted(losses) == list(range(1, 7))
    assert all(np.isfinite(v) for v in losses.values())
    assert checkpoint_steps(sdxl_run.workdir)[-1] == 6


# ---- folder errors -------------------------------------------------------------------------------------------


def test_pretrained_folder_of_other_kind_rejected(sd_run, sdxl_run):
    from jaxgen.pipelines import PipelineFolderError
    from jaxgen.tasks_text_to_image import resolve_base_folder

    with pytest.raises(PipelineFolderError, match="text_encoder_2"):
        resolve_base_folder(config_lib.LoRAModelConfig(pretrained=str(sd_run.base), xl=True))
    with pytest.raises(ValueError, match="set model.xl=True"):
        resolve_base_folder(config_lib.LoRAModelConfig(pretrained=str(sdxl_run.base), xl=False))


def test_missing_pretrained_folder_exit_code(tmp_path, compile_cache, data_dir):
    result = run_module("jaxgen.train", train_args("sd_lora", tmp_path / "run", data_dir, "--set",
                                                   f"model.pretrained={tmp_path / 'nowhere'}"),
                        jaxgen_env(compile_cache), check=False)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
