"""Prepare an image-caption folder with TFDS and read it into memory, grouped by bucket."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import PIL.Image

from jaxgen.data.image_caption import image_caption_dataset_builder as builder_lib


@dataclasses.dataclass(frozen=True)
class BucketData:
    """The examples of one bucket. Axis letters: N examples, H and W the bucket's size."""

    size: tuple[int, int]  # (H, W)
    image: np.ndarray  # uint8 [N, H, W, 3]
    caption: np.ndarray  # str [N]
    original_size: np.ndarray  # int32 [N, 2], (height, width) before resizing
    crop_top_left: np.ndarray  # int32 [N, 2], (top, left) of the crop in the resized image

    def __len__(self) -> int:
        return len(self.caption)


@dataclasses.dataclass(frozen=True)
class ImageCaptionData:
    """A prepared image-caption folder: the non-empty buckets and the count of unreadable images skipped."""

    buckets: tuple[BucketData, ...]
    num_records: int
    num_skipped: int

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)


def load_image_caption(
    folder: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str],
    resolution: int,
    multiple: int = 64,
    max_aspect_ratio: float = 2.0,
    caption_column: str = "text",
) -> ImageCaptionData:
    """Prepare `folder` as a TFDS data set in `data_dir` on first use, then read it grouped by bucket.

    The prepared copy is named after the folder, its metadata file and the bucket settings, so a changed
    metadata file is prepared again. Reading goes through `builder.as_data_source()` without TensorFlow.

    Raises:
        FileNotFoundError, ValueError: as `read_metadata` and `make_buckets` raise for a bad folder or
            bucket settings; ValueError if no image of the folder could be read.
    """
    config = builder_lib.make_config(folder, resolution=resolution, multiple=multiple,
                                     max_aspect_ratio=max_aspect_ratio, caption_column=caption_column)
    num_records = len(builder_lib.read_metadata(folder, caption_column))
    builder = builder_lib.Builder(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    num_examples = builder.info.splits["train"].num_examples
    if num_examples == 0:
        raise ValueError(f"no image of {folder} could be read; see the warnings above for each file")
    source = builder.as_data_source("train")
    examples = source.__getitems__(list(range(len(source))))

    grouped: dict[int, list[dict]] = {}
    for example in examples:
        grouped.setdefault(int(example["bucket"]), []).append(example)
    buckets = []
    for index in sorted(grouped):
        members = grouped[index]
        buckets.append(BucketData(
            size=config.buckets[index],
            image=np.stack([_decode_png(example["image_png"]) for example in members]),
            caption=np.asarray([_as_text(example["caption"]) for example in members], dtype=object),
            original_size=np.stack([example["original_size"] for example in members]).astype(np.int32),
            crop_top_left=np.stack([example["crop_top_left"] for example in members]).astype(np.int32),
        ))
    return ImageCaptionData(tuple(buckets), num_records=num_records, num_skipped=num_records - num_examples)


def _decode_png(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
