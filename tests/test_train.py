"""End-to-end tests of the command-line training loop, resumption and its failure modes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, jaxgen_env, run_module, train_args
from jaxgen import config as config_lib


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    """Return {step: loss} from a run's metrics.jsonl."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


# ---- configs ---------------------------------------------------------------------------------------------


def test_config_bare_name_found_in_configs():
    config = config_lib.load_config("ddpm_digits")
    assert config.task == "diffusion"
    assert config_lib.resolve_config_path("ddpm_digits.py") == REPO_ROOT / "configs" / "ddpm_digits.py"


def test_config_override_sets_typed_values():
    config = config_lib.load_config("ddpm_digits", ["optim.learning_rate=3e-4", "train.num_steps=7",
                                                    "sample.sampler=dpmpp_2m", "model.block_out_channels=(16,32,32)"])
    assert config.optim.learning_rate == pytest.approx(3e-4)
    assert config.train.num_steps == 7
    assert config.sample.sampler == "dpmpp_2m"
    assert config.model.block_out_channels == (16, 32, 32)


@pytest.mark.parametrize("raw, expected", [("true", True), ("False", False), ("yes", True), ("off", False)])
def test_config_bool_words_accepted(raw, expected):
    config = config_lib.load_config("ddpm_digits", [f"diffusion.rescale_zero_terminal_snr={raw}"])
    assert config.diffusion.rescale_zero_terminal_snr is expected


def test_config_bool_rejects_number():
    with pytest.raises(config_lib.ConfigError, match=r"expected bool"):
        config_lib.load_config("ddpm_digits", ["diffusion.rescale_zero_terminal_snr=1"])


def test_config_unknown_key_names_nearest():
    with pytest.raises(config_lib.ConfigError, match=r"did you mean 'learning_rate'"):
        config_lib.load_config("ddpm_digits", ["optim.learning_rat=1e-3"])
    with pytest.raises(config_lib.ConfigError, match=r"did you mean 'train'"):
        config_lib.load_config("ddpm_digits", ["trian.num_steps=3"])


def test_config_wrong_type_rejected():
    with pytest.raises(config_lib.ConfigError, match=r"expected int"):
        config_lib.load_config("ddpm_digits", ["train.num_steps=fast"])
    with pytest.raises(config_lib.ConfigError, match=r"key=value"):
        config_lib.load_config("ddpm_digits", ["train.num_steps"])


def test_config_missing_file_lists_available():
    with pytest.raises(config_lib.ConfigError, match=r"ddpm_digits\.py"):
        config_lib.load_config("no_such_config")


def test_config_json_round_trip(tmp_path):
    config = config_lib.load_config("ddpm_digits")
    config_lib.save_config(config, tmp_path / "config.json")
    assert config_lib.read_config(tmp_path / "config.json") == config


def test_train_cli_unknown_key_exit_code(compile_cache):
    result = run_module("jaxgen.train", ["--cfg", "ddpm_digits", "--set", "optim.warmup=3"],
                        jaxgen_env(compile_cache), check=False)
    assert result.returncode == 2
    assert "did you mean 'warmup_steps'" in result.stderr


# ---- training runs ---------------------------------------------------------------------------------------


def test_tiny_runs_write_outputs(tiny_runs):
    workdir = tiny_runs["diffusion"]
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, 7))
    assert all(np.isfinite(v) for v in losses.values())
    assert checkpoint_steps(workdir)[-1] == 6
    assert (workdir / "samples" / "step_000006.png").is_file()
    scorer_metrics = [json.loads(line) for line in (tiny_runs["scorer"] / "metrics.jsonl").read_text().splitlines()]
    assert scorer_metrics[-1]["step"] == 4


def test_killed_run_resumes_with_same_losses(tmp_path, compile_cache, data_dir):
    """A run killed with SIGKILL and restarted logs the same loss at every step as one uninterrupted run."""
    env = jaxgen_env(compile_cache)
    num_steps = 60
    extra = ("--set", f"train.num_steps={num_steps}", "--set", "train.checkpoint_every=5",
             "--set", "train.sample_every=0")
    reference = tmp_path / "reference"
    run_module("jaxgen.train", train_args("ddpm_digits", reference, data_dir, *extra), env)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxgen.train", *train_args("ddpm_digits", interrupted, data_dir, *extra)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not checkpoint_steps(interrupted) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_steps(interrupted)
    assert killed_at, "the run was killed before it wrote a checkpoint"
    assert killed_at[-1] < num_steps, "the run finished before it could be killed; raise num_steps"

    run_module("jaxgen.train", train_args("ddpm_digits", interrupted, data_dir, *extra), env)
    expected, resumed = read_losses(reference), read_losses(interrupted)
    assert sorted(resumed) == list(range(1, num_steps + 1))
    for step in expected:
        np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-6, atol=0, err_msg=f"step {step}")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, compile_cache, data_dir):
    env = jaxgen_env(compile_cache)
    workdir = tmp_path / "nan"
    run_module("jaxgen.train", train_args("digit_classifier", workdir, data_dir, "--set", "train.num_steps=2",
                                          "--set", "train.checkpoint_every=2"), env)
    assert checkpoint_steps(workdir) == [2]
    result = run_module("jaxgen.train", train_args("digit_classifier", workdir, data_dir,
                                                   "--set", "train.num_steps=6", "--set", "optim.learning_rate=nan",
                                                   "--set", "train.checkpoint_every=1"), env, check=False)
    assert result.returncode == 1
    assert "NaN" in result.stderr
    assert "step 3" in result.stderr
    assert "newest checkpoint is step 2" in result.stderr
    assert checkpoint_steps(workdir) == [2]

    import jax

    from jaxgen import checkpoint, trainer

    config = checkpoint.read_run_config(workdir)
    _, params, _, step = trainer.build_inference_model(config, workdir, use_ema=False)
    assert step == 2
    assert trainer.all_finite(params)
    assert jax.tree.leaves(params)


def test_run_folder_of_another_model_rejected(tiny_runs, compile_cache, data_dir):
    result = run_module("jaxgen.train", train_args("digit_classifier", tiny_runs["diffusion"], data_dir),
                        jaxgen_env(compile_cache), check=False)
    assert result.returncode == 1
    assert "another model" in result.stderr
    assert "train.workdir" in result.stderr


@pytest.mark.parametrize("override", ["data.batch_size=32", "data.seed=3", "train.seed=1", "diffusion.beta_end=0.03"])
def test_resume_with_other_data_settings_rejected(tmp_path, override):
    from jaxgen import checkpoint as ckpt

    saved = config_lib.load_config("ddpm_digits", [], arg="tiny")
    config_lib.save_config(saved, tmp_path / ckpt.CONFIG_FILE)
    changed = config_lib.load_config("ddpm_digits", [override], arg="tiny")
    with pytest.raises(ckpt.RunFolderError) as error:
        ckpt.check_run_folder(tmp_path, changed)
    assert override.split("=")[0] in str(error.value)
    assert "train.workdir" in str(error.value)


def test_resume_with_longer_schedule_accepted(tmp_path):
    from jaxgen import checkpoint as ckpt

    saved = config_lib.load_config("ddpm_digits", [], arg="tiny")
    config_lib.save_config(saved, tmp_path / ckpt.CONFIG_FILE)
    longer = config_lib.load_config("ddpm_digits", ["train.num_steps=20", "optim.learning_rate=1e-4"], arg="tiny")
    ckpt.check_run_folder(tmp_path, longer)  # the test fails if this raises
