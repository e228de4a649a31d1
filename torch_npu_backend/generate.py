"""Generate images with a Stable Diffusion (1.x, 2.x or XL) pipeline folder in PyTorch, on an NPU when present.

  python -m torch_npu_backend.generate --model PATH --prompt "a photo of a cat" --negative-prompt "blurry" \
      --steps 30 --guidance 7.5 --seed 0 --height 512 --width 512 --dtype bfloat16 --out image.png

The flags are those of `python -m jaxgen.generate`, plus --device and --dtype. The pipeline is diffusers'
(StableDiffusionPipeline or StableDiffusionXLPipeline, chosen by the folder's model_index.json), loaded from
local files only, with every attention layer of the U-Net and the VAE running through
`torch_npu_backend.attention` (npu_fusion_attention on an NPU, SDPA elsewhere). --lora loads LoRA files
with diffusers' `load_lora_weights`, which reads the files `python -m jaxgen.train --cfg sd_lora` and
`python -m torch_npu_backend.train --cfg sdxl_lora` write.

The initial latents are drawn on the CPU from torch.Generator().manual_seed(seed), so one seed gives the
same latents on every device. They differ from jaxgen's for the same seed, because jaxgen draws from JAX
keys. Passing the same latents to both pipelines gives the same images (tests/test_torch_generate.py).
Exit status: 0 on success, 2 for invalid arguments, an unusable model folder or an unavailable device.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger("torch_npu_backend.generate")

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torch_npu_backend.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (contains model_index.json)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt used for every image")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial latents (drawn on the CPU)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8")
    parser.add_argument("--lora", action="append", default=[],
                        help="LoRA file (diffusers/peft or kohya safetensors) to apply; repeatable")
    parser.add_argument("--device", default=None,
                        help="npu, npu:1, cuda, cpu, ...; default: JAXGEN_TORCH_DEVICE, else npu, cuda, cpu in that order")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight and activation dtype; bfloat16 or float16 on an NPU or GPU")
    parser.add_argument("--out", default="image.png", help="output PNG path; further prompts get _1, _2, ...")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} is invalid; use 1 or more")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name}={value} is invalid; use a positive multiple of 8 (the VAE's downsampling factor)")
    return args


def is_xl_folder(folder: pathlib.Path) -> bool:
    """Return whether a pipeline folder is SDXL: model_index.json names an XL class or lists text_encoder_2."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found, so {folder} is not a diffusers pipeline folder; pass the folder that contains "
            "model_index.json, unet/, vae/, text_encoder/ and tokenizer/"
        )
    index = json.loads(index_path.read_text())
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def load_pipeline(folder: str | pathlib.Path, device, dtype=None):
    """Load a diffusers SD or SDXL pipeline from a local folder onto `device`, with the NPU attention dispatch.

    Args:
        folder: the pipeline folder; nothing is downloaded.
        device: a torch.device or a name such as "npu:0".
        dtype: torch dtype of the weights; float32 when None.
    """
    import diffusers
    import torch

    from torch_npu_backend.attention import NPUAttnProcessor

    folder = pathlib.Path(folder)
    pipeline_type = diffusers.StableDiffusionXLPipeline if is_xl_folder(folder) else diffusers.StableDiffusionPipeline
    pipeline = pipeline_type.from_pretrained(folder, dtype=dtype or torch.float32, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    # Both the U-Net and the VAE's mid-block attention go through npu_fusion_attention on an NPU.
    pipeline.unet.set_attn_processor(NPUAttnProcessor())
    pipeline.vae.set_attn_processor(NPUAttnProcessor())
    return pipeline.to(device)


def initial_latents(pipeline, batch_size: int, height: int, width: int, seed: int):
    """Draw unit-normal latents float32 [B, C, height / f, width / f] on the CPU from `seed` (f: the VAE factor)."""
    import torch

    factor = pipeline.vae_scale_factor
    shape = (batch_size, pipeline.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def generate(pipeline, prompts: Sequence[str], negative_prompt: str | None = None, *, num_inference_steps: int = 30,
             guidance_scale: float = 7.5, height: int | None = None, width: int | None = None, seed: int = 0,
             latents=None) -> np.ndarray:
    """Generate images float32 [B, H, W, 3] in [0, 1], one per prompt.

    `latents` (torch [B, C, h, w], unit variance) replaces the seeded draw. The pipeline scales it by its
    scheduler's initial noise level, as it does with its own draw.
    """
    import torch

    factor = pipeline.vae_scale_factor
    height = height or pipeline.unet.config.sample_size * factor
    width = width or pipeline.unet.config.sample_size * factor
    if latents is None:
        latents = initial_latents(pipeline, len(prompts), height, width, seed)
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.no_grad():
        result = pipeline(
            prompt=list(prompts), negative_prompt=negative, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width,
            latents=latents.to(device=pipeline.device, dtype=pipeline.unet.dtype), output_type="np",
        )
    return np.asarray(result.images, dtype=np.float32)


def load_lora(pipeline, path: str | pathlib.Path) -> None:
    """Check a LoRA file's keys with jaxgen's rules, then load it with diffusers' `load_lora_weights`.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is unreadable, its keys are not paired LoRA matrices (conversion.lora_io.LoRAFileError),
            or its shapes do not fit the pipeline.
    """
    from safetensors import SafetensorError

    from conversion.lora_io import check_lora_pairs, read_lora_file

    try:
        tensors, _ = read_lora_file(path)
    except SafetensorError as error:
        raise ValueError(f"LoRA file {path} is not a readable safetensors file: {error}") from error
    check_lora_pairs(tensors, f"LoRA file {path}")
    try:
        pipeline.load_lora_weights(str(path))
    except (RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"LoRA file {path} does not fit the pipeline's models ({first_line}); pass a LoRA trained "
                         "on this base model") from error


def output_paths(out: pathlib.Path, count: int) -> list[pathlib.Path]:
    """Return `out` for the first image and out_1, out_2, ... for the others."""
    return [out if i == 0 else out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from PIL import Image

    from torch_npu_backend.device import DeviceUnavailableError, resolve_device

    try:
        device = resolve_device(args.device)
        pipeline = load_pipeline(args.model, device, getattr(torch, args.dtype))
        for lora in args.lora:
            load_lora(pipeline, lora)
            print(f"loaded LoRA {lora}")
    except (DeviceUnavailableError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("generating %d image(s) on %s in %s", len(args.prompt), device, args.dtype)
    images = generate(pipeline, args.prompt, args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed)
    if not np.isfinite(images).all():
        print(f"error: the generated images contain NaN or infinite values, so nothing was written. With "
              f"--dtype {args.dtype}, try --dtype float32; check the --lora files", file=sys.stderr)
        return 1

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, pixels in zip(output_paths(out, len(images)), images):
        Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)).save(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
