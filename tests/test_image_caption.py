"""Tests of the image-caption TFDS builder, its built-in digit folder and the bucketed batch loader."""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest

from jaxgen.data.bucket_loader import BucketBatchLoader
from jaxgen.data.image_caption import image_caption_dataset_builder as builder_lib
from jaxgen.data.image_caption import load_image_caption, make_buckets, read_metadata, write_digit_caption_folder


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    return write_digit_caption_folder(tmp_path_factory.mktemp("captions"), num_images=24, digit_side=24)


def test_builtin_folder_loads_into_buckets(digit_folder, tmp_path):
    data = load_image_caption(digit_folder, data_dir=tmp_path, resolution=64, multiple=16)
    assert len(data) == 24
    assert data.num_skipped == 0
    assert sorted(bucket.size for bucket in data.buckets) == [(48, 80), (64, 64), (80, 48)]
    for bucket in data.buckets:
        assert bucket.image.shape == (len(bucket), *bucket.size, 3)
        assert bucket.image.dtype == np.uint8


def test_builtin_captions_match_metadata(digit_folder, tmp_path):
    data = load_image_caption(digit_folder, data_dir=tmp_path, resolution=64, multiple=16)
    expected = sorted(record.caption for record in read_metadata(digit_folder))
    assert sorted(caption for bucket in data.buckets for caption in bucket.caption) == expected
    assert expected[0].startswith("a handwritten digit ")


def test_wide_image_keeps_original_size(digit_folder, tmp_path):
    data = load_image_caption(digit_folder, data_dir=tmp_path, resolution=64, multiple=16)
    wide = next(bucket for bucket in data.buckets if bucket.size == (48, 80))
    np.testing.assert_array_equal(wide.original_size, np.tile([24, 48], (len(wide), 1)))
    # A 24x48 image scaled to cover 48x80 becomes 48x96, so 8 columns are cut on each side.
    np.testing.assert_array_equal(wide.crop_top_left, np.tile([0, 8], (len(wide), 1)))


def test_csv_metadata_with_caption_column(tmp_path):
    PIL.Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,prompt\na.png,a grey square\n")
    data = load_image_caption(tmp_path, data_dir=tmp_path / "tfds", resolution=32, multiple=16,
                              caption_column="prompt")
    assert list(data.buckets[0].caption) == ["a grey square"]
    assert data.buckets[0].size == (32, 32)


def test_missing_metadata_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl or metadata.csv"):
        read_metadata(tmp_path)


def test_missing_caption_column_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        read_metadata(tmp_path)


def test_unreadable_image_skipped_and_counted(tmp_path, caplog):
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps({"file_name": name, "text": name}) for name in ("good.png", "broken.png", "absent.png")]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=builder_lib.__name__):
        data = load_image_caption(tmp_path, data_dir=tmp_path / "tfds", resolution=16, multiple=16)
    assert len(data) == 1
    assert data.num_skipped == 2
    assert "broken.png" in caplog.text
    assert "absent.png" in caplog.text


def test_changed_metadata_prepares_again(tmp_path):
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "a.png", "text": "first"}) + "\n")
    first = load_image_caption(tmp_path, data_dir=tmp_path / "tfds", resolution=16, multiple=16)
    metadata.write_text(json.dumps({"file_name": "a.png", "text": "second"}) + "\n")
    second = load_image_caption(tmp_path, data_dir=tmp_path / "tfds", resolution=16, multiple=16)
    assert list(first.buckets[0].caption) == ["first"]
    assert list(second.buckets[0].caption) == ["second"]


def test_buckets_have_area_and_multiple():
    buckets = make_buckets(1024, 64)
    assert (1024, 1024) in buckets
    for height, width in buckets:
        assert height % 64 == 0
        assert width % 64 == 0
        assert height * width <= 1024 * 1024
        assert (width, height) in buckets


def test_buckets_reject_bad_resolution():
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(100, 64)


def test_nearest_bucket_by_aspect_ratio():
    buckets = ((48, 80), (64, 64), (80, 48))
    assert builder_lib.nearest_bucket(100, 210, buckets) == 0
    assert builder_lib.nearest_bucket(50, 52, buckets) == 1
    assert builder_lib.nearest_bucket(300, 150, buckets) == 2


# ---- bucketed batches -----------------------------------------------------------------------------------


def make_buckets_of(sizes, shapes=((4, 4), (4, 8), (8, 4))):
    buckets = []
    start = 0
    for size, shape in zip(sizes, shapes):
        ids = np.arange(start, start + size)
        buckets.append({"id": ids, "image": np.zeros((size, *shape), np.float32)})
        start += size
    return buckets


def test_bucket_batches_share_one_bucket():
    loader = BucketBatchLoader(make_buckets_of([10, 7, 5]), 3, seed=0)
    seen = []
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        assert batch["id"].shape == (3,)
        seen.extend(batch["id"].tolist())
    assert loader.steps_per_epoch == 3 + 2 + 1
    assert len(set(seen)) == len(seen)


def test_bucket_loader_resumes_same_batches():
    uninterrupted = BucketBatchLoader(make_buckets_of([10, 7, 5]), 3, seed=4)
    expected = [next(uninterrupted)["id"] for _ in range(14)]
    first = BucketBatchLoader(make_buckets_of([10, 7, 5]), 3, seed=4)
    for _ in range(8):
        next(first)
    resumed = BucketBatchLoader(make_buckets_of([10, 7, 5]), 3, seed=4)
    resumed.restore(json.loads(json.dumps(first.state())))
    for want in expected[8:]:
        np.testing.assert_array_equal(next(resumed)["id"], want)


def test_bucket_loader_epochs_differ():
    loader = BucketBatchLoader(make_buckets_of([10, 7, 5]), 3, seed=0)
    first = [next(loader)["id"].tolist() for _ in range(loader.steps_per_epoch)]
    second = [next(loader)["id"].tolist() for _ in range(loader.steps_per_epoch)]
    assert first != second


def test_small_bucket_warns(caplog):
    with caplog.at_level(logging.WARNING):
        loader = BucketBatchLoader(make_buckets_of([10, 2]), 3, seed=0)
    assert "bucket 1 has 2 examples" in caplog.text
    assert loader.steps_per_epoch == 3


def test_all_buckets_too_small_rejected():
    with pytest.raises(ValueError, match="lower the batch size"):
        BucketBatchLoader(make_buckets_of([2, 2]), 3, seed=0)


def test_bucket_loader_rejects_bad_state():
    loader = BucketBatchLoader(make_buckets_of([10, 7]), 3, seed=0)
    with pytest.raises(ValueError, match="expected exactly the keys"):
        loader.restore({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="beyond"):
        loader.restore({"epoch": 0, "batch": 99})
