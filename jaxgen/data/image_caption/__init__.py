"""A local folder of captioned images as a TFDS data set in aspect-ratio buckets, and a built-in example."""

from jaxgen.data.image_caption.builtin import write_digit_caption_folder
from jaxgen.data.image_caption.image_caption_dataset_builder import Builder, make_buckets, read_metadata
from jaxgen.data.image_caption.reader import BucketData, ImageCaptionData, load_image_caption

__all__ = [
    "BucketData",
    "Builder",
    "ImageCaptionData",
    "load_image_caption",
    "make_buckets",
    "read_metadata",
    "write_digit_caption_folder",
]
