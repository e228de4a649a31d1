"""Stable Diffusion and SDXL pipelines against diffusers on tiny random pipeline folders, and jaxgen.generate."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from conftest import jaxgen_env, run_module

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxgen.pipelines import PipelineFolderError, StableDiffusion, StableDiffusionXL  # noqa: E402
from jaxgen.pipelines.tiny import write_tiny_pipeline  # noqa: E402

PROMPTS = ["a handwritten digit seven in white on a blue background", "a photo of a cat"]
NEGATIVE = "blurry"
# Per-pixel tolerance on images in [0, 1]: both sides run the same 20 DDIM steps in float32, so they
# differ only by float rounding, which the random tiny VAE amplifies a little.
PIXEL_ATOL = 2e-3


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), xl=True)


def initial_latents(batch: int, seed: int = 0) -> np.ndarray:
    """Channels-last initial noise [B, 8, 8, 4] for the tiny pipelines' 64x64 images."""
    return np.random.default_rng(seed).standard_normal((batch, 8, 8, 4)).astype(np.float32)


def diffusers_images(pipeline_class, folder, latents: np.ndarray, *, lora=None, **kwargs) -> np.ndarray:
    reference = pipeline_class.from_pretrained(folder, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    if lora is not None:
        reference.load_lora_weights(str(lora))
    with torch.no_grad():
        result = reference(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=20, guidance_scale=7.5,
            height=64, width=64, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
            **kwargs,
        )
    return np.asarray(result.images)


def test_sd_pipeline_matches_diffusers(sd_folder):
    latents = initial_latents(len(PROMPTS))
    expected = diffusers_images(diffusers.StableDiffusionPipeline, sd_folder, latents)
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    images = pipeline(PROMPTS, NEGATIVE, num_inference_steps=20, guidance_scale=7.5, height=64, width=64,
                      latents=latents)
    assert images.shape == expected.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(images, expected, rtol=0, atol=PIXEL_ATOL)


def test_sdxl_pipeline_matches_diffusers(sdxl_folder):
    latents = initial_latents(len(PROMPTS), seed=1)
    expected = diffusers_images(diffusers.StableDiffusionXLPipeline, sdxl_folder, latents)
    pipeline = StableDiffusionXL.from_pretrained(sdxl_folder)
    images = pipeline(PROMPTS, NEGATIVE, num_inference_steps=20, guidance_scale=7.5, height=64, width=64,
                      latents=latents)
    np.testing.assert_allclose(images, expected, rtol=0, atol=PIXEL_ATOL)


def test_sdxl_empty_negative_uses_zeros(sdxl_folder):
    latents = initial_latents(1, seed=2)
    expected = diffusers_images(diffusers.StableDiffusionXLPipeline, sdxl_folder, np.repeat(latents, 2, 0))
    pipeline = StableDiffusionXL.from_pretrained(sdxl_folder)
    # diffusers ran with the negative prompt, so without one the output must differ from it.
    without = pipeline(PROMPTS[:1], None, num_inference_steps=20, guidance_scale=7.5, height=64, width=64,
                       latents=latents)
    assert np.abs(without - expected[:1]).max() > 10 * PIXEL_ATOL


def test_pipeline_compiles_once_per_shape(sd_folder):
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    first = pipeline(PROMPTS[:1], num_inference_steps=3, height=64, width=64, seed=0)
    second = pipeline(PROMPTS[:1], num_inference_steps=3, height=64, width=64, seed=1)
    assert len(pipeline._compiled) == 1
    assert next(iter(pipeline._compiled.values()))._cache_size() == 1
    assert not np.array_equal(first, second)


def test_image_to_image_runs_last_steps(sd_folder):
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    out = pipeline(PROMPTS[:1], num_inference_steps=10, height=64, width=64, image=image, strength=0.3)
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="strength"):
        pipeline(PROMPTS[:1], num_inference_steps=10, height=64, width=64, image=image, strength=0.0)


def test_size_not_multiple_of_8_rejected(sd_folder):
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="height=60"):
        pipeline(PROMPTS[:1], num_inference_steps=2, height=60, width=64)


def test_long_prompt_truncated_with_warning(sd_folder, caplog):
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    long_prompt = " ".join(["digit"] * 40)
    with caplog.at_level(logging.WARNING):
        pipeline.tokenize([long_prompt])
    assert "truncated" in caplog.text
    assert "10 of its tokens" in caplog.text  # 40 words + 2 special tokens into max_length 32


def test_missing_component_named(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineFolderError, match="vae"):
        StableDiffusion.from_pretrained(broken)


def test_sdxl_folder_needs_second_encoder(sd_folder):
    with pytest.raises(PipelineFolderError, match="text_encoder_2"):
        StableDiffusionXL.from_pretrained(sd_folder)


def test_generate_cli_writes_batch(sd_folder, tmp_path, compile_cache):
    out = tmp_path / "image.png"
    result = run_module("jaxgen.generate", ["--model", str(sd_folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                                            "--negative-prompt", NEGATIVE, "--steps", "3", "--height", "64",
                                            "--width", "64", "--out", str(out)], jaxgen_env(compile_cache))
    assert out.is_file()
    assert (tmp_path / "image_1.png").is_file()
    assert "wrote" in result.stdout


def test_generate_cli_bad_folder_exit_code(tmp_path, compile_cache):
    result = run_module("jaxgen.generate", ["--model", str(tmp_path / "absent"), "--prompt", "x"],
                        jaxgen_env(compile_cache), check=False)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_lora_file_changes_both_pipelines_alike(sd_folder, tmp_path):
    pytest.importorskip("peft")
    import jax
    from flax import nnx

    from conversion.lora_io import save_lora_weights
    from jaxgen.lora import apply_lora, lora_modules

    source = StableDiffusion.from_pretrained(sd_folder)
    apply_lora(source.unet, rank=4, alpha=8, rngs=nnx.Rngs(0))
    for index, layer in enumerate(lora_modules(source.unet).values()):
        layer.lora_B.set_value(0.5 * jax.random.normal(jax.random.key(index), layer.lora_B.get_value().shape))
    save_lora_weights(tmp_path / "lora", {"unet": source.unet})

    latents = initial_latents(len(PROMPTS), seed=3)
    expected = diffusers_images(diffusers.StableDiffusionPipeline, sd_folder, latents, lora=tmp_path / "lora")
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    settings = dict(num_inference_steps=20, guidance_scale=7.5, height=64, width=64, latents=latents)
    plain = pipeline(PROMPTS, NEGATIVE, **settings)
    result = pipeline.load_lora_weights(tmp_path / "lora")
    adapted = pipeline(PROMPTS, NEGATIVE, **settings)
    assert len(result.adapted["unet"]) == len(lora_modules(source.unet))
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=PIXEL_ATOL)
    assert np.abs(adapted - plain).max() > 10 * PIXEL_ATOL  # the LoRA changes the images


def test_lora_file_matching_nothing_rejected(sd_folder, tmp_path):
    from safetensors.numpy import save_file

    from conversion.lora_io import LoRAFileError

    save_file({"unet.no_such_block.to_q.lora_A.weight": np.zeros((4, 8), np.float32),
               "unet.no_such_block.to_q.lora_B.weight": np.zeros((8, 4), np.float32)},
              tmp_path / "pytorch_lora_weights.safetensors")
    pipeline = StableDiffusion.from_pretrained(sd_folder)
    with pytest.raises(LoRAFileError, match="no_such_block"):
        pipeline.load_lora_weights(tmp_path)
