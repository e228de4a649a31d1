"""Captioned videos from a metadata CSV as a TFDS data set in bucketed shapes, and built-in moving-digit clips."""

from jaxgen.data.video_caption.builder import (
    SKIP_REASONS,
    BucketLayout,
    Builder,
    VideoDecodeError,
    make_config,
    read_metadata,
    read_video,
)
from jaxgen.data.video_caption.builtin import (
    DIRECTIONS,
    DigitClips,
    make_digit_clips,
    write_digit_clip_folder,
    write_gif,
)
from jaxgen.data.video_caption.reader import (
    VideoBucketData,
    VideoCaptionData,
    load_video_caption,
    make_batch_loader,
)

__all__ = [
    "DIRECTIONS",
    "SKIP_REASONS",
    "BucketLayout",
    "Builder",
    "DigitClips",
    "VideoBucketData",
    "VideoCaptionData",
    "VideoDecodeError",
    "load_video_caption",
    "make_batch_loader",
    "make_config",
    "make_digit_clips",
    "read_metadata",
    "read_video",
    "write_digit_clip_folder",
    "write_gif",
]
