"""TFDS builder "video_caption": captioned videos listed in a CSV, in (frames, resolution, aspect-ratio) buckets.

The source is an Open-Sora style metadata CSV with one row per video: the video's `path` (absolute, or
relative to the CSV's folder) and its caption in `text`. Other columns are ignored. Videos are decoded by
`jaxgen.video_io.read_video`: MP4, MOV, AVI, WebM and MKV files with PyAV, animated GIF, WebP or PNG files
with Pillow, and .npy arrays of uint8 [T, H, W, 3] frames.

A bucket is (T, H, W). Its frame count T is the largest configured count that the video reaches, and the
video is cut to its first T frames. Its resolution is the largest configured one whose area the video
covers (the smallest if it covers none). Within that resolution, the (H, W) size is the one of
`image_caption.make_buckets` with the closest aspect ratio, and every frame is scaled to cover it and
centre-cropped. A missing file, an unreadable (empty, damaged, truncated or non-video) file and a video
shorter than the smallest frame count are skipped with a logged warning. The builder stores the counts of
each in `info.metadata["skipped"]`.

Frames are stored as zlib-compressed uint8 arrays in array_record files, which `builder.as_data_source()`
reads without TensorFlow.

Shape vocabulary: T frames, H and W frame height and width.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

from jaxgen.data.image_caption.image_caption_dataset_builder import make_buckets, nearest_bucket, resize_and_crop
# VideoDecodeError and read_video are imported from here too, so they stay importable from this module.
from jaxgen.video_io import VideoDecodeError, read_video

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing", "unreadable", "too_short")


@dataclasses.dataclass(frozen=True)
class Record:
    """One metadata row: the video's path as written in the CSV and its caption."""

    path: str
    caption: str


def read_metadata(csv_path: str | os.PathLike[str], *, path_column: str = "path",
                  caption_column: str = "text") -> list[Record]:
    """Read the (path, caption) rows of a metadata CSV.

    Raises:
        FileNotFoundError: the CSV does not exist.
        ValueError: the CSV lacks the path or caption column, a row leaves one empty, or it has no rows.
    """
    csv_path = pathlib.Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metadata CSV {csv_path} not found")
    with csv_path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames or []
        for column in (path_column, caption_column):
            if column not in header:
                raise ValueError(
                    f"{csv_path} has no {column!r} column (found {header}). Set path_column= and "
                    "caption_column= if the paths and captions are under other names"
                )
        records = []
        for number, row in enumerate(reader, start=2):  # Line 1 is the header.
            path, caption = row[path_column], row[caption_column]
            if not path or caption is None:
                raise ValueError(f"{csv_path} line {number} has an empty {path_column!r} or {caption_column!r}")
            records.append(Record(path, caption))
    if not records:
        raise ValueError(f"{csv_path} contains no rows")
    return records


@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """The buckets: every configured frame count times every (H, W) size of every resolution."""

    resolutions: tuple[int, ...]
    frame_counts: tuple[int, ...]
    multiple: int = 16
    max_aspect_ratio: float = 2.0

    def __post_init__(self):
        for name, values in (("resolutions", self.resolutions), ("frame_counts", self.frame_counts)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has repeated values: {values!r}")
        for resolution in self.resolutions:
            make_buckets(resolution, self.multiple, self.max_aspect_ratio)  # Raises ValueError if invalid.

    @property
    def sizes(self) -> dict[int, tuple[tuple[int, int], ...]]:
        """The (H, W) sizes of each resolution."""
        return {r: make_buckets(r, self.multiple, self.max_aspect_ratio) for r in sorted(self.resolutions)}

    @property
    def buckets(self) -> tuple[tuple[int, int, int], ...]:
        """All buckets as (T, H, W), ordered by frame count, then resolution, then aspect ratio."""
        return tuple((frames, height, width) for frames in sorted(self.frame_counts)
                     for sizes in self.sizes.values() for height, width in sizes)

    def assign(self, num_frames: int, height: int, width: int) -> int | None:
        """Return the index in `buckets` of a video's bucket, or None if it is shorter than every frame count."""
        reached = [count for count in self.frame_counts if count <= num_frames]
        if not reached:
            return None
        frames = max(reached)
        covered = [r for r in self.resolutions if r * r <= height * width]
        resolution = max(covered) if covered else min(self.resolutions)
        sizes = self.sizes[resolution]
        size = sizes[nearest_bucket(height, width, sizes)]
        return self.buckets.index((frames, *size))


def csv_fingerprint(csv_path: str | os.PathLike[str]) -> str:
    """Return a short digest of the CSV's absolute path and contents, naming a prepared copy.

    NOTE: edits to video files that leave the CSV unchanged are not detected.

    Raises:
        FileNotFoundError: the CSV does not exist.
    """
    csv_path = pathlib.Path(csv_path).resolve()
    if not csv_path.is_file():
        raise FileNotFoundError(f"metadata CSV {csv_path} not found")
    digest = hashlib.sha256(str(csv_path).encode())
    digest.update(csv_path.read_bytes())
    return digest.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class VideoCaptionConfig(tfds.core.BuilderConfig):
    """Builder config: the metadata CSV, its column names and the bucket layout."""

    csv_path: str = ""
    path_column: str = "path"
    caption_column: str = "text"
    resolutions: tuple[int, ...] = (32,)
    frame_counts: tuple[int, ...] = (16,)
    multiple: int = 16
    max_aspect_ratio: float = 2.0

    @property
    def layout(self) -> BucketLayout:
        return BucketLayout(tuple(self.resolutions), tuple(self.frame_counts), self.multiple,
                            self.max_aspect_ratio)


def make_config(csv_path: str | os.PathLike[str], *, resolutions: Sequence[int], frame_counts: Sequence[int],
                multiple: int = 16, max_aspect_ratio: float = 2.0, path_column: str = "path",
                caption_column: str = "text") -> VideoCaptionConfig:
    """Return the builder config of one CSV and bucket layout, named after both.

    Raises:
        ValueError: if the bucket layout is invalid.
    """
    layout = BucketLayout(tuple(resolutions), tuple(frame_counts), multiple, max_aspect_ratio)
    settings = (f"{layout.resolutions}{layout.frame_counts}{multiple}{max_aspect_ratio}"
                f"{path_column}\0{caption_column}")
    digest = hashlib.sha256(f"{csv_fingerprint(csv_path)}{settings}".encode()).hexdigest()[:12]
    resolution_names = "x".join(str(r) for r in layout.resolutions)
    frame_names = "x".join(str(t) for t in layout.frame_counts)
    return VideoCaptionConfig(
        name=f"{pathlib.Path(csv_path).stem}_r{resolution_names}_t{frame_names}_{digest}".replace(".", "p"),
        csv_path=str(pathlib.Path(csv_path).resolve()),
        path_column=path_column,
        caption_column=caption_column,
        resolutions=layout.resolutions,
        frame_counts=layout.frame_counts,
        multiple=multiple,
        max_aspect_ratio=max_aspect_ratio,
        description=f"Videos of {csv_path} in buckets of {frame_names} frames at resolutions {resolution_names}.",
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """Builder for "video_caption": videos with captions from a metadata CSV, in bucketed shapes."""

    name = "video_caption"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: uint8 frames, caption, path, bucket, original shape and crop."}

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
            description="Captioned videos from a metadata CSV, cut and resized to (frames, height, width) buckets.",
            features=tfds.features.FeaturesDict({
                # Several unknown dimensions need a byte encoding; TFDS stores the shape beside the bytes.
                "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.ZLIB),
                "caption": tfds.features.Text(),
                "path": tfds.features.Text(),
                "bucket": tfds.features.Tensor(shape=(), dtype=np.int32),
                "original_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),  # (T, H, W) of the file
                "crop_top_left": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # The videos are local, so nothing is downloaded.
        config = self.builder_config
        if not config.csv_path:
            raise ValueError("the video_caption builder needs a config from make_config(csv_path, ...)")
        records = read_metadata(config.csv_path, path_column=config.path_column,
                                caption_column=config.caption_column)
        return {"train": self._generate_examples(records)}

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        layout = config.layout
        buckets = layout.buckets
        folder = pathlib.Path(config.csv_path).parent
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        for index, record in enumerate(records):
            path = folder / record.path  # An absolute record.path replaces the folder.
            try:
                # NOTE: every frame is decoded, to store the file's frame count in original_shape, so one
                # video takes T * H * W * 3 bytes of memory (about 1.9 GB for 10 s of 1080p at 30 fps).
                frames = read_video(path)
            except FileNotFoundError as error:
                skipped["missing"] += 1
                logger.warning("skipping missing video (CSV row %d): %s", index + 1, error)
                continue
            except VideoDecodeError as error:
                skipped["unreadable"] += 1
                logger.warning("skipping unreadable video (CSV row %d): %s", index + 1, error)
                continue
            original = frames.shape[:3]
            bucket = layout.assign(*original)
            if bucket is None:
                skipped["too_short"] += 1
                logger.warning("skipping video %s (CSV row %d): it has %d frames, fewer than the shortest "
                               "bucket's %d", path, index + 1, original[0], min(layout.frame_counts))
                continue
            num_frames, height, width = buckets[bucket]
            # NOTE: Open-Sora samples a random window of the video at each step. Keeping the first frames
            # makes the prepared data set deterministic, so later frames of longer videos are never used.
            resized = []
            for frame in frames[:num_frames]:
                pixels, crop = resize_and_crop(PIL.Image.fromarray(frame), (height, width))
                resized.append(pixels)
            yield index, {
                "frames": np.stack(resized),
                "caption": record.caption,
                "path": record.path,
                "bucket": np.int32(bucket),
                "original_shape": np.asarray(original, np.int32),
                "crop_top_left": np.asarray(crop, np.int32),
            }
        self.info.metadata["num_records"] = len(records)
        self.info.metadata["skipped"] = skipped
        if any(skipped.values()):
            logger.warning("skipped %d of %d videos in %s: %s", sum(skipped.values()), len(records),
                           config.csv_path, skipped)
