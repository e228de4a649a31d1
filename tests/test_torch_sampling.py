"""Tests of torch sampling: diffusers schedulers set up by make_scheduler against jaxgen's samplers.

The parity tests run the tiny digits twin (configs/ddpm_digits.py, preset tiny) with seeded random weights in
both backends, from the same x_T and labels, with classifier-free guidance 3. Torch runs on one thread.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm
from flax import nnx
from PIL import Image

from jaxgen import config as config_lib
from jaxgen import sampling as jaxgen_sampling
from jaxgen.config import SampleConfig
from jaxgen.diffusion import guidance, samplers
from torch_npu_backend import models
from torch_npu_backend import sample as sample_cli
from torch_npu_backend import sampling
from torch_npu_backend import train as torch_train

GUIDANCE = 3.0
LABELS = np.array([0, 5, 9])
# Samples whose steps clip x0 to [-1, 1], so they lie in [-1, 1]. With guidance 3 the random model saturates about
# 75% of the pixels (23% for DDPM). Measured differences: DDIM-50 7e-6, DPM-Solver++-20 1.2e-5, with Karras sigmas
# 1.7e-5, DDPM-20 2.5e-6. They come from float32 rounding in the two U-Nets and from alpha_bar, which diffusers
# takes by a float32 cumulative product and jaxgen by a float64 one. 1/sqrt(alpha_bar) amplifies both at high noise.
# A wrong grid, coefficient or guidance formula moves samples by 1e-2 or more.
CLIPPED_ATOL = 5e-5
# Clipping changes the random model's samples by up to 2; a sampler that ignored the option would not.
MIN_CLIP_EFFECT = 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # Two threads on a loaded 2-core machine ran 20 times slower.
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def config() -> config_lib.Config:
    return config_lib.load_config("ddpm_digits", [], arg="tiny")


@pytest.fixture(scope="module")
def twins(config):
    """Return the torch twin with torch's initial weights plus seeded noise, and the jaxgen model with its weights."""
    torch.manual_seed(0)
    twin = models.build_torch_model(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return twin, models.jaxgen_model_from_torch(twin.state_dict(), config)


def initial_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(LABELS), 1, 16, 16)).astype(np.float32)  # [B, C, H, W]


def jaxgen_sample(jax_model, config, sample_config, x_T, key=None, **extra_options) -> np.ndarray:
    """Run jaxgen's sampler with the options jaxgen.sampling derives from sample_config; return x_0 [B, C, H, W]."""
    graphdef, state = nnx.split(jax_model)
    schedule = jaxgen_sampling.schedule_from_config(config)
    null = jnp.full((len(LABELS),), config.model.num_class_embeds - 1, jnp.int32)
    options = {**jaxgen_sampling.sampler_options(sample_config), **extra_options}

    @jax.jit
    def run(state, x_T, labels):
        model = nnx.merge(graphdef, state)
        model_fn = guidance.cfg_model_fn(lambda x, t, c: model(x, t, c), GUIDANCE, null)
        return samplers.sample(jaxgen_sampling.sampler_name(sample_config), model_fn, schedule, x_T,
                               jax.random.key(0) if key is None else key, labels,
                               prediction_type=config.diffusion.prediction_type, **options)

    x_0 = run(state, jnp.asarray(x_T.transpose(0, 2, 3, 1)), jnp.asarray(LABELS, jnp.int32))
    return np.asarray(x_0).transpose(0, 3, 1, 2)


def torch_sample(twin, config, sample_config, x_T, generator=None) -> np.ndarray:
    """Run the torch loop without make_sample_fn's final clipping; return x_0 [B, C, H, W]."""
    scheduler = sampling.make_scheduler(config.diffusion, sample_config)
    settings = sampling.sampler_settings(config.diffusion, sample_config)
    x_0 = sampling.sample(twin, scheduler, torch.from_numpy(x_T), torch.from_numpy(LABELS), guidance_scale=GUIDANCE,
                          null_label=twin.null_label, num_steps=settings.num_steps, generator=generator,
                          eta=settings.eta, use_clipped_model_output=settings.use_clipped_model_output)
    return x_0.numpy()


# ---- whole-sampler parity with jaxgen ------------------------------------------------------------------------


@pytest.mark.parametrize("sample_config", [
    SampleConfig(sampler="ddim", num_steps=50),
    SampleConfig(sampler="dpmpp_2m", num_steps=20),
    SampleConfig(sampler="dpmpp_2m_karras", num_steps=20),
], ids=lambda sample_config: f"{sample_config.sampler}-{sample_config.num_steps}")
def test_draw_matches_jaxgen(config, twins, sample_config):
    twin, jax_model = twins
    x_T = initial_noise()
    draw = sampling.make_sample_fn(config, twin, sample_config)
    ours = draw(torch.from_numpy(x_T), torch.from_numpy(LABELS), GUIDANCE).numpy()
    expected = np.clip(jaxgen_sample(jax_model, config, sample_config, x_T), -1.0, 1.0)
    assert ours.shape == x_T.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=CLIPPED_ATOL)


def test_ddpm_matches_jaxgen_with_shared_noise(monkeypatch, config, twins):
    """DDPM over a 20-step chain, with jaxgen's per-step noise fed to diffusers' DDPMScheduler."""
    twin, jax_model = twins
    short = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, num_train_timesteps=20))
    sample_config = SampleConfig(sampler="ddpm")
    # An RBG key: XLA compiles its random bits in about a second, threefry's in about eight.
    key = jax.random.key(7, impl="rbg")
    shape = (len(LABELS), 16, 16, 1)
    # jaxgen draws step i's noise from fold_in(key, i); diffusers draws once per step with t > 0.
    noises = [np.array(jax.random.normal(jax.random.fold_in(key, i), shape)).transpose(0, 3, 1, 2)
              for i in range(20)]  # [B, C, H, W] each
    drawn = []

    def shared_noise(shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.from_numpy(noises[len(drawn)])
        drawn.append(noise)
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(device=device, dtype=dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", shared_noise)
    ours = torch_sample(twin, short, sample_config, initial_noise())
    expected = jaxgen_sample(jax_model, short, sample_config, initial_noise(), key=key)
    assert len(drawn) == 19  # every step but the one at t = 0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=CLIPPED_ATOL)


# ---- clip_sample -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_clip_sample_changes_samples(config, twins, sampler):
    twin, _ = twins
    x_T = initial_noise()
    clipped = torch_sample(twin, config, SampleConfig(sampler=sampler, num_steps=10, clip_sample=True), x_T)
    unclipped = torch_sample(twin, config, SampleConfig(sampler=sampler, num_steps=10, clip_sample=False), x_T)
    assert np.abs(clipped).max() <= 1.0 + 1e-6  # The last step returns the clipped x0.
    assert np.abs(unclipped).max() > 1.0 + MIN_CLIP_EFFECT
    assert np.abs(np.clip(unclipped, -1, 1) - clipped).max() > MIN_CLIP_EFFECT


def test_scheduler_options_follow_sample_config(config):
    ddim = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="ddim", num_steps=10, clip_sample=True))
    assert isinstance(ddim, DDIMScheduler)
    assert ddim.config.clip_sample
    assert ddim.config.clip_sample_range == 1.0
    assert ddim.config.set_alpha_to_one
    settings = sampling.sampler_settings(config.diffusion, SampleConfig(sampler="ddim", eta=0.5))
    assert settings == sampling.SamplerSettings(num_steps=50, eta=0.5, use_clipped_model_output=True)

    dpm = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="dpmpp_2m_karras", clip_sample=True))
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.use_karras_sigmas
    assert dpm.config.thresholding
    assert dpm.config.sample_max_value == 1.0
    no_clip = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="dpmpp_2m", clip_sample=False))
    assert not no_clip.config.thresholding

    ddpm = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="ddpm", num_steps=10))
    assert isinstance(ddpm, DDPMScheduler)
    assert len(ddpm.timesteps) == config.diffusion.num_train_timesteps  # jaxgen's DDPM runs the whole chain


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("schedule, rescale_zero_terminal_snr", [
    ("linear", False), ("scaled_linear", False), ("squaredcos_cap_v2", False), ("scaled_linear", True),
])
def test_scheduler_alpha_bar_matches_jaxgen(config, sampler, schedule, rescale_zero_terminal_snr):
    diffusion = dataclasses.replace(config.diffusion, schedule=schedule, beta_start=0.00085, beta_end=0.012,
                                    rescale_zero_terminal_snr=rescale_zero_terminal_snr)
    scheduler = sampling.make_scheduler(diffusion, SampleConfig(sampler=sampler))
    jaxgen_schedule = jaxgen_sampling.schedule_from_config(dataclasses.replace(config, diffusion=diffusion))
    expected = np.asarray(jaxgen_schedule.alphas_cumprod)
    actual = scheduler.alphas_cumprod.numpy()
    if rescale_zero_terminal_snr and sampler == "dpmpp_2m":
        # DPM-Solver++ in both backends uses 2**-24 for the final alpha_bar of 0.
        assert expected[-1] == 0.0
        assert actual[-1] == 2.0**-24
        actual, expected = actual[:-1], expected[:-1]
    # float32 against float64 cumulative products: measured at most 9e-7 relative where alpha_bar > 1e-3 (8.9e-7 for
    # DPM-Solver++ with zero terminal SNR, which rescales once more), and 1.3e-5 relative but 3e-14 absolute at the
    # cosine schedule's last alpha_bar of 2.4e-9.
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-12)


# ---- configs it cannot express -----------------------------------------------------------------------------


@pytest.mark.parametrize("sample_config, message", [
    (SampleConfig(sampler="euler"), r"sample\.sampler='euler' is not supported.*ddpm, ddim, dpmpp_2m"),
    (SampleConfig(sampler="ddim", spacing="linspace"), r"t - 20, which for spacing='linspace'"),
    (SampleConfig(sampler="ddim", spacing="trailing", num_steps=30), r"spacing='trailing' with num_steps=30"),
    (SampleConfig(sampler="ddim", num_steps=2000), r"num_steps=2000 is larger than num_train_timesteps=1000"),
    (SampleConfig(sampler="dpmpp_2m", spacing="middle"), r"Unknown spacing 'middle'"),
])
def test_make_scheduler_rejects(config, sample_config, message):
    with pytest.raises(ValueError, match=message):
        sampling.make_scheduler(config.diffusion, sample_config)


def test_make_scheduler_accepts_trailing_divisor(config):
    scheduler = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="ddim", spacing="trailing",
                                                                       num_steps=25))
    assert scheduler.timesteps[0] == 999
    assert scheduler.timesteps[-1] == 39


def test_make_scheduler_rejects_unknown_prediction_type(config):
    diffusion = dataclasses.replace(config.diffusion, prediction_type="noise")
    with pytest.raises(ValueError, match="noise"):
        sampling.make_scheduler(diffusion, SampleConfig(sampler="ddim"))


def test_sample_rejects_ddim_options_elsewhere(config, twins):
    twin, _ = twins
    scheduler = sampling.make_scheduler(config.diffusion, SampleConfig(sampler="dpmpp_2m", num_steps=2))
    with pytest.raises(ValueError, match=r"eta=0\.5 .* DPMSolverMultistepScheduler"):
        sampling.sample(twin, scheduler, torch.zeros(3, 1, 16, 16), torch.from_numpy(LABELS), num_steps=2,
                        guidance_scale=GUIDANCE, null_label=10, eta=0.5)


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """Train the tiny model for 2 steps with torch, checkpointing at step 2."""
    workdir = tmp_path_factory.mktemp("torch_sampling") / "run"
    config = config_lib.load_config("ddpm_digits", [f"data.data_dir={data_dir}", "train.num_steps=2",
                                                    "train.checkpoint_every=2"], arg="tiny")
    torch_train.train(config, workdir=workdir, device="cpu")
    return workdir


def test_cli_writes_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = sample_cli.main(["--run", str(tiny_run), "--sampler", "dpmpp_2m", "--steps", "3", "--per-class", "2",
                            "--out", str(out), "--device", "cpu", "--save-npz"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 20 samples from step 2 (EMA weights, dpmpp_2m, 3 steps, guidance 3.0)" in printed
    grid = np.asarray(Image.open(out))
    # 10 columns (classes) and 2 rows of 16x16 images upscaled 4 times, with 1-pixel padding.
    assert grid.shape == (2 * 65 + 1, 10 * 65 + 1)
    saved = np.load(out.with_suffix(".npz"))
    assert saved["images"].shape == (20, 16, 16, 1)
    assert np.abs(saved["images"]).max() <= 1.0
    assert saved["images"].std() > 0.0
    np.testing.assert_array_equal(saved["labels"], np.tile(np.arange(10), 2))


def test_cli_same_seed_same_samples(tiny_run, tmp_path):
    def run(name, *extra):
        out = tmp_path / f"{name}.png"
        args = ["--run", str(tiny_run), "--sampler", "ddim", "--steps", "2", "--labels", "1,7", "--out", str(out),
                "--device", "cpu", "--save-npz", *extra]
        assert sample_cli.main(args) == 0
        return np.load(out.with_suffix(".npz"))["images"]

    first = run("first", "--seed", "3")
    np.testing.assert_array_equal(run("again", "--seed", "3"), first)
    assert np.abs(run("other_seed", "--seed", "4") - first).max() > 1e-3
    assert np.abs(run("trained_weights", "--seed", "3", "--no-ema") - first).max() > 0.0


def test_cli_missing_run_folder(tmp_path, capsys):
    assert sample_cli.main(["--run", str(tmp_path / "absent")]) == 2
    message = capsys.readouterr().err
    assert f"run folder {tmp_path / 'absent'} does not exist" in message
    assert "python -m torch_npu_backend.train" in message


def test_cli_run_without_checkpoint(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_run / "config.json").read_text())
    assert sample_cli.main(["--run", str(empty)]) == 2
    assert "has no checkpoint under" in capsys.readouterr().err


def test_cli_checkpoint_without_weights(tiny_run, tmp_path, capsys):
    run = tmp_path / "jaxgen_like"
    (run / "checkpoints" / "4").mkdir(parents=True)  # a step folder without safetensors files, as Orbax writes
    (run / "config.json").write_text((tiny_run / "config.json").read_text())
    assert sample_cli.main(["--run", str(run)]) == 2
    assert "(4) have no model.safetensors and ema.safetensors" in capsys.readouterr().err


def test_cli_corrupt_weights_named(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "2" / "ema.safetensors").write_bytes(b"not a safetensors file")
    assert sample_cli.main(["--run", str(run)]) == 2
    assert "ema.safetensors is unreadable" in capsys.readouterr().err


def test_cli_missing_step(tiny_run, capsys):
    assert sample_cli.main(["--run", str(tiny_run), "--step", "5"]) == 2
    assert "has no checkpoint of step 5; its checkpoints are steps 2" in capsys.readouterr().err


def test_cli_rejects_eta_outside_unit_interval(tiny_run, capsys):
    assert sample_cli.main(["--run", str(tiny_run), "--sampler", "ddim", "--eta", "2"]) == 2
    assert "eta=2.0 is invalid; use a value in [0, 1]" in capsys.readouterr().err


def test_cli_warns_about_ignored_options(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert sample_cli.main(["--run", str(tiny_run), "--sampler", "dpmpp_2m", "--steps", "2", "--eta", "0.5",
                            "--labels", "1", "--out", str(out)]) == 0
    assert "--eta 0.5 is ignored by the dpmpp_2m sampler; it applies to ddim" in capsys.readouterr().err
    assert out.is_file()
