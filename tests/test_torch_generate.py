"""`python -m torch_npu_backend.generate` against jaxgen's pipelines on tiny random pipeline folders."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxgen.pipelines import StableDiffusion  # noqa: E402
from jaxgen.pipelines.tiny import write_tiny_pipeline  # noqa: E402
from torch_npu_backend import generate as torch_generate  # noqa: E402
from torch_npu_backend.attention import NPUAttnProcessor  # noqa: E402

PROMPTS = ["a handwritten digit seven in white on a blue background", "a photo of a cat"]
NEGATIVE = "blurry"
STEPS = 4
# Per-pixel tolerance on images in [0, 1]: both backends run the same DDIM steps in float32 from the same
# latents, so they differ only by float rounding (the pipeline tests see at most 1.7e-6).
PIXEL_ATOL = 2e-3


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def jaxgen_images(pipeline, latents: torch.Tensor, **kwargs) -> np.ndarray:
    channels_last = latents.numpy().transpose(0, 2, 3, 1)
    return pipeline(PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                    latents=channels_last, **kwargs)


def test_torch_pipeline_matches_jaxgen(sd_folder):
    pipeline = torch_generate.load_pipeline(sd_folder, torch.device("cpu"))
    latents = torch_generate.initial_latents(pipeline, len(PROMPTS), 64, 64, seed=3)
    images = torch_generate.generate(pipeline, PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                                     height=64, width=64, seed=3)
    expected = jaxgen_images(StableDiffusion.from_pretrained(sd_folder), latents)

    assert images.shape == (len(PROMPTS), 64, 64, 3)
    np.testing.assert_allclose(images, expected, atol=PIXEL_ATOL, rtol=0)
    # The two prompts give different images, so the comparison covers the text conditioning.
    assert np.abs(images[0] - images[1]).max() > 10 * PIXEL_ATOL


def test_sdxl_folder_loads_xl_pipeline(tmp_path):
    import diffusers

    folder = write_tiny_pipeline(tmp_path / "sdxl", xl=True)

    assert torch_generate.is_xl_folder(folder)
    pipeline = torch_generate.load_pipeline(folder, torch.device("cpu"))
    assert isinstance(pipeline, diffusers.StableDiffusionXLPipeline)
    images = torch_generate.generate(pipeline, PROMPTS[:1], num_inference_steps=2, guidance_scale=5.0)
    assert images.shape == (1, 64, 64, 3)


def test_every_attention_layer_uses_npu_dispatch(sd_folder):
    pipeline = torch_generate.load_pipeline(sd_folder, torch.device("cpu"))

    for model in (pipeline.unet, pipeline.vae):
        processors = model.attn_processors
        assert processors
        assert all(isinstance(processor, NPUAttnProcessor) for processor in processors.values())


def test_seed_draws_same_latents_every_call(sd_folder):
    pipeline = torch_generate.load_pipeline(sd_folder, torch.device("cpu"))

    first = torch_generate.initial_latents(pipeline, 2, 64, 64, seed=5)
    again = torch_generate.initial_latents(pipeline, 2, 64, 64, seed=5)
    other = torch_generate.initial_latents(pipeline, 2, 64, 64, seed=6)
    assert first.shape == (2, 4, 8, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_cli_writes_one_png_per_prompt(sd_folder, tmp_path, capsys):
    out = tmp_path / "images" / "cat.png"

    status = torch_generate.main(["--model", str(sd_folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                                  "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)])

    assert status == 0
    written = [out, out.with_name("cat_1.png")]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    printed = capsys.readouterr().out
    assert all(str(path) in printed for path in written)


def test_cli_lora_file_changes_image(sd_folder, tmp_path):
    import jax
    from flax import nnx

    from conversion.lora_io import save_lora_weights
    from jaxgen.lora import apply_lora, lora_modules

    source = StableDiffusion.from_pretrained(sd_folder)
    apply_lora(source.unet, rank=4, alpha=8, rngs=nnx.Rngs(0))
    for index, layer in enumerate(lora_modules(source.unet).values()):
        layer.lora_B.set_value(0.5 * jax.random.normal(jax.random.key(index), layer.lora_B.get_value().shape))
    lora_file = save_lora_weights(tmp_path / "lora", {"unet": source.unet})
    common = ["--model", str(sd_folder), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "1"]

    assert torch_generate.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert torch_generate.main([*common, "--lora", str(lora_file), "--out", str(tmp_path / "lora.png")]) == 0

    base = np.asarray(Image.open(tmp_path / "base.png"), np.int16)
    adapted = np.asarray(Image.open(tmp_path / "lora.png"), np.int16)
    assert np.abs(base - adapted).max() > 5


def test_cli_rejects_folder_without_model_index(tmp_path, capsys):
    status = torch_generate.main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert "model_index.json" in capsys.readouterr().err


def test_cli_rejects_size_not_multiple_of_8(sd_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        torch_generate.parse_args(["--model", str(sd_folder), "--prompt", "a cat", "--height", "60"])

    assert exit_info.value.code == 2
    assert "--height=60 is invalid" in capsys.readouterr().err


def test_cli_reports_missing_npu(sd_folder, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def import_without_torch_npu(name, *args, **kwargs):
        if name == "torch_npu" or name.startswith("torch_npu."):
            raise ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_torch_npu)
    status = torch_generate.main(["--model", str(sd_folder), "--prompt", "a cat", "--device", "npu",
                                  "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert "torch_npu" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"unet.down.to_q.lora_Z.weight": np.zeros((4, 8), np.float32),
          "unet.down.to_q.lora_B.weight": np.zeros((8, 4), np.float32)}, "keys of no LoRA layout: unet.down.to_q.lora_Z"),
        ({"unet.down.to_q.lora_A.weight": np.zeros((4, 8), np.float32)}, "only one of the down .* unet.down.to_q"),
        ({}, "contains no tensors"),
    ],
    ids=["unknown-key", "unpaired", "empty"],
)
def test_cli_rejects_malformed_lora_file(sd_folder, tmp_path, capsys, tensors, message):
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    status = torch_generate.main(["--model", str(sd_folder), "--prompt", "a cat", "--lora", str(path),
                                  "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_missing_lora_file(sd_folder, tmp_path, capsys):
    status = torch_generate.main(["--model", str(sd_folder), "--prompt", "a cat", "--lora",
                                  str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert "none.safetensors not found" in capsys.readouterr().err
