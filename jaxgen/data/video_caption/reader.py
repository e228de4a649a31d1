"""Prepare a video-caption CSV with TFDS, read it into memory grouped by bucket, and batch it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from jaxgen.data.bucket_loader import BucketBatchLoader
from jaxgen.data.video_caption import builder as builder_lib


@dataclasses.dataclass(frozen=True)
class VideoBucketData:
    """The examples of one bucket. Axis letters: N examples, T, H and W the bucket's shape."""

    shape: tuple[int, int, int]  # (T, H, W)
    frames: np.ndarray  # uint8 [N, T, H, W, 3]
    caption: np.ndarray  # str (object) [N]
    path: np.ndarray  # str (object) [N], as written in the CSV
    original_shape: np.ndarray  # int32 [N, 3], (T, H, W) of the video file
    crop_top_left: np.ndarray  # int32 [N, 2], (top, left) of the crop in the resized frames

    def __len__(self) -> int:
        return len(self.caption)


@dataclasses.dataclass(frozen=True)
class VideoCaptionData:
    """A prepared video-caption CSV: the non-empty buckets and the count of skipped videos per reason."""

    buckets: tuple[VideoBucketData, ...]
    num_records: int
    skipped: dict[str, int]  # {reason: count} for each reason in builder.SKIP_REASONS

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)


def load_video_caption(
    csv_path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str],
    resolutions: Sequence[int] = (32,),
    frame_counts: Sequence[int] = (16,),
    multiple: int = 16,
    max_aspect_ratio: float = 2.0,
    path_column: str = "path",
    caption_column: str = "text",
) -> VideoCaptionData:
    """Prepare the videos of `csv_path` as a TFDS data set in `data_dir` on first use, then read them by bucket.

    The prepared copy is named after the CSV's path and contents and the bucket settings, so a changed CSV
    is prepared again. Reading goes through `builder.as_data_source()` without TensorFlow.

    Args:
        csv_path: metadata CSV with a path and a caption column.
        data_dir: TFDS data directory to prepare into and read from.
        resolutions: bucket resolutions; each gives (H, W) sizes of about resolution**2 pixels.
        frame_counts: bucket lengths T; each video is cut to the longest it reaches.
        multiple: every bucket side is a multiple of this.
        max_aspect_ratio: the widest and tallest bucket's side ratio.
        path_column, caption_column: CSV column names.

    Raises:
        FileNotFoundError, ValueError: as `builder.read_metadata` and `builder.BucketLayout` raise for a bad
            CSV or bucket settings; ValueError if no video of the CSV could be used.
    """
    config = builder_lib.make_config(csv_path, resolutions=resolutions, frame_counts=frame_counts,
                                     multiple=multiple, max_aspect_ratio=max_aspect_ratio,
                                     path_column=path_column, caption_column=caption_column)
    builder = builder_lib.Builder(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    metadata = builder.info.metadata
    skipped = {reason: int(metadata["skipped"][reason]) for reason in builder_lib.SKIP_REASONS}
    if builder.info.splits["train"].num_examples == 0:
        raise ValueError(f"no video of {csv_path} could be used (skipped: {skipped}). See the logged warnings for each file")
    source = builder.as_data_source("train")
    examples = source.__getitems__(list(range(len(source))))

    grouped: dict[int, list[dict]] = {}
    for example in examples:
        grouped.setdefault(int(example["bucket"]), []).append(example)
    shapes = config.layout.buckets
    buckets = []
    for index in sorted(grouped):
        members = grouped[index]
        buckets.append(VideoBucketData(
            shape=shapes[index],
            frames=np.stack([example["frames"] for example in members]).astype(np.uint8, copy=False),
            caption=np.asarray([_as_text(example["caption"]) for example in members], dtype=object),
            path=np.asarray([_as_text(example["path"]) for example in members], dtype=object),
            original_shape=np.stack([example["original_shape"] for example in members]).astype(np.int32),
            crop_top_left=np.stack([example["crop_top_left"] for example in members]).astype(np.int32),
        ))
    return VideoCaptionData(tuple(buckets), num_records=int(metadata["num_records"]), skipped=skipped)


def make_batch_loader(data: VideoCaptionData, batch_size: int, *, seed: int) -> BucketBatchLoader:
    """Return an endless, resumable loader of {"frames": uint8 [B, T, H, W, 3], "caption": [B]} batches.

    Every batch comes from one bucket, so its clips share one shape. `state()` and `restore()` resume the
    exact batch sequence (see `BucketBatchLoader`).
    """
    return BucketBatchLoader([{"frames": bucket.frames, "caption": bucket.caption} for bucket in data.buckets],
                             batch_size, seed=seed)


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
