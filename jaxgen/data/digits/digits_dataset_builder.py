"""TFDS builder for the 8x8 handwritten digits that scikit-learn bundles.

The source is `sklearn.datasets.load_digits`: 1,797 scans of handwritten digits, 8x8 pixels with integer
values 0..16, 10 classes. It ships inside scikit-learn, so preparing this data set needs no network. Each
config upsamples the scans to S x S (S = 16 or 32) and stores float32 images in [-1, 1] in array_record
files, which `builder.as_data_source()` reads without TensorFlow.

Shape vocabulary: N examples, S image side, 1 channel (grayscale, channels-last).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
NUM_CLASSES = 10
SOURCE_SIZE = 8
SOURCE_MAX_VALUE = 16.0
IMAGE_SIZES = (16, 32)
SPLITS = ("train", "test")

# The "test" split holds out this many images of each class.
TEST_PER_CLASS = 30
# Seed of the fixed order that picks the held-out images. A new seed gives a new split, which needs a new
# dataset version.
SPLIT_SEED = 0


def config_name(image_size: int) -> str:
    """Return the builder config name for an image side, e.g. "16x16"."""
    return f"{image_size}x{image_size}"


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """Load the scikit-learn digits as (images uint8 [N, 8, 8] in 0..16, labels int64 [N]).

    Raises:
        ValueError: if the bundled data does not have the expected shape, value range or classes.
    """
    # Imported here so that reading a prepared data set does not import scikit-learn.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target).astype(np.int64)

    expected_shape = (NUM_EXAMPLES, SOURCE_SIZE, SOURCE_SIZE)
    if images.shape != expected_shape:
        raise ValueError(f"sklearn digits images have shape {images.shape}, expected {expected_shape}.")
    if images.min() < 0 or images.max() > SOURCE_MAX_VALUE:
        raise ValueError(
            f"sklearn digits pixel values span [{images.min()}, {images.max()}], "
            f"expected [0, {SOURCE_MAX_VALUE}]."
        )
    classes = np.unique(labels)
    if not np.array_equal(classes, np.arange(NUM_CLASSES)):
        raise ValueError(f"sklearn digits labels are {classes.tolist()}, expected 0..{NUM_CLASSES - 1}.")
    return images.astype(np.uint8), labels


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize 8x8 scans in 0..16 to float32 [N, S, S, 1] in [-1, 1].

    Each scan is upsampled as a float image with PIL's bilinear filter (pixel-centre aligned, edges
    clamped), then mapped linearly from [0, 16] to [-1, 1]. Bilinear weights are non-negative and sum to
    one, so the resized values stay in [0, 16] and the final clip only removes float rounding.

    Args:
        images: [N, 8, 8] array of values in 0..16.
        image_size: output side S.
    """
    resized = np.empty((len(images), image_size, image_size, 1), np.float32)
    for i, scan in enumerate(np.asarray(images, np.float32)):
        pil_image = PIL.Image.fromarray(scan)  # A 2-D float32 array becomes a mode "F" image.
        pil_resized = pil_image.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
        resized[i, :, :, 0] = np.asarray(pil_resized, np.float32)
    scaled = resized * np.float32(2.0 / SOURCE_MAX_VALUE) - np.float32(1.0)
    return np.clip(scaled, -1.0, 1.0)


def held_out_indices(
    labels: np.ndarray, *, seed: int = SPLIT_SEED, per_class: int = TEST_PER_CLASS
) -> np.ndarray:
    """Pick the "test" split as sorted source indices, the first `per_class` of each class in a fixed order.

    The fixed order sorts source indices by the SHA-256 digest of "seed:index". NumPy does not promise
    that `np.random.Generator.permutation` gives the same stream in every release, and a hash does, so
    the split is the same on every machine and NumPy version.

    Raises:
        ValueError: if a class has fewer than `per_class` examples.
    """
    labels = np.asarray(labels)
    order = sorted(range(len(labels)), key=lambda index: hashlib.sha256(f"{seed}:{index}".encode()).digest())
    chosen: list[int] = []
    for label in range(NUM_CLASSES):
        of_class = [index for index in order if labels[index] == label]
        if len(of_class) < per_class:
            raise ValueError(
                f"Class {label} has {len(of_class)} examples, fewer than the {per_class} to hold out per class."
            )
        chosen.extend(of_class[:per_class])
    return np.sort(np.asarray(chosen, np.int64))


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """Builder config with the side S of the stored square images."""

    image_size: int = 16


class Builder(tfds.core.GeneratorBasedBuilder):
    """Builder for "digits": scikit-learn's 1,797 handwritten digits upsampled to S x S, in [-1, 1]."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: sklearn digits upsampled with PIL bilinear to 16x16 or 32x32, float32 in "
            f"[-1, 1]. The test split holds out {TEST_PER_CLASS} images per class (split seed {SPLIT_SEED})."
        ),
    }
    BUILDER_CONFIGS = [
        DigitsConfig(
            name=config_name(size),
            image_size=size,
            description=f"Digits upsampled from 8x8 to {size}x{size} with PIL bilinear.",
        )
        for size in IMAGE_SIZES
    ]

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = "array_record", **kwargs: Any):
        # array_record is the default because TFDS reads it without TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    # NOTE: TFDS 4.9.10 resolves the inherited `code_path` through `importlib_resources`, a package it
    # declares only for Python < 3.9, so on newer Pythons preparing the data set raises
    # ModuleNotFoundError. This override returns the path TFDS would compute: this module's file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 1,797 8x8 handwritten digit scans bundled with scikit-learn (a copy of the test set of "
                "the UCI optical recognition of handwritten digits data), upsampled with PIL bilinear and "
                "scaled from [0, 16] to [-1, 1]."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            # With shuffling disabled TFDS sorts examples by key, so each split is stored in source order.
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # The data ships with scikit-learn, so nothing is downloaded.
        images, labels = load_source()
        resized = resize_images(images, self.builder_config.image_size)

        test = held_out_indices(labels)
        is_test = np.zeros(len(labels), bool)
        is_test[test] = True
        return {
            "train": self._generate_examples(resized, labels, np.flatnonzero(~is_test)),
            "test": self._generate_examples(resized, labels, test),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # The key is the example's index in sklearn's order.
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}
