"""Text-to-video sampling from a trained Open-Sora run; `python -m jaxgen.sample --cfg opensora.py --prompt "..."`.

The config names the run folder (`train.workdir`; the STDiT stage lives in its `stdit/` folder). The run's own
saved config, tokenizer, text encoder and VAE are read from disk, so the command needs no network. Each prompt
gives one video; with several prompts, or with --num-videos above 1, the videos are also tiled into one grid.

Example:
  python -m jaxgen.sample --cfg opensora.py --prompt "the digit seven moves to the left" --out seven.mp4
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import numpy as np

VIDEO_SUFFIXES = (".gif", ".mp4", ".npy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the text-to-video options to `jaxgen.sample`'s parser."""
    group = parser.add_argument_group("text to video (Open-Sora runs, with --cfg)")
    group.add_argument("--cfg", default=None, help="config of a text-to-video run, e.g. opensora.py or opensora.py:v1.2")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, as for jaxgen.train (e.g. train.workdir=runs/other)")
    group.add_argument("--prompt", action="append", default=[], help="caption of a video to draw (repeatable)")
    group.add_argument("--num-videos", type=int, default=1, help="videos per prompt, from consecutive seeds")
    group.add_argument("--video-steps", type=int, default=None,
                       help="Euler steps (default: the run's sample.num_steps)")
    group.add_argument("--video-guidance", type=float, default=None,
                       help="classifier-free guidance scale (default: the run's sample.guidance_scale)")


def main(args: argparse.Namespace) -> int:
    """Draw the videos that `args` requests and return the process exit code."""
    logger = logging.getLogger("jaxgen.sample")
    if not args.prompt:
        print('error: --cfg draws videos from text; add --prompt "the digit seven moves to the left"', file=sys.stderr)
        return 2
    if any(not prompt.strip() for prompt in args.prompt):
        print("error: --prompt is empty; give a caption, e.g. \"the digit seven moves to the left\"", file=sys.stderr)
        return 2
    if args.video_steps is not None and args.video_steps < 1:
        print(f"error: --video-steps {args.video_steps} is invalid; use a positive integer such as 30", file=sys.stderr)
        return 2
    if args.num_videos < 1:
        print(f"error: --num-videos {args.num_videos} is invalid; use a positive integer", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in VIDEO_SUFFIXES:
        print(f"error: --out {out} must end in one of {', '.join(VIDEO_SUFFIXES)} for a video", file=sys.stderr)
        return 2

    import jax
    from flax import nnx

    from jaxgen import checkpoint, config as config_lib, tasks, trainer
    from jaxgen.runtime import enable_compilation_cache

    enable_compilation_cache()
    try:
        config = config_lib.load_config(args.cfg, args.overrides)
        stages = [stage for stage in tasks.stage_configs(config) if stage.task == "opensora_stdit"]
        if not stages:
            raise ValueError(f"config {args.cfg} trains task {config.task!r}, which draws no videos; use opensora.py")
        workdir = pathlib.Path(stages[-1].train.workdir)
        if not workdir.is_dir():
            raise FileNotFoundError(f"run folder {workdir} does not exist; train it first with python -m jaxgen.train "
                                    f"--cfg {args.cfg} and the same --set options")
        run_config = checkpoint.read_run_config(workdir, expected_task="opensora_stdit")
        graphdef, params, rest, step = trainer.build_inference_model(run_config, workdir)
        task = tasks.make_task(run_config, {"caption": np.asarray(args.prompt, object)})
        text = task.text()
        for prompt in args.prompt:
            unknown = text.tokenizer.unknown_words(prompt)
            if unknown:
                logger.warning("prompt %r has words the run's vocabulary lacks, encoded as <unk>: %s", prompt,
                               ", ".join(dict.fromkeys(unknown)))
        steps = run_config.sample.num_steps if args.video_steps is None else args.video_steps
        guidance = run_config.sample.guidance_scale if args.video_guidance is None else args.video_guidance
        model = nnx.merge(graphdef, params, rest)
        prompts = [prompt for prompt in args.prompt for _ in range(args.num_videos)]
        videos = task.sample_videos(model, prompts, jax.random.PRNGKey(args.seed), num_steps=steps,
                                    guidance_scale=guidance)
    except (config_lib.ConfigError, checkpoint.RunFolderError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from jaxgen import video_io
    from jaxgen.tasks_opensora import write_video_grid

    out = out or workdir / "samples" / "prompt.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    fps = run_config.data.fps
    if len(videos) == 1:
        video_io.write_video(out, videos[0], fps=fps)
        written = [out]
    else:
        written = [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(len(videos))]
        for path, video in zip(written, videos):
            video_io.write_video(path, video, fps=fps)
        written.append(write_video_grid(videos, out.with_name(f"{out.stem}_grid"), ncols=min(8, len(videos)),
                                        fps=fps))
    print(f"wrote {len(videos)} video(s) of {videos.shape[1]} frames at {videos.shape[3]}x{videos.shape[2]} from "
          f"step {step} ({steps} Euler steps, guidance {guidance}): {', '.join(map(str, written))}")
    return 0
