"""Short captioned clips of real handwritten digits moving across a canvas, built from scikit-learn's scans.

Each clip shows one 8x8 digit scan from `sklearn.datasets.load_digits`, upsampled to `digit_side` pixels,
moving left, right, up or down at a constant whole number of pixels per frame, and never leaving the canvas.
The caption states the digit and the motion, for example "the digit seven moves to the left". The labels
(digit, direction, colours, start position) come back with the clips, so a scorer can check generated
videos against the caption. The "test" split draws only from the scans that the digits data set holds out,
so test clips show handwriting that no training clip shows.

`make_digit_clips` returns the clips in memory and `write_digit_clip_folder` writes them as video files plus
an Open-Sora style metadata CSV with the columns `path` and `text`. The videos are animated GIFs by default,
or MP4 files or lossless .npy arrays on request, written by `jaxgen.video_io.write_video`. A GIF
stores at most 256 colours per frame, so its pixels can differ slightly from the in-memory clip. These
few-colour clips come back unchanged with Pillow 13.0. An MP4 file stores colour at half the height and
width, which blurs the edges of tinted digits. The output depends only on the arguments.

Shape vocabulary: N clips, T frames, H and W the canvas height and width, D the digit side.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib

import numpy as np

from jaxgen.data.digits import digits_dataset_builder as digits_lib
from jaxgen.data.image_caption.builtin import COLOURS, DIGIT_NAMES
# write_gif is imported from here too, so it stays importable from this module.
from jaxgen.video_io import write_gif, write_video

DIRECTIONS = ("left", "right", "up", "down")
# (row, column) step of the digit per frame in each direction, in units of the speed.
_STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_MOTION_WORDS = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down"}
VIDEO_FORMATS = ("gif", "mp4", "npy")
CSV_COLUMNS = ("path", "text", "digit", "direction", "num_frames", "height", "width", "fps")


@dataclasses.dataclass(frozen=True)
class DigitClips:
    """Generated clips with the labels a scorer needs to check them."""

    frames: np.ndarray  # uint8 [N, T, H, W, 3]
    caption: np.ndarray  # str (object) [N]
    digit: np.ndarray  # int32 [N], 0..9
    direction: np.ndarray  # int32 [N], index into DIRECTIONS
    scan_index: np.ndarray  # int32 [N], index of the scan in sklearn's order
    ink: np.ndarray  # uint8 [N, 3], RGB colour of the digit's strokes
    background: np.ndarray  # uint8 [N, 3], RGB colour of the canvas
    start: np.ndarray  # int32 [N, 2], (top, left) of the digit in frame 0
    speed: int  # pixels the digit moves per frame

    def __len__(self) -> int:
        return len(self.caption)


def make_digit_clips(
    num_clips: int,
    *,
    split: str = "train",
    num_frames: int = 16,
    size: tuple[int, int] = (32, 32),
    digit_side: int = 16,
    speed: int = 1,
    tinted: bool = False,
    seed: int = 0,
) -> DigitClips:
    """Generate `num_clips` clips of one handwritten digit moving in a straight line at constant speed.

    Args:
        num_clips: number of clips N.
        split: "train" uses the 1,497 scans the digits data set trains on, "test" its 300 held-out scans.
            Scans repeat only if N exceeds the split's scans.
        num_frames: frames T per clip.
        size: (height, width) of the canvas in pixels.
        digit_side: side D of the upsampled digit in pixels.
        speed: pixels the digit moves per frame. The path, speed * (T - 1) pixels, must fit in both
            (height - D) and (width - D), because a clip may move along either axis.
        tinted: if False, a white digit on black. If True, each clip draws two different colours from
            `COLOURS` for the digit and the background, and the caption names them.
        seed: picks the scans, directions, colours and start positions.

    Raises:
        ValueError: if a value is out of range or the path does not fit on the canvas.
    """
    height, width = _check_geometry(num_clips, split, num_frames, size, digit_side, speed)
    images, labels = digits_lib.load_source()
    held_out = np.zeros(len(labels), bool)
    held_out[digits_lib.held_out_indices(labels)] = True
    pool = np.flatnonzero(held_out if split == "test" else ~held_out)

    rng = np.random.default_rng([seed, digits_lib.SPLITS.index(split)])
    scans = rng.choice(pool, size=num_clips, replace=num_clips > len(pool))
    # Ink intensity in [0, 1], upsampled with the same PIL bilinear filter as the digits data set.
    ink_maps = (digits_lib.resize_images(images[scans], digit_side)[..., 0] + 1.0) / 2.0  # [N, D, D]

    travel = speed * (num_frames - 1)
    colour_names = list(COLOURS)
    frames = np.empty((num_clips, num_frames, height, width, 3), np.uint8)
    captions, directions, inks, backgrounds, starts = [], [], [], [], []
    for clip in range(num_clips):
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        if tinted:
            ink_index, background_index = rng.choice(len(colour_names), size=2, replace=False)
            ink_name, background_name = colour_names[ink_index], colour_names[background_index]
            ink, background = COLOURS[ink_name], COLOURS[background_name]
        else:
            ink, background = (255, 255, 255), (0, 0, 0)
        step_y, step_x = _STEPS[direction]
        start = (_start_offset(rng, step_y, height - digit_side, travel),
                 _start_offset(rng, step_x, width - digit_side, travel))

        frames[clip] = _render(ink_maps[clip], np.asarray(ink, np.float32), np.asarray(background, np.float32),
                               start, (step_y * speed, step_x * speed), num_frames, (height, width))
        digit = int(labels[scans[clip]])
        caption = f"the digit {DIGIT_NAMES[digit]}"
        if tinted:
            caption += f" in {ink_name} {_MOTION_WORDS[direction]} on a {background_name} background"
        else:
            caption += f" {_MOTION_WORDS[direction]}"
        captions.append(caption)
        directions.append(DIRECTIONS.index(direction))
        inks.append(ink)
        backgrounds.append(background)
        starts.append(start)

    return DigitClips(
        frames=frames,
        caption=np.asarray(captions, dtype=object),
        digit=labels[scans].astype(np.int32),
        direction=np.asarray(directions, np.int32),
        scan_index=scans.astype(np.int32),
        ink=np.asarray(inks, np.uint8),
        background=np.asarray(backgrounds, np.uint8),
        start=np.asarray(starts, np.int32),
        speed=speed,
    )


def write_digit_clip_folder(
    path: str | os.PathLike[str],
    num_clips: int = 64,
    *,
    split: str = "train",
    video_format: str = "gif",
    fps: int = 10,
    **clip_options,
) -> pathlib.Path:
    """Write clips from `make_digit_clips` as video files plus `{split}.csv`, and return the CSV's path.

    The videos go to `{path}/{split}/clip_NNNN.{gif,mp4,npy}`. The CSV has the Open-Sora metadata columns `path`
    (relative to the CSV's folder) and `text`, followed by the labels `digit` (0..9), `direction` (a name in
    DIRECTIONS), `num_frames`, `height`, `width` and `fps`. Existing files of the same names are overwritten.

    Args:
        path: folder to write into, created if missing.
        num_clips: number of clips.
        split: "train" or "test", as in `make_digit_clips`.
        video_format: "gif" (animated GIF, up to 256 colours per frame), "mp4" (H.264 in yuv420p, lossy, needs
            an even height and width) or "npy" (uint8 [T, H, W, 3], lossless).
        fps: frames per second stored in each GIF or MP4 file and in the CSV. GIF stores frame durations in
            units of 10 ms, so it allows at most 100 and rounds rates that do not divide 100.
        **clip_options: the keyword arguments of `make_digit_clips` (num_frames, size, digit_side, speed,
            tinted, seed).

    Raises:
        ValueError: if video_format or fps is invalid, a clip option is out of range, or MP4 clips would have
            an odd height or width.
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"invalid video_format {video_format!r}. Expected one of {list(VIDEO_FORMATS)}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if video_format == "gif" and fps > 100:
        raise ValueError(f"fps must be at most 100 for GIF, whose timing is in 10 ms units, got {fps!r}")
    clips = make_digit_clips(num_clips, split=split, **clip_options)
    _, num_frames, height, width, _ = clips.frames.shape
    if video_format == "mp4" and (height % 2 or width % 2):
        raise ValueError(f"MP4 clips need an even height and width for yuv420p, got size ({height}, {width}). "
                         "Pass an even size= or write gif or npy")
    folder = pathlib.Path(path)
    video_folder = folder / split
    video_folder.mkdir(parents=True, exist_ok=True)

    rows = []
    for index, frames in enumerate(clips.frames):
        relative = f"{split}/clip_{index:04d}.{video_format}"
        write_video(folder / relative, frames, fps=fps)
        rows.append({
            "path": relative,
            "text": clips.caption[index],
            "digit": int(clips.digit[index]),
            "direction": DIRECTIONS[clips.direction[index]],
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "fps": fps,
        })

    csv_path = folder / f"{split}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def _check_geometry(num_clips, split, num_frames, size, digit_side, speed) -> tuple[int, int]:
    """Validate the clip arguments and return the canvas (height, width)."""
    for name, value, minimum in (("num_clips", num_clips, 1), ("num_frames", num_frames, 1),
                                 ("digit_side", digit_side, 8), ("speed", speed, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if split not in digits_lib.SPLITS:
        raise ValueError(f"invalid split {split!r}. Expected one of {list(digits_lib.SPLITS)}")
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = (int(side) for side in size)
    travel = speed * (num_frames - 1)
    room = min(height, width) - digit_side
    if travel > room:
        raise ValueError(
            f"a digit of side {digit_side} moving {speed} pixels per frame for {num_frames} frames travels "
            f"{travel} pixels, but the canvas {height}x{width} leaves only {room}. Use a larger size, a "
            "smaller digit_side, fewer frames or a lower speed"
        )
    return height, width


def _start_offset(rng: np.random.Generator, step: int, room: int, travel: int) -> int:
    """Draw the digit's start offset along one axis so that its whole path stays within [0, room]."""
    if step > 0:
        return int(rng.integers(0, room - travel + 1))
    if step < 0:
        return int(rng.integers(travel, room + 1))
    return int(rng.integers(0, room + 1))


def _render(ink_map, ink, background, start, step, num_frames, size) -> np.ndarray:
    """Draw uint8 [T, H, W, 3] frames of the [D, D] ink map blended from `background` to `ink`."""
    side = ink_map.shape[0]
    tile = ink_map[..., None] * ink + (1.0 - ink_map[..., None]) * background  # [D, D, 3]
    frames = np.empty((num_frames, *size, 3), np.float32)
    frames[...] = background
    for frame in range(num_frames):
        top = start[0] + step[0] * frame
        left = start[1] + step[1] * frame
        frames[frame, top:top + side, left:left + side] = tile
    return np.round(frames).astype(np.uint8)
