"""Score the generated digit videos of a text-to-video run against their captions, with a ceiling and floors.

The text-to-video run writes its generated videos for held-out captions to RUN/samples/step_XXXXXX.npz, with
the arrays frames (uint8 [N, T, H, W, 3]), digit (int32 [N]) and direction (int32 [N], an index into
("left", "right", "up", "down")). This script scores the newest of those files, or --samples, with
jaxgen.video_scoring. That scorer locates the digit in every frame and classifies it with a classifier
fitted on real training clips. It reads the direction from the line through the digit's positions over time.
The training writes the label -1 for a caption that is not a built-in one (tinted or custom captions), and
such clips are left out and counted in the header.

Rows of the table, the Markdown file and the JSON:
  samples               the generated videos against the labels they were generated for
  real clips (ceiling)  N real "test" split clips of make_digit_clips (handwriting that no training clip
                        shows) with the samples' T, H and W, against their own labels
  shuffled labels       the same real clips against a random permutation of their labels: the measured floor
  chance                uniform guessing: 1/10 for the digit, 1/4 for the direction

Columns:
  digit acc per frame   fraction of all N * T frames whose digit is read correctly (a frame without ink is wrong)
  digit acc per clip    fraction of clips whose majority vote over frames is correct
  direction acc         fraction of clips whose direction is read correctly (a static clip is wrong)
  N                     clips scored
  frames without ink    frames in which the scorer found no digit
  static clips          clips that moved less than a quarter of a real clip's travel, or had under two inked frames

  python -m benchmarks.video_quality --run runs/opensora
  python -m benchmarks.video_quality --run runs/opensora --samples runs/opensora/samples/step_002000.npz \
      --out benchmarks/results/video_quality.json

The JSON goes to --out and the Markdown table beside it (the --out path with the suffix .md) unless
--markdown names another path. Scoring runs on the CPU with NumPy and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLE_KEYS = ("frames", "digit", "direction")
SAMPLE_NAME = re.compile(r"step_(\d+)\.npz")
TRAIN_COMMAND = "python -m jaxgen.train --cfg opensora.py"
ROW_NAMES = ("samples", "real clips (ceiling)", "shuffled labels", "chance")
CHANCE = {"digit_accuracy": 0.1, "clip_digit_accuracy": 0.1, "direction_accuracy": 0.25}
TABLE_COLUMNS = ("row", "digit acc per frame", "digit acc per clip", "direction acc", "N", "frames without ink",
                 "static clips")


class SamplesError(Exception):
    """The samples to score are missing or unreadable."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None,
                        help="run folder of the text-to-video model; its newest samples/step_*.npz is scored")
    parser.add_argument("--samples", default=None, help="samples .npz file to score instead of the run's newest")
    parser.add_argument("--out", default="benchmarks/results/video_quality.json", help="JSON output path")
    parser.add_argument("--markdown", default=None,
                        help="Markdown table output path (default: the --out path with the suffix .md)")
    parser.add_argument("--digit-side", type=int, default=None,
                        help="side in pixels of the digit in the training clips (default: the run's "
                             "data.builtin_digit_side, else 16)")
    parser.add_argument("--speed", type=int, default=None,
                        help="pixels per frame the digit moves in the training clips (default: the run's "
                             "data.builtin_speed, else 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the real test clips and of the label permutation")
    args = parser.parse_args(argv)
    if args.run is None and args.samples is None:
        parser.error("give --run RUN (scores its newest samples/step_*.npz) or --samples FILE")
    run_data = run_data_settings(args.run)
    if args.digit_side is None:
        args.digit_side = int(run_data.get("builtin_digit_side", 16))
    if args.speed is None:
        args.speed = int(run_data.get("builtin_speed", 1))
    if args.digit_side < 8:
        parser.error(f"--digit-side={args.digit_side} is invalid; use 8 or more")
    if args.speed < 1:
        parser.error(f"--speed={args.speed} is invalid; use 1 or more")
    return args


def run_data_settings(run: str | None) -> dict[str, Any]:
    """Return the `data` section of RUN/config.json (written by jaxgen.train), or {} when there is none."""
    if run is None:
        return {}
    path = pathlib.Path(run) / "config.json"
    try:
        data = json.loads(path.read_text()).get("data", {})
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def newest_samples(run: str | os.PathLike[str]) -> pathlib.Path:
    """Return the samples/step_*.npz file of `run` with the highest step.

    Raises:
        SamplesError: if the run folder does not exist or has no samples file.
    """
    run = pathlib.Path(run)
    if not run.is_dir():
        raise SamplesError(f"run folder {run} not found. Train a text-to-video model first: {TRAIN_COMMAND}")
    steps = {}
    for path in (run / "samples").glob("step_*.npz"):
        match = SAMPLE_NAME.fullmatch(path.name)
        if match:
            steps[int(match.group(1))] = path
    if not steps:
        raise SamplesError(
            f"no samples/step_*.npz in run folder {run}. The text-to-video training writes them: {TRAIN_COMMAND} "
            "(with train.workdir set to this folder), or pass a samples file with --samples"
        )
    return steps[max(steps)]


def load_samples(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Load frames, digit and direction from a samples .npz file.

    Raises:
        SamplesError: if the file is missing or lacks one of SAMPLE_KEYS.
    """
    if not path.is_file():
        raise SamplesError(f"samples file {path} not found")
    # Only SAMPLE_KEYS are read, so a caption array stored as Python objects needs no unpickling.
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in SAMPLE_KEYS if key not in archive.files]
        if missing:
            raise SamplesError(f"samples file {path} lacks the array(s) {', '.join(missing)}; it contains "
                               f"{', '.join(archive.files) or 'nothing'} but needs {', '.join(SAMPLE_KEYS)}")
        return {key: archive[key] for key in SAMPLE_KEYS}


def drop_unlabelled(samples: dict[str, np.ndarray], path: pathlib.Path) -> tuple[dict[str, np.ndarray], int]:
    """Return the samples whose digit and direction are both labelled (not -1), and the number left out.

    Raises:
        SamplesError: if no clip is labelled.
    """
    digit, direction = np.asarray(samples["digit"]), np.asarray(samples["direction"])
    if digit.shape != direction.shape or digit.shape != np.shape(samples["frames"])[:1]:
        return samples, 0  # score_videos reports the mismatched shapes
    labelled = (digit != -1) & (direction != -1)
    if not labelled.any():
        raise SamplesError(
            f"none of the {len(labelled)} clips in {path} has a digit and direction label (all are -1). The scorer "
            "needs the built-in captions of white digits on black, such as \"the digit seven moves to the left\""
        )
    kept = {key: np.asarray(value)[labelled] for key, value in samples.items()}
    return kept, int((~labelled).sum())


def score_rows(samples: dict[str, np.ndarray], *, digit_side: int, speed: int, seed: int) -> list[dict[str, Any]]:
    """Score the samples, N real test clips of the same shape, those clips with shuffled labels, and chance.

    Raises:
        ValueError: if the samples have invalid shapes or labels, or real clips of their shape cannot be made.
    """
    from jaxgen.data.video_caption.builtin import make_digit_clips
    from jaxgen.video_scoring import score_videos

    frames = samples["frames"]
    rows = [{"row": ROW_NAMES[0], **score_videos(frames, samples["digit"], samples["direction"],
                                                 digit_side=digit_side, speed=speed)}]

    num_clips, num_frames, height, width = frames.shape[:4]
    try:
        real = make_digit_clips(num_clips, split="test", num_frames=num_frames, size=(height, width),
                                digit_side=digit_side, speed=speed, seed=seed)
    except ValueError as error:
        raise ValueError(f"cannot make real clips shaped like the samples ({num_clips} clips of {num_frames} "
                         f"frames, {height}x{width}): {error}") from error
    rows.append({"row": ROW_NAMES[1], **score_videos(real.frames, real.digit, real.direction,
                                                     digit_side=digit_side, speed=speed)})

    # One permutation for both labels, so that each clip is scored against another clip's real caption.
    permutation = np.random.default_rng(seed).permutation(num_clips)
    rows.append({"row": ROW_NAMES[2], **score_videos(real.frames, real.digit[permutation],
                                                     real.direction[permutation], digit_side=digit_side,
                                                     speed=speed)})
    rows.append({"row": ROW_NAMES[3], **CHANCE, "num_clips": None, "frames_without_ink": None, "static_clips": None})
    return rows


def environment() -> dict[str, Any]:
    """Return the CPU description and the versions of the libraries that score."""
    import sklearn

    cpu_model = None
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu_model = names[0] if names else None
    return {
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__},
        "cpu": {"processor": platform.processor(), "model": cpu_model, "machine": platform.machine(),
                "cpu_count": os.cpu_count()},
    }


def format_table(result: dict) -> str:
    """Render the result as Markdown: the command, the setup, then one table row per entry of ROW_NAMES."""
    cpu = result["environment"]["cpu"]
    versions = result["environment"]["versions"]
    classifier = result["classifier"]
    step = "" if result["step"] is None else f" (step {result['step']})"
    unlabelled = result["unlabelled_clips_left_out"]
    unlabelled_note = f" ({unlabelled} more without labels left out)" if unlabelled else ""
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"{cpu['model'] or cpu['processor'] or cpu['machine']}, {cpu['cpu_count']} CPUs; "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        f"Samples `{result['samples']}`{step}: {result['num_clips']} clips of {result['frames_per_clip']} frames, "
        f"{result['height']}x{result['width']}"
        f"{unlabelled_note}, scored for a digit of side {result['digit_side']} moving "
        f"{result['speed']} pixel(s) per frame. Real clips: \"test\" split, seed {result['seed']}. Digit "
        f"classifier: {classifier['kind']} fitted on {classifier['train_crops']} crops of real training clips in "
        f"{classifier['fit_seconds']:.1f} s. Scoring took {result['scoring_seconds']:.1f} s.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + " --- |" * len(TABLE_COLUMNS),
    ]
    for row in result["rows"]:
        cells = [row["row"], f"{row['digit_accuracy']:.3f}", f"{row['clip_digit_accuracy']:.3f}",
                 f"{row['direction_accuracy']:.3f}"]
        cells += ["-" if row[key] is None else str(row[key]) for key in ("num_clips", "frames_without_ink",
                                                                         "static_clips")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = pathlib.Path(args.samples) if args.samples else newest_samples(args.run)
        samples, unlabelled_clips = drop_unlabelled(load_samples(path), path)
    except SamplesError as error:
        print(f"benchmarks.video_quality: {error}", file=sys.stderr)
        return 2

    from jaxgen.video_scoring import fit_digit_classifier

    classifier = fit_digit_classifier(args.digit_side)
    started = time.perf_counter()
    try:
        rows = score_rows(samples, digit_side=args.digit_side, speed=args.speed, seed=args.seed)
    except ValueError as error:
        print(f"benchmarks.video_quality: cannot score {path}: {error}", file=sys.stderr)
        return 2
    scoring_seconds = time.perf_counter() - started

    match = SAMPLE_NAME.fullmatch(path.name)
    num_clips, frames_per_clip, height, width = samples["frames"].shape[:4]
    command_args = sys.argv[1:] if argv is None else list(argv)
    result = {
        "command": " ".join(["python -m benchmarks.video_quality", *command_args]),
        "environment": environment(),
        "run": args.run,
        "samples": str(path),
        "step": int(match.group(1)) if match else None,
        "num_clips": int(num_clips),
        "unlabelled_clips_left_out": unlabelled_clips,
        "frames_per_clip": int(frames_per_clip),
        "height": int(height),
        "width": int(width),
        "digit_side": args.digit_side,
        "speed": args.speed,
        "seed": args.seed,
        "classifier": {"kind": f"sklearn SVC (RBF kernel, C={classifier.model.C:g})",
                       "train_crops": classifier.train_crops, "fit_seconds": classifier.fit_seconds},
        "scoring_seconds": scoring_seconds,
        "rows": rows,
    }

    table = format_table(result)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    markdown = pathlib.Path(args.markdown) if args.markdown else out.with_suffix(".md")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(table + "\n")
    print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
