"""Read a split of the digits data set into numpy arrays, preparing it on first use."""

from __future__ import annotations

import os

import numpy as np

from jaxgen.data.digits import digits_dataset_builder as builder_lib


def load_digits_split(
    data_dir: str | os.PathLike[str], split: str, image_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of the digits as (images float32 [N, S, S, 1] in [-1, 1], labels int32 [N]).

    The first call for a given `data_dir` and `image_size` prepares the data set there with
    `download_and_prepare`, which needs no network because the source ships with scikit-learn. Later
    calls reuse the files. Examples are read from the array_record files through
    `builder.as_data_source()`, so TensorFlow is not imported. They come back in source order, and
    `BatchLoader` shuffles them.

    Args:
        data_dir: TFDS data directory to prepare into and read from.
        split: "train" (1,497 images) or "test" (300 images, 30 per class).
        image_size: side S of the square images, 16 or 32.

    Raises:
        ValueError: if `split` or `image_size` is not one of the valid values.
    """
    if not isinstance(split, str) or split not in builder_lib.SPLITS:
        raise ValueError(f"Invalid split {split!r}. Expected one of {list(builder_lib.SPLITS)}.")
    if isinstance(image_size, bool) or image_size not in builder_lib.IMAGE_SIZES:
        raise ValueError(f"Invalid image_size {image_size!r}. Expected one of {list(builder_lib.IMAGE_SIZES)}.")

    config = builder_lib.config_name(int(image_size))
    builder = builder_lib.Builder(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    source = builder.as_data_source(split)

    examples = source.__getitems__(list(range(len(source))))
    images = np.stack([example["image"] for example in examples]).astype(np.float32, copy=False)
    labels = np.asarray([example["label"] for example in examples], np.int32)
    return images, labels
