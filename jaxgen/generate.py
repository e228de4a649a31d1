"""Generate images with Stable Diffusion (1.x, 2.x or XL) from a local diffusers pipeline folder.

  python -m jaxgen.generate --model PATH --prompt "a photo of a cat" --negative-prompt "blurry" \
      --steps 30 --guidance 7.5 --seed 0 --height 512 --width 512 --out image.png

Several --prompt options generate a batch (one image file per prompt: image.png, image_1.png, ...).
--init-image with --strength runs image-to-image, and --lora applies a LoRA file. The scheduler comes from
the folder's scheduler/ subfolder. Exit status: 0 on success, 2 for invalid arguments or an unusable model folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxgen.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (contains model_index.json)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for a batch")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt used for every image")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial noise")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8")
    parser.add_argument("--init-image", default=None, help="image file for image-to-image, resized to the output size")
    parser.add_argument("--strength", type=float, default=0.8, help="image-to-image strength in (0, 1]")
    parser.add_argument("--lora", action="append", default=[],
                        help="LoRA file or folder (diffusers/peft or kohya safetensors) to apply; repeatable")
    parser.add_argument("--out", default="image.png", help="output PNG path")
    return parser.parse_args(argv)


def pipeline_class(folder: pathlib.Path):
    """Return StableDiffusionXL for an SDXL folder (two text encoders), else StableDiffusion."""
    from jaxgen.pipelines import StableDiffusion, StableDiffusionXL

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    is_xl = "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index
    return StableDiffusionXL if is_xl else StableDiffusion


def output_paths(out: pathlib.Path, count: int) -> list[pathlib.Path]:
    """Return `out` for the first image and out_1, out_2, ... for the others."""
    return [out if i == 0 else out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    import numpy as np
    from PIL import Image

    from safetensors import SafetensorError

    from conversion.rules import CheckpointMismatchError
    from jaxgen.pipelines import PipelineFolderError
    from jaxgen.runtime import enable_compilation_cache

    enable_compilation_cache()
    folder = pathlib.Path(args.model)
    try:
        pipeline = pipeline_class(folder).from_pretrained(folder)
        for lora in args.lora:
            result = pipeline.load_lora_weights(lora)
            adapted = sum(len(paths) for paths in result.adapted.values())
            print(f"loaded LoRA {lora}: {adapted} layers adapted")
    except (PipelineFolderError, FileNotFoundError, CheckpointMismatchError, ValueError, SafetensorError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    image = None
    if args.init_image is not None:
        try:
            with Image.open(args.init_image) as source:
                height = args.height or source.height // 8 * 8
                width = args.width or source.width // 8 * 8
                resized = source.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        except OSError as error:
            print(f"error: cannot read --init-image {args.init_image}: {error}", file=sys.stderr)
            return 2
        args.height, args.width = height, width
        image = np.repeat(np.asarray(resized, np.float32)[None] / 255.0, len(args.prompt), axis=0)

    try:
        images = pipeline(args.prompt, args.negative_prompt, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                          image=image, strength=args.strength)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, pixels in zip(output_paths(out, len(images)), images):
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
