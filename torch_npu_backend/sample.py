"""Draw samples from a torch diffusion run: `python -m torch_npu_backend.sample --run runs/ddpm_digits_torch ...`.

Example:
  python -m torch_npu_backend.sample --run runs/ddpm_digits_torch --sampler dpmpp_2m --steps 20 --guidance 3 \
      --seed 0 --per-class 8 --out samples.png

The run folder is one that `python -m torch_npu_backend.train` writes: config.json and
checkpoints/<step>/ with model.safetensors and ema.safetensors. The flags follow `python -m jaxgen.sample`,
except that the sampler settings default to the run config's `sample` section, and --ema/--no-ema and
--step choose the weights. The grid has one column per class and one row per sample of each class.
Guidance scales 0 and 1 run the model once per step, on the null class or on the labels, as jaxgen.sample does.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

from jaxgen.sample import finite_float, parse_labels

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras")


class SampleError(ValueError):
    """A run folder, checkpoint or option that this command cannot sample from."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of `torch_npu_backend.sample`."""
    parser = argparse.ArgumentParser(prog="python -m torch_npu_backend.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="torch run folder written by python -m torch_npu_backend.train")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the newest)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="sample with the EMA weights (default) or, with --no-ema, the trained weights")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run config's sample.sampler")
    parser.add_argument("--steps", type=int, default=None,
                        help="number of sampling steps; ddpm always uses all (default: sample.num_steps)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM noise: 0 is deterministic, 1 is DDPM-like (default: sample.eta)")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=None,
                        help="how the sampling timesteps are spread over the training timesteps (default: "
                             "sample.spacing, else the sampler's own: leading for DDIM, linspace for DPM-Solver++)")
    parser.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="clip each step's x0 estimate to [-1, 1] (default: sample.clip_sample)")
    parser.add_argument("--guidance", type=finite_float, default=None,
                        help="classifier-free guidance scale: 0 unconditional, 1 conditional, >1 guided "
                             "(default: sample.guidance_scale)")
    parser.add_argument("--labels", default=None, help="comma-separated labels to draw, e.g. 3,3,7")
    parser.add_argument("--per-class", type=int, default=None,
                        help="samples per class when --labels is not given (default: sample.samples_per_class)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch CPU generator for x_T and step noise")
    parser.add_argument("--device", default=None,
                        help="npu, cuda or cpu, optionally with an index (default: JAXGEN_TORCH_DEVICE, else the "
                             "first available of npu, cuda, cpu)")
    parser.add_argument("--out", default=None, help="output PNG grid (default: RUN/samples/<sampler>.png)")
    parser.add_argument("--save-npz", action="store_true",
                        help="also write the raw samples [N, H, W, C] and labels as .npz next to the PNG")
    return parser.parse_args(argv)


# Samplers with a step count and timestep spacing of their own; DDPM always runs every training timestep.
NON_DDPM_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_2m_karras")


def _sample_config(config, args: argparse.Namespace):
    """Return the run config's SampleConfig with the options given on the command line replaced."""
    import dataclasses

    changes = {"sampler": args.sampler, "num_steps": args.steps, "eta": args.eta, "spacing": args.spacing,
               "clip_sample": args.clip_sample, "guidance_scale": args.guidance, "samples_per_class": args.per_class}
    sample_config = dataclasses.replace(config.sample,
                                        **{key: value for key, value in changes.items() if value is not None})
    for flag, value, used_by in (("--eta", args.eta, ("ddim",)), ("--spacing", args.spacing, NON_DDPM_SAMPLERS),
                                 ("--steps", args.steps, NON_DDPM_SAMPLERS)):
        if value is not None and sample_config.sampler not in used_by:
            print(f"warning: {flag} {value} is ignored by the {sample_config.sampler} sampler; it applies to "
                  f"{', '.join(used_by)}", file=sys.stderr)
    return sample_config


def load_weights(run: pathlib.Path, *, step: int | None, ema: bool) -> tuple[dict, int]:
    """Read the model or EMA state_dict of a torch run's checkpoint onto the CPU; return it and its step.

    Raises:
        SampleError: the run has no checkpoint, the step has none, or the weights file is missing.
    """
    from safetensors.torch import load_file

    from torch_npu_backend.train_state import EMA_FILE, MODEL_FILE, CheckpointStore

    store = CheckpointStore(run, max_to_keep=1)
    steps = store.steps()
    if not steps:
        step_folders = sorted(store.directory.glob("[0-9]*")) if store.directory.is_dir() else []
        if step_folders:
            raise SampleError(f"the checkpoints of run folder {run} ({', '.join(p.name for p in step_folders)}) have no "
                              f"{MODEL_FILE} and {EMA_FILE}, so python -m torch_npu_backend.train did not write them; "
                              "sample a jaxgen run folder with python -m jaxgen.sample")
        raise SampleError(f"run folder {run} has no checkpoint under {store.directory}; train first, e.g. "
                          "python -m torch_npu_backend.train --cfg ddpm_digits")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise SampleError(f"run folder {run} has no checkpoint of step {step}; its checkpoints are steps "
                          f"{', '.join(map(str, steps))}")
    folder = store.directory / str(step)
    path = folder / (EMA_FILE if ema else MODEL_FILE)
    if not path.is_file():
        raise SampleError(f"checkpoint {folder} has no {path.name}, so python -m torch_npu_backend.train did not "
                          "write it; sample a jaxgen run folder with python -m jaxgen.sample, or pick another --step")
    try:
        return load_file(path), step
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise SampleError(f"checkpoint file {path} is unreadable ({type(error).__name__}: {error}); pick another "
                          "--step or retrain") from error


def main(argv: list[str] | None = None) -> int:
    """Run `torch_npu_backend.sample` and return the process exit code."""
    args = parse_args(argv)
    if args.out is not None and pathlib.Path(args.out).suffix.lower() != ".png":
        print(f"error: --out {args.out} must be a .png file path, e.g. --out samples.png", file=sys.stderr)
        return 2
    if args.per_class is not None and args.per_class < 1:
        print(f"error: --per-class {args.per_class} is invalid; use a positive integer", file=sys.stderr)
        return 2
    # JAX only builds the noise schedule here. Keep it off the accelerator that torch samples on.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    from jaxgen import checkpoint, images
    from torch_npu_backend import sampling
    from torch_npu_backend.device import DeviceUnavailableError, resolve_device
    from torch_npu_backend.models import build_torch_model
    from torch_npu_backend.precision import to_device

    run = pathlib.Path(args.run)
    if not run.is_dir():
        print(f"error: run folder {run} does not exist; train one first, e.g. python -m torch_npu_backend.train "
              "--cfg ddpm_digits", file=sys.stderr)
        return 2
    try:
        config = checkpoint.read_run_config(run, expected_task="diffusion")
        sample_config = _sample_config(config, args)
        state_dict, step = load_weights(run, step=args.step, ema=args.ema)
        model = build_torch_model(config)
        model.load_state_dict(state_dict, strict=True)
        num_classes = config.model.num_class_embeds - 1
        labels = parse_labels(args.labels, num_classes, sample_config.samples_per_class)
        scheduler = sampling.make_scheduler(config.diffusion, sample_config)
        settings = sampling.sampler_settings(config.diffusion, sample_config)
        device = resolve_device(args.device)
    except (checkpoint.RunFolderError, SampleError, ValueError, RuntimeError, DeviceUnavailableError) as error:
        # RuntimeError: load_state_dict lists missing, unexpected and mis-shaped keys.
        print(f"error: {error}", file=sys.stderr)
        return 2

    model = to_device(model, device, "model").eval()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    size = config.data.image_size
    x_T = torch.randn((len(labels), config.model.in_channels, size, size), generator=generator).to(device)
    guidance = sample_config.guidance_scale
    model_labels = torch.from_numpy(labels).long()
    if guidance == 0.0:
        model_labels = torch.full_like(model_labels, num_classes)  # the null class alone
    # Scales 0 and 1 need one model call per step: the null class or the labels alone.
    scale = None if guidance in (0.0, 1.0) else guidance
    x_0 = sampling.sample(model, scheduler, x_T, model_labels.to(device), num_steps=settings.num_steps,
                          guidance_scale=scale, null_label=num_classes, generator=generator, eta=settings.eta,
                          use_clipped_model_output=settings.use_clipped_model_output)
    samples = x_0.clamp(-1.0, 1.0).permute(0, 2, 3, 1).float().cpu().numpy()  # [N, H, W, C]

    out = pathlib.Path(args.out) if args.out else run / "samples" / f"{sample_config.sampler}.png"
    ncols = num_classes if args.labels is None else min(len(labels), 10)
    images.save_grid(samples, out, ncols=ncols)
    weights = "EMA" if args.ema else "trained"
    print(f"wrote {len(labels)} samples from step {step} ({weights} weights, {sample_config.sampler}, "
          f"{settings.num_steps} steps, guidance {guidance}) to {out}")
    if args.save_npz:
        npz = out.with_suffix(".npz")
        np.savez(npz, images=samples, labels=labels)
        print(f"wrote raw samples to {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
