"""A small built-in image-caption folder made from scikit-learn's real handwritten digit scans.

`write_digit_caption_folder(path)` writes PNG images and metadata.jsonl in the layout that
`image_caption_dataset_builder` reads. Each image is one 8x8 digit scan, upsampled and drawn in one
colour on a background of another. The canvas is square, wide or tall, and in a wide or tall canvas the
digit sits at one end. Captions state the digit, the colours and the position, for example "a handwritten
digit seven in white on a blue background, on the left". The output depends only on the arguments.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import PIL.Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (235, 200, 40),
}
# (height, width) of the canvases, in units of the digit's side, and the positions the digit may take.
CANVASES = (
    ((1, 1), ("in the centre",)),
    ((1, 2), ("on the left", "on the right")),
    ((2, 1), ("at the top", "at the bottom")),
)


def write_digit_caption_folder(path: str | os.PathLike[str], *, num_images: int = 60, digit_side: int = 48,
                               seed: int = 0) -> pathlib.Path:
    """Write `num_images` captioned digit images and metadata.jsonl into `path` and return the folder.

    Args:
        path: folder to create (existing files of the same names are overwritten).
        num_images: images to write; they cycle through the square, wide and tall canvases.
        digit_side: side in pixels of the upsampled digit; canvases are 1 or 2 digit sides per axis.
        seed: picks the scans, colours and positions.
    """
    from sklearn.datasets import load_digits

    if num_images < 1 or digit_side < 8:
        raise ValueError(f"num_images={num_images} must be >= 1 and digit_side={digit_side} >= 8")
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    scans = rng.choice(len(digits.target), size=num_images, replace=False)
    colour_names = list(COLOURS)

    records = []
    for number, scan_index in enumerate(scans):
        (rows, cols), positions = CANVASES[number % len(CANVASES)]
        foreground, background = rng.choice(len(colour_names), size=2, replace=False)
        position = int(rng.integers(len(positions)))
        digit = int(digits.target[scan_index])

        # Scan values are ink intensities in 0..16; blend the two colours by intensity.
        ink = PIL.Image.fromarray(np.asarray(digits.images[scan_index], np.float32) / 16.0)
        ink = np.clip(np.asarray(ink.resize((digit_side, digit_side), PIL.Image.Resampling.BILINEAR)), 0, 1)
        tile = (ink[..., None] * np.asarray(COLOURS[colour_names[foreground]], np.float32)
                + (1 - ink[..., None]) * np.asarray(COLOURS[colour_names[background]], np.float32))
        canvas = np.empty((rows * digit_side, cols * digit_side, 3), np.float32)
        canvas[...] = np.asarray(COLOURS[colour_names[background]], np.float32)
        top = position * digit_side if rows == 2 else 0
        left = position * digit_side if cols == 2 else 0
        canvas[top:top + digit_side, left:left + digit_side] = tile

        file_name = f"digit_{number:04d}.png"
        PIL.Image.fromarray(np.round(canvas).astype(np.uint8)).save(folder / file_name)
        caption = (f"a handwritten digit {DIGIT_NAMES[digit]} in {colour_names[foreground]} on a "
                   f"{colour_names[background]} background, {positions[position]}")
        records.append({"file_name": file_name, "text": caption})

    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return folder
