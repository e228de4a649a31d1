"""TFDS builder for a folder of images with captions, bucketed by aspect ratio.

The folder layout is the Hugging Face "imagefolder" layout that diffusers' text-to-image training scripts
read. It contains image files plus `metadata.jsonl` (one JSON object per line) or `metadata.csv`. Each
record names its image in `file_name`, relative to the folder, and its caption in a caption column
(`text` unless configured otherwise).

Each image is assigned the bucket whose aspect ratio is closest to its own, scaled so that it covers the
bucket, and centre-cropped to the bucket's size. A bucket is a (height, width) pair with about
resolution**2 pixels, both sides multiples of `multiple`. The crop offset and the original size are stored
too, because SDXL conditions on them. Images are stored as PNG bytes in array_record files and decoded
with PIL, so reading the data set does not import TensorFlow. An unreadable image is skipped with a logged
warning, and `reader.load_image_caption` reports how many were skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"


@dataclasses.dataclass(frozen=True)
class Record:
    """One metadata row: the image path relative to the folder and its caption."""

    file_name: str
    caption: str


def read_metadata(folder: str | os.PathLike[str], caption_column: str = "text") -> list[Record]:
    """Read metadata.jsonl or metadata.csv of an image-caption folder.

    Raises:
        FileNotFoundError: the folder or its metadata file does not exist.
        ValueError: a record lacks the file_name or caption column, or the metadata has no records.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image-caption folder {folder} does not exist")
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{folder} has no {' or '.join(METADATA_FILES)}; write one record per image with the columns "
            f"{FILE_COLUMN!r} and {caption_column!r}"
        )
    path = present[0]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
    else:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))

    records = []
    for number, row in enumerate(rows, start=1):
        for column in (FILE_COLUMN, caption_column):
            if not isinstance(row, dict) or row.get(column) is None:
                found = sorted(row) if isinstance(row, dict) else row
                raise ValueError(
                    f"record {number} of {path} has no {column!r} column (found {found!r}); set the caption "
                    "column with caption_column= if the captions are under another name"
                )
        records.append(Record(str(row[FILE_COLUMN]), str(row[caption_column])))
    if not records:
        raise ValueError(f"{path} contains no records")
    return records


def make_buckets(resolution: int, multiple: int = 64, max_aspect_ratio: float = 2.0) -> tuple[tuple[int, int], ...]:
    """Return (height, width) buckets of at most resolution**2 pixels, both sides multiples of `multiple`.

    For each width w (a multiple of `multiple`), the height h is the largest multiple that keeps h * w within
    resolution**2, and both (h, w) and its transpose (w, h) become buckets. Buckets whose aspect ratio
    exceeds `max_aspect_ratio` either way are dropped. The square bucket (resolution, resolution) is always
    included.
    """
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution={resolution} must be a positive multiple of multiple={multiple}")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be at least 1")
    area = resolution * resolution
    buckets = set()
    for width in range(multiple, int(resolution * max_aspect_ratio) + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and max(height / width, width / height) <= max_aspect_ratio:
            buckets.update({(height, width), (width, height)})
    return tuple(sorted(buckets, key=lambda hw: hw[0] / hw[1]))


def nearest_bucket(height: int, width: int, buckets: tuple[tuple[int, int], ...]) -> int:
    """Return the index of the bucket whose aspect ratio is closest to height / width (in log space)."""
    ratio = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def resize_and_crop(image: PIL.Image.Image, bucket: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale `image` to cover `bucket`, centre-crop it to the bucket, and return (uint8 [h, w, 3], (top, left)).

    (top, left) is the crop offset in the scaled image, which SDXL calls crop_coords_top_left.
    """
    target_h, target_w = bucket
    scale = max(target_h / image.height, target_w / image.width)
    scaled_h = max(target_h, round(image.height * scale))
    scaled_w = max(target_w, round(image.width * scale))
    scaled = image.convert("RGB").resize((scaled_w, scaled_h), PIL.Image.Resampling.BICUBIC)
    top = (scaled_h - target_h) // 2
    left = (scaled_w - target_w) // 2
    cropped = scaled.crop((left, top, left + target_w, top + target_h))
    return np.asarray(cropped, np.uint8), (top, left)


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Return a short digest of the folder's absolute path and its metadata file, naming a prepared copy.

    A changed metadata file gives a new name, so the data set is prepared again. NOTE: edits to image files
    that leave the metadata unchanged are not detected.
    """
    folder = pathlib.Path(folder).resolve()
    digest = hashlib.sha256(str(folder).encode())
    for name in METADATA_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class ImageCaptionConfig(tfds.core.BuilderConfig):
    """Builder config: the source folder, the caption column and the bucket layout."""

    folder: str = ""
    caption_column: str = "text"
    resolution: int = 64
    multiple: int = 64
    max_aspect_ratio: float = 2.0

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        return make_buckets(self.resolution, self.multiple, self.max_aspect_ratio)


def make_config(folder: str | os.PathLike[str], *, resolution: int, multiple: int = 64,
                max_aspect_ratio: float = 2.0, caption_column: str = "text") -> ImageCaptionConfig:
    """Return the builder config of one folder and bucket layout, named after both."""
    name = f"{resolution}px_m{multiple}_r{max_aspect_ratio:g}_{caption_column}_{folder_fingerprint(folder)}"
    return ImageCaptionConfig(
        name=name.replace(".", "p"),
        folder=str(pathlib.Path(folder).resolve()),
        caption_column=caption_column,
        resolution=resolution,
        multiple=multiple,
        max_aspect_ratio=max_aspect_ratio,
        description=f"Images of {folder} in aspect-ratio buckets of about {resolution}x{resolution} pixels.",
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """Builder for "image_caption": a local image folder with captions, in aspect-ratio buckets."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: PNG bytes, caption, bucket, original size and crop offset."}

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = "array_record", **kwargs: Any):
        # array_record is the default because TFDS reads it without TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    # NOTE: TFDS 4.9.10 resolves the inherited `code_path` through `importlib_resources`, which it declares
    # only for Python < 3.9; returning this module's file avoids that import.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images with captions from a local folder, resized and cropped to aspect-ratio buckets.",
            features=tfds.features.FeaturesDict({
                "image_png": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
                "bucket": tfds.features.Tensor(shape=(), dtype=np.int32),
                "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "crop_top_left": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # The images are local, so nothing is downloaded.
        config = self.builder_config
        if not config.folder:
            raise ValueError("the image_caption builder needs a config from make_config(folder, ...)")
        records = read_metadata(config.folder, config.caption_column)
        return {"train": self._generate_examples(records)}

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        buckets = config.buckets
        folder = pathlib.Path(config.folder)
        skipped = 0
        for index, record in enumerate(records):
            path = folder / record.file_name
            try:
                with PIL.Image.open(path) as image:
                    image.load()
                    original = (image.height, image.width)
                    bucket = nearest_bucket(*original, buckets)
                    pixels, crop = resize_and_crop(image, buckets[bucket])
            except (OSError, ValueError) as error:  # PIL raises OSError subclasses for unreadable files.
                skipped += 1
                logger.warning("skipping unreadable image %s (record %d): %s", path, index + 1, error)
                continue
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels).save(buffer, format="PNG")
            yield index, {
                "image_png": buffer.getvalue(),
                "caption": record.caption,
                "file_name": record.file_name,
                "bucket": np.int32(bucket),
                "original_size": np.asarray(original, np.int32),
                "crop_top_left": np.asarray(crop, np.int32),
            }
        if skipped:
            logger.warning("skipped %d of %d images in %s", skipped, len(records), folder)
