"""Tests for the digits TFDS builder, `load_digits_split` and `BatchLoader`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxgen.data import BatchLoader, load_digits_split
from jaxgen.data.digits import Builder
from jaxgen.data.digits import digits_dataset_builder as builder_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = (16, 32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Prepare both configs once per session in a temporary TFDS data directory."""
    path = tmp_path_factory.mktemp("tfds")
    for size in SIZES:
        load_digits_split(path, "test", image_size=size)
    return path


@pytest.fixture(scope="module")
def splits(data_dir) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    return {
        (size, split): load_digits_split(data_dir, split, image_size=size)
        for size in SIZES
        for split in ("train", "test")
    }


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def bilinear_reference(images: np.ndarray, size: int) -> np.ndarray:
    """Upsample [N, 8, 8] with half-pixel-centre bilinear interpolation and clamped edges, in float64."""
    in_size = images.shape[-1]
    centres = np.clip((np.arange(size) + 0.5) * in_size / size - 0.5, 0, in_size - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = centres - low
    weights = np.zeros((size, in_size))
    np.add.at(weights, (np.arange(size), low), 1 - frac)
    np.add.at(weights, (np.arange(size), high), frac)
    return np.einsum("ih,nhw,jw->nij", weights, images.astype(np.float64), weights)


# --- builder and load_digits_split -------------------------------------------------------------------


def test_builder_writes_and_reads_without_tensorflow(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        from jaxgen.data import load_digits_split
        images, labels = load_digits_split({str(tmp_path)!r}, "test", image_size=16)
        print(json.dumps({{"tensorflow": "tensorflow" in sys.modules, "shape": list(images.shape)}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensorflow"] is False
    assert report["shape"] == [300, 16, 16, 1]

    version_dir = tmp_path / "digits" / "16x16" / "1.0.0"
    for split in ("train", "test"):
        files = sorted(path.name for path in version_dir.glob(f"digits-{split}.array_record-*"))
        assert files, f"no array_record files for {split} in {version_dir}"
    assert not list(version_dir.glob("*tfrecord*"))


def test_reading_in_process_imports_no_tensorflow(splits):
    assert splits  # The fixture has prepared and read both configs in this process.
    assert "tensorflow" not in sys.modules


def test_builder_info(data_dir):
    builder = Builder(config="32x32", data_dir=os.fspath(data_dir))
    info = builder.info
    assert str(info.version) == "1.0.0"
    assert "1.0.0" in Builder.RELEASE_NOTES
    assert info.file_format.value == "array_record"
    assert info.features["label"].num_classes == 10
    assert info.features["image"].shape == (32, 32, 1)
    assert info.splits["train"].num_examples == 1497
    assert info.splits["test"].num_examples == 300
    assert [config.name for config in Builder.BUILDER_CONFIGS] == ["16x16", "32x32"]


@pytest.mark.parametrize("size", SIZES)
def test_split_sizes_and_classes(splits, source, size):
    train_images, train_labels = splits[(size, "train")]
    test_images, test_labels = splits[(size, "test")]
    assert len(train_images) + len(test_images) == 1797
    assert len(train_labels) == len(train_images) == 1497
    assert len(test_labels) == len(test_images) == 300
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), np.full(10, 30))

    all_counts = np.bincount(np.concatenate([train_labels, test_labels]), minlength=10)
    np.testing.assert_array_equal(all_counts, np.bincount(source[1], minlength=10))


@pytest.mark.parametrize("size", SIZES)
def test_images_shape_dtype_range(splits, size):
    for split in ("train", "test"):
        images, labels = splits[(size, split)]
        assert images.shape[1:] == (size, size, 1)
        assert images.dtype == np.float32
        assert labels.dtype == np.int32
        assert images.min() >= -1.0
        assert images.max() <= 1.0
        # The digit strokes reach the ends of the range: 0 maps to -1 and 16 to 1.
        np.testing.assert_allclose(images.min(), -1.0, rtol=0, atol=1e-6)
        np.testing.assert_allclose(images.max(), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_stored_images_match_resized_source(splits, source, size):
    source_images, source_labels = source
    test_indices = builder_lib.held_out_indices(source_labels)
    train_indices = np.setdiff1d(np.arange(len(source_labels)), test_indices)
    expected_images = bilinear_reference(source_images, size) / 8.0 - 1.0

    for split, indices in (("train", train_indices), ("test", test_indices)):
        images, labels = splits[(size, split)]
        np.testing.assert_array_equal(labels, source_labels[indices])
        np.testing.assert_allclose(images[..., 0], expected_images[indices], rtol=0, atol=1e-5)


def test_split_identical_on_rebuild(splits, tmp_path):
    for split in ("train", "test"):
        images, labels = load_digits_split(tmp_path, split, image_size=16)
        first_images, first_labels = splits[(16, split)]
        np.testing.assert_array_equal(labels, first_labels)
        np.testing.assert_allclose(images, first_images, rtol=0, atol=0)


def test_held_out_indices_depend_on_seed(source):
    labels = source[1]
    default = builder_lib.held_out_indices(labels)
    again = builder_lib.held_out_indices(labels)
    other = builder_lib.held_out_indices(labels, seed=builder_lib.SPLIT_SEED + 1)
    np.testing.assert_array_equal(default, again)
    assert not np.array_equal(default, other)
    np.testing.assert_array_equal(np.bincount(labels[other], minlength=10), np.full(10, 30))
    assert len(np.unique(other)) == 300


def test_held_out_indices_too_few_examples():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="Class 0 has 5 examples"):
        builder_lib.held_out_indices(labels, per_class=6)


def test_load_digits_split_invalid_split(tmp_path):
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        load_digits_split(tmp_path, "validation")
    assert not any(tmp_path.iterdir())  # The check runs before any preparation.


@pytest.mark.parametrize("image_size", [8, 64, True, "16"])
def test_load_digits_split_invalid_image_size(tmp_path, image_size):
    with pytest.raises(ValueError, match=r"image_size.*\[16, 32\]"):
        load_digits_split(tmp_path, "train", image_size=image_size)


# --- BatchLoader -------------------------------------------------------------------------------------


def make_arrays(num_examples: int) -> dict[str, np.ndarray]:
    ids = np.arange(num_examples)
    return {"id": ids, "image": np.stack([np.full((2, 2, 1), i, np.float32) for i in ids])}


def take(loader: BatchLoader, count: int) -> list[dict[str, np.ndarray]]:
    return [next(loader) for _ in range(count)]


def assert_same_batches(actual: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert got.keys() == want.keys(), f"step {step}"
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"step {step}, array {name!r}")


def test_loader_same_seed_same_order():
    first = take(BatchLoader(make_arrays(23), 4, seed=3), 12)
    second = take(BatchLoader(make_arrays(23), 4, seed=3), 12)
    assert_same_batches(first, second)


def test_loader_different_seed_different_order():
    first = np.concatenate([batch["id"] for batch in take(BatchLoader(make_arrays(50), 10, seed=0), 5)])
    second = np.concatenate([batch["id"] for batch in take(BatchLoader(make_arrays(50), 10, seed=1), 5)])
    assert not np.array_equal(first, second)


def test_loader_keeps_arrays_aligned():
    for batch in take(BatchLoader(make_arrays(23), 5, seed=0), 10):
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["id"].astype(np.float32))


def test_loader_epoch_covers_each_example_once():
    loader = BatchLoader(make_arrays(23), 5, seed=7, drop_remainder=False)
    assert loader.steps_per_epoch == 5
    orders = []
    for _ in range(3):
        batches = take(loader, loader.steps_per_epoch)
        assert [len(batch["id"]) for batch in batches] == [5, 5, 5, 5, 3]
        ids = np.concatenate([batch["id"] for batch in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(23))
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])  # Each epoch has its own permutation.


def test_loader_drop_remainder_full_batches():
    loader = BatchLoader(make_arrays(23), 5, seed=7)
    assert loader.steps_per_epoch == 4
    for epoch in range(3):
        batches = take(loader, 4)
        assert all(len(batch["id"]) == 5 for batch in batches)
        ids = np.concatenate([batch["id"] for batch in batches])
        assert len(np.unique(ids)) == 20, f"epoch {epoch} repeats an example"
        assert loader.state() == {"epoch": epoch + 1, "position": 0}


def test_loader_state_is_json_serialisable():
    loader = BatchLoader(make_arrays(23), 5, seed=0)
    take(loader, 6)
    state = loader.state()
    assert json.loads(json.dumps(state)) == state
    assert state == {"epoch": 1, "position": 10}
    assert all(type(value) is int for value in state.values())


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("steps_before", [0, 2, 4, 5, 9])
def test_loader_restore_yields_same_batches(drop_remainder, steps_before):
    # 23 examples in batches of 5: 4 or 5 steps per epoch, so the cases cover mid-epoch states and
    # states at an epoch boundary.
    original = BatchLoader(make_arrays(23), 5, seed=11, drop_remainder=drop_remainder)
    take(original, steps_before)
    state = json.loads(json.dumps(original.state()))

    restored = BatchLoader(make_arrays(23), 5, seed=11, drop_remainder=drop_remainder)
    take(restored, 3)  # Restoring must discard the restored loader's own progress.
    restored.restore(state)
    assert restored.state() == state
    assert_same_batches(take(restored, 12), take(original, 12))


def test_loader_restore_with_other_batch_size():
    original = BatchLoader(make_arrays(23), 5, seed=4)
    take(original, 2)
    resumed = BatchLoader(make_arrays(23), 3, seed=4)
    resumed.restore(original.state())
    np.testing.assert_array_equal(next(resumed)["id"], next(original)["id"][:3])


def test_loader_restore_past_last_batch():
    loader = BatchLoader(make_arrays(23), 5, seed=0)
    loader.restore({"epoch": 2, "position": 21})
    assert loader.state() == {"epoch": 3, "position": 0}
    assert len(next(loader)["id"]) == 5


@pytest.mark.parametrize(
    ("arrays", "batch_size", "seed", "match"),
    [
        ({"a": np.zeros(5), "b": np.zeros(6)}, 2, 0, r"same length.*'a': 5, 'b': 6"),
        ({}, 2, 0, "empty dict"),
        ([np.zeros(5)], 2, 0, "must be a dict of name -> array, got a list"),
        ({"a": np.zeros((0, 3))}, 1, 0, "empty"),
        ({"a": np.float32(1.0)}, 1, 0, "'a' is a scalar"),
        ({"a": np.zeros(5)}, 6, 0, "batch_size 6 is larger than the data set of 5"),
        ({"a": np.zeros(5)}, 0, 0, "batch_size must be an integer >= 1, got 0"),
        ({"a": np.zeros(5)}, 2.0, 0, "batch_size must be an integer >= 1, got 2.0"),
        ({"a": np.zeros(5)}, 2, -1, "seed must be an integer >= 0, got -1"),
    ],
)
def test_loader_rejects_bad_inputs(arrays, batch_size, seed, match):
    with pytest.raises(ValueError, match=match):
        BatchLoader(arrays, batch_size, seed=seed)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"epoch": 0}, r"missing keys \['position'\]"),
        ({"epoch": 0, "position": 0, "step": 3}, r"unknown keys \['step'\]"),
        ({"epoch": -1, "position": 0}, r"state\['epoch'\] must be an integer >= 0, got -1"),
        ({"epoch": 0, "position": 1.5}, r"state\['position'\] must be an integer >= 0, got 1.5"),
        ({"epoch": 0, "position": 24}, r"position'\] 24 is beyond the 23 examples"),
        ([0, 0], "must be a dict"),
    ],
)
def test_loader_restore_rejects_bad_state(state, match):
    loader = BatchLoader(make_arrays(23), 5, seed=0)
    with pytest.raises(ValueError, match=match):
        loader.restore(state)
