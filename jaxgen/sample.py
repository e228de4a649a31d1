"""Draw samples from a trained diffusion run: `python -m jaxgen.sample --run runs/ddpm_digits ...`.

Example:
  python -m jaxgen.sample --run runs/ddpm_digits --sampler dpmpp_2m --steps 20 --guidance 3 --seed 0 \
      --per-class 8 --out samples.png

With `--classifier runs/noisy_classifier_digits --classifier-scale 5`, the noise-aware classifier's
gradient steers every step as well (classifier guidance).

Text to video from an Open-Sora run (see jaxgen.sample_video):
  python -m jaxgen.sample --cfg opensora.py --prompt "the digit seven moves to the left" --out seven.mp4
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import numpy as np

from jaxgen import sample_video
from jaxgen.config import SampleConfig

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of `jaxgen.sample`."""
    parser = argparse.ArgumentParser(prog="python -m jaxgen.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder of a trained diffusion model")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="number of sampling steps (ddpm always uses all)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 is deterministic, 1 is DDPM-like")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=None,
                        help="how the sampling timesteps are spread over the training timesteps "
                             "(default: the sampler's own, leading for DDIM and linspace for DPM-Solver++)")
    parser.add_argument("--no-clip-sample", dest="clip_sample", action="store_false",
                        help="do not clip each step's x0 estimate to [-1, 1] (clipping is on by default)")
    parser.add_argument("--guidance", type=finite_float, default=3.0,
                        help="classifier-free guidance scale: 0 unconditional, 1 conditional, >1 guided")
    parser.add_argument("--classifier", default=None, help="run folder of a noise-aware classifier")
    parser.add_argument("--classifier-scale", type=float, default=0.0, help="classifier guidance scale")
    parser.add_argument("--labels", default=None, help="comma-separated labels to draw, e.g. 3,3,7")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class when --labels is not given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output PNG grid (default: RUN/samples/<sampler>.png); with "
                        "--cfg a .mp4, .gif or .npy video (default: RUN/stdit/samples/prompt.mp4). With several videos, "
                        "OUT_00, OUT_01, ... follow the order of --prompt (each repeated --num-videos times), "
                        "plus OUT_grid.gif")
    parser.add_argument("--save-npz", action="store_true", help="also write the raw samples and labels as .npz")
    sample_video.add_arguments(parser)
    args = parser.parse_args(argv)
    if (args.run is None) == (args.cfg is None):
        parser.error("pass --run RUN for a class-conditional image model, or --cfg CONFIG --prompt TEXT for video")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run `jaxgen.sample` and return the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file operation at INFO
    if args.cfg is not None:
        return sample_video.main(args)
    if args.per_class < 1:
        print(f"error: --per-class {args.per_class} is invalid; use a positive integer", file=sys.stderr)
        return 2
    if args.out is not None and pathlib.Path(args.out).suffix.lower() != ".png":
        print(f"error: --out {args.out} must be a .png file path, e.g. --out samples.png", file=sys.stderr)
        return 2
    if args.classifier is None and args.classifier_scale:
        print("error: --classifier-scale needs --classifier RUN (a noise-aware classifier run folder)",
              file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp

    from jaxgen import checkpoint, images, sampling, trainer
    from jaxgen.runtime import enable_compilation_cache

    enable_compilation_cache()

    if any(pathlib.Path(args.run).glob("checkpoints/*/training_state.pt")):
        print(f"error: {args.run} is a run folder of python -m torch_npu_backend.train; sample it with python -m "
              f"torch_npu_backend.sample --run {args.run}, or convert it with python -m torch_npu_backend.train ... "
              "--export-jaxgen DIR", file=sys.stderr)
        return 2
    try:
        config = checkpoint.read_run_config(args.run, expected_task="diffusion")
        classifier = None
        if args.classifier:
            classifier_config = checkpoint.read_run_config(args.classifier, expected_task="noisy_classifier")
            sampling.check_classifier_matches(config, classifier_config)
            classifier = trainer.build_inference_model(classifier_config, args.classifier)
        graphdef, params, rest, step = trainer.build_inference_model(config, args.run)
    except (checkpoint.RunFolderError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    num_classes = config.model.num_class_embeds - 1
    try:
        labels = parse_labels(args.labels, num_classes, args.per_class)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sample_config = SampleConfig(sampler=args.sampler, num_steps=args.steps, eta=args.eta, spacing=args.spacing,
                                 clip_sample=args.clip_sample,
                                 guidance_scale=args.guidance)
    schedule = sampling.schedule_from_config(config)
    size = config.data.image_size
    # Scales 0 and 1 need one model call per step: the null class or the labels alone.
    single_pass = args.guidance in (0.0, 1.0)
    model_labels = jnp.full(labels.shape, num_classes, jnp.int32) if args.guidance == 0.0 else None
    try:
        sample_fn = sampling.make_sample_fn(
            graphdef, rest, schedule, sample_config, image_shape=(size, size, config.model.in_channels),
            prediction_type=config.diffusion.prediction_type, null_label=num_classes,
            classifier=(classifier[0], classifier[2]) if classifier else None, classifier_free=not single_pass,
        )
        extra = (classifier[1], jnp.float32(args.classifier_scale)) if classifier else (None, 0.0)
        samples = sample_fn(params, jax.random.PRNGKey(args.seed), jnp.asarray(labels), jnp.float32(args.guidance),
                            *extra, model_labels=model_labels)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    samples = np.asarray(samples)

    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run) / "samples" / f"{args.sampler}.png"
    ncols = num_classes if args.labels is None else min(len(labels), 10)
    images.save_grid(samples, out, ncols=ncols)
    num_steps = schedule.num_train_timesteps if args.sampler == "ddpm" else args.steps
    print(f"wrote {len(labels)} samples from step {step} ({args.sampler}, {num_steps} steps, "
          f"guidance {args.guidance}) to {out}")
    if args.save_npz:
        npz = out.with_suffix(".npz")
        np.savez(npz, images=samples, labels=labels)
        print(f"wrote raw samples to {npz}")
    return 0


def finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_labels(text: str | None, num_classes: int, per_class: int) -> np.ndarray:
    if text is None:
        return np.tile(np.arange(num_classes, dtype=np.int32), per_class)
    try:
        labels = np.array([int(v) for v in text.split(",")], dtype=np.int32)
    except ValueError:
        raise ValueError(f"--labels {text!r} is not a comma-separated list of integers, e.g. 3,3,7") from None
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{num_classes - 1}")
    return labels


if __name__ == "__main__":
    sys.exit(main())
