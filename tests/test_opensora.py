"""Tests of the Open-Sora pipeline: configs, the two training stages, video sampling and bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import tasks
from jaxgen.models import stdit3, t5, video_vae
from jaxgen.tasks_opensora import OpenSoraStages, VideoDataConfig, builtin_labels, check_video_geometry

REPO = pathlib.Path(__file__).resolve().parent.parent
# T5 v1.1 XXL's encoder (google/t5-v1_1-xxl), counted from its config: 32128 x 4096 embeddings and 24 blocks.
T5_XXL_ENCODER_PARAMETERS = 4_762_310_656


def _t5_parameters(config: t5.T5Config) -> int:
    """Count the T5 encoder's parameters from their shapes, allocating no weights."""
    from flax import nnx

    from conversion.diffusers_io import abstract_model

    model = abstract_model(lambda rngs: t5.T5EncoderModel(config, rngs=rngs))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def test_v12_preset_has_open_sora_sizes():
    config = config_lib.load_config("opensora.py:v1.2")
    assert isinstance(config.model, OpenSoraStages)
    stdit_model = config.model.stdit.model
    counts = stdit3.parameter_count(stdit_model.stdit)
    assert counts["parameters"] == 1_207_643_936
    vae_counts = video_vae.parameter_count(config.model.vae.model.vae)
    assert vae_counts["spatial"] == 83_653_863  # the SDXL VAE
    assert vae_counts["total"] == 393_341_007
    assert _t5_parameters(stdit_model.text_encoder) == T5_XXL_ENCODER_PARAMETERS
    assert stdit_model.stdit.caption_channels == stdit_model.text_encoder.d_model


def test_stages_get_folders_under_the_root():
    config = config_lib.load_config("opensora.py", ["train.workdir=/tmp/somewhere"])
    vae_stage, stdit_stage = tasks.stage_configs(config)
    assert vae_stage.task == "opensora_vae"
    assert stdit_stage.task == "opensora_stdit"
    assert vae_stage.train.workdir == "/tmp/somewhere/vae"
    assert stdit_stage.train.workdir == "/tmp/somewhere/stdit"
    assert stdit_stage.model.vae_path == "/tmp/somewhere/vae/vae"


def test_overrides_reach_a_stage():
    config = config_lib.load_config("opensora.py", ["model.stdit.train.num_steps=7", "model.vae.optim.learning_rate=5e-4"])
    assert config.model.stdit.train.num_steps == 7
    assert config.model.vae.optim.learning_rate == 5e-4


def test_unknown_preset_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="unknown opensora preset 'v9'"):
        config_lib.load_config("opensora.py:v9")


def test_geometry_rejects_size_not_divisible_by_patch():
    tiny = config_lib.load_config("opensora.py")
    vae_config = tiny.model.vae.model.vae
    patch = tiny.model.stdit.model.stdit.patch_size
    # 36 pixels -> 9 latent pixels, which a patch of 2 does not divide.
    with pytest.raises(ValueError, match="not divisible by STDiT's patch_size"):
        check_video_geometry(vae_config, patch, VideoDataConfig(resolutions=(36,), bucket_multiple=12))


def test_geometry_rejects_size_not_divisible_by_vae():
    tiny = config_lib.load_config("opensora.py")
    with pytest.raises(ValueError, match="spatial factor 4"):
        check_video_geometry(tiny.model.vae.model.vae, None, VideoDataConfig(resolutions=(30,), bucket_multiple=2))


def test_geometry_rejects_latent_frames_not_divisible_by_patch():
    tiny = config_lib.load_config("opensora.py")
    # 12 frames -> 3 latent frames, which a temporal patch of 2 does not divide.
    with pytest.raises(ValueError, match=r"entry 12 gives 3 latent frames, not divisible by STDiT's temporal patch 2"):
        check_video_geometry(tiny.model.vae.model.vae, (2, 2, 2), VideoDataConfig(frame_counts=(12,)))


def test_geometry_accepts_the_tiny_preset():
    tiny = config_lib.load_config("opensora.py")
    check_video_geometry(tiny.model.vae.model.vae, tiny.model.stdit.model.stdit.patch_size, tiny.model.stdit.data)


def test_builtin_labels_read_captions():
    digit, direction = builtin_labels(None, np.asarray(["the digit seven moves to the left", "a cat", "the digit zero moves down"]))
    np.testing.assert_array_equal(digit, [7, -1, 0])
    np.testing.assert_array_equal(direction, [0, -1, 3])


def _run(args, cwd, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cwd / "xla_cache"))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


SMOKE = ["--cfg", str(REPO / "configs" / "opensora.py") + ":smoke", "--set", "train.workdir=run",
         "--set", "model.vae.data.data_dir=data", "--set", "model.stdit.data.data_dir=data"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Train both stages of the smoke preset once (about a minute) and return the folder it ran in."""
    folder = tmp_path_factory.mktemp("opensora")
    result = _run(["-m", "jaxgen.train", *SMOKE], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_smoke_run_trains_both_stages(smoke_run):
    for stage in ("vae", "stdit"):
        lines = (smoke_run / "run" / stage / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
        assert losses
        assert all(np.isfinite(losses))
    exported = json.loads((smoke_run / "run" / "vae" / "vae" / "config.json").read_text())
    assert len(exported["shift"]) == 4  # measured per latent channel at export
    assert (smoke_run / "run" / "stdit" / "tokenizer" / "tokenizer.json").is_file()


def test_smoke_run_writes_scored_samples(smoke_run):
    samples = np.load(smoke_run / "run" / "stdit" / "samples" / "step_000004.npz")
    assert samples["frames"].shape == (4, 8, 32, 32, 3)
    assert samples["frames"].dtype == np.uint8
    assert (samples["digit"] >= 0).all()
    assert (smoke_run / "run" / "stdit" / "samples" / "step_000004.gif").is_file()
    assert (smoke_run / "run" / "stdit" / "samples" / "step_000004.mp4").is_file()


def test_rerun_resumes_and_skips_finished_stages(smoke_run):
    before = (smoke_run / "run" / "stdit" / "metrics.jsonl").read_text()
    result = _run(["-m", "jaxgen.train", *SMOKE], smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resumed from the checkpoint of step 4") == 2
    assert (smoke_run / "run" / "stdit" / "metrics.jsonl").read_text() == before


def test_sample_cli_writes_a_video(smoke_run):
    from jaxgen import video_io

    long_prompt = "the digit seven moves to the left and then the digit seven moves to the right"
    result = _run(["-m", "jaxgen.sample", *SMOKE[:2], "--set", "train.workdir=run", "--prompt", long_prompt,
                   "--prompt", "the digit seven moves Sideways", "--out", "out.mp4", "--video-steps", "2"], smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cut to the text length of 12 tokens" in result.stderr
    assert "lacks, encoded as <unk>: Sideways" in result.stderr
    frames = video_io.read_video(smoke_run / "out_00.mp4")
    assert frames.shape == (8, 32, 32, 3)
    assert (smoke_run / "out_grid.gif").is_file()


def test_sample_cli_without_run_fails(tmp_path):
    result = _run(["-m", "jaxgen.sample", *SMOKE[:2], "--set", "train.workdir=missing", "--prompt", "x"], tmp_path)
    assert result.returncode == 2
    assert "missing/stdit does not exist; train it first with python -m jaxgen.train" in result.stderr


def test_stdit_stage_without_vae_names_the_vae_stage(tmp_path):
    config = config_lib.load_config("opensora.py:smoke", ["model.stdit.data.data_dir=" + str(tmp_path)])
    stdit_stage = tasks.stage_configs(config)[1]
    import dataclasses

    stdit_stage = dataclasses.replace(stdit_stage, model=dataclasses.replace(stdit_stage.model,
                                                                              vae_path=str(tmp_path / "none")))
    from jaxgen.tasks_opensora import _vae_path, load_video_vae

    with pytest.raises(FileNotFoundError, match="train that stage first"):
        load_video_vae(_vae_path(stdit_stage))


def test_video_quality_scores_the_smoke_samples(smoke_run):
    out = smoke_run / "quality.json"
    result = _run(["-m", "benchmarks.video_quality", "--run", "run/stdit", "--out", str(out)], smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "samples" in json.dumps(report)


def test_vae_loss_gan_starts_at_disc_start():
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from jaxgen.models.discriminator import NLayerDiscriminator, NLayerDiscriminatorConfig
    from jaxgen.models.video_vae import VideoAutoencoder
    from jaxgen.tasks_opensora import OpenSoraVAEConfig, VideoVAEWithDiscriminator, video_vae_losses
    from jaxgen.vae_loss import VAELossConfig

    smoke = config_lib.load_config("opensora.py:smoke").model.vae.model
    model_config = dataclasses.replace(smoke, loss=VAELossConfig(kl_weight=1e-6, disc_weight=0.5, disc_start=3))
    assert isinstance(model_config, OpenSoraVAEConfig)
    discriminator = NLayerDiscriminator(
        NLayerDiscriminatorConfig(in_channels=3, base_channels=8, num_layers=1, norm_num_groups=4), rngs=nnx.Rngs(1))
    model = VideoVAEWithDiscriminator(VideoAutoencoder(model_config.vae, rngs=nnx.Rngs(0)), discriminator)
    videos = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8, 32, 32, 3)), jnp.float32)
    key = jax.random.PRNGKey(0)
    _, before = video_vae_losses(model, videos, key, jnp.int32(2), model_config)
    loss, after = video_vae_losses(model, videos, key, jnp.int32(3), model_config)
    assert float(before["disc_factor"]) == 0.0
    assert float(after["disc_factor"]) == 1.0
    assert float(after["disc_loss"]) > 0.0
    assert np.isfinite(float(loss))
    assert float(after["spatial_rec_loss"]) > 0.0
    assert float(after["latent_rec_loss"]) > 0.0


def test_stage_configs_check_stdit_shapes_first():
    overrides = [f"model.{stage}.data.{key}={value}" for stage in ("vae", "stdit")
                 for key, value in (("resolutions", "[36]"), ("bucket_multiple", "12"))]
    config = config_lib.load_config("opensora.py", overrides)
    with pytest.raises(ValueError, match=r"gives latents of 9x9, not divisible by STDiT's patch_size \(2, 2\)"):
        tasks.stage_configs(config)


def test_v12_stage_configs_pass_the_shape_check():
    config = config_lib.load_config("opensora.py:v1.2")
    vae_stage, stdit_stage = tasks.stage_configs(config)
    assert stdit_stage.model.vae_path.endswith("vae/vae")
