"""Tests of the moving-digit clips, the video-caption TFDS builder and its bucketed batch loader."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from jaxgen.data.digits import digits_dataset_builder as digits_lib
from jaxgen.data.image_caption.builtin import DIGIT_NAMES
from jaxgen.data.video_caption import (
    DIRECTIONS,
    BucketLayout,
    load_video_caption,
    make_batch_loader,
    make_digit_clips,
    read_metadata,
    read_video,
    write_digit_clip_folder,
    write_gif,
)
from jaxgen.data.video_caption import builder as builder_lib

# Per-frame displacement of the ink's centre of mass, (rows, columns), in units of the speed.
EXPECTED_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CAPTION_MOTION = {"left": "moves to the left", "right": "moves to the right", "up": "moves up",
                  "down": "moves down"}


def centre_of_mass(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Return the (row, column) centre of mass of each frame's difference from the background, [T, 2]."""
    weight = np.abs(frames.astype(np.float64) - background.astype(np.float64)).sum(-1)  # [T, H, W]
    rows, cols = np.indices(weight.shape[1:])
    total = weight.sum((1, 2))
    return np.stack([(weight * rows).sum((1, 2)) / total, (weight * cols).sum((1, 2)) / total], axis=-1)


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "text"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def clip_csv(tmp_path_factory):
    return write_digit_clip_folder(tmp_path_factory.mktemp("clips"), 12, split="test", tinted=True, seed=3)


# ---- built-in clips -------------------------------------------------------------------------------------


def test_clips_same_seed_same_bytes():
    first = make_digit_clips(6, tinted=True, seed=5)
    second = make_digit_clips(6, tinted=True, seed=5)
    other = make_digit_clips(6, tinted=True, seed=6)
    assert first.frames.tobytes() == second.frames.tobytes()
    assert list(first.caption) == list(second.caption)
    assert first.frames.tobytes() != other.frames.tobytes()


def test_written_folder_same_seed_same_bytes(tmp_path):
    paths = [write_digit_clip_folder(tmp_path / name, 4, seed=2) for name in ("a", "b")]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    for index in range(4):
        name = f"train/clip_{index:04d}.gif"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("speed, size, num_frames, tinted", [(1, (32, 32), 16, False), (2, (40, 48), 12, True)])
def test_clip_motion_matches_caption(speed, size, num_frames, tinted):
    clips = make_digit_clips(24, size=size, num_frames=num_frames, speed=speed, tinted=tinted, seed=1)
    assert clips.frames.shape == (24, num_frames, *size, 3)
    assert set(clips.direction.tolist()) == set(range(len(DIRECTIONS)))
    for index in range(len(clips)):
        direction = DIRECTIONS[clips.direction[index]]
        caption = clips.caption[index]
        assert caption.startswith(f"the digit {DIGIT_NAMES[clips.digit[index]]} ")
        assert CAPTION_MOTION[direction] in caption
        # The digit never leaves the canvas, so its centre of mass moves by exactly `speed` pixels per frame.
        steps = np.diff(centre_of_mass(clips.frames[index], clips.background[index]), axis=0)
        expected = np.tile(np.asarray(EXPECTED_STEP[direction], np.float64) * speed, (num_frames - 1, 1))
        np.testing.assert_allclose(steps, expected, atol=1e-9)


def test_clip_labels_match_scans():
    clips = make_digit_clips(20, seed=4)
    _, labels = digits_lib.load_source()
    np.testing.assert_array_equal(clips.digit, labels[clips.scan_index])


def test_test_split_uses_held_out_scans():
    _, labels = digits_lib.load_source()
    held_out = set(digits_lib.held_out_indices(labels).tolist())
    test_scans = set(make_digit_clips(50, split="test").scan_index.tolist())
    train_scans = set(make_digit_clips(200, split="train").scan_index.tolist())
    assert test_scans <= held_out
    assert not train_scans & held_out


def test_clip_path_too_long_rejected():
    with pytest.raises(ValueError, match="travels 30 pixels"):
        make_digit_clips(2, size=(32, 32), digit_side=16, num_frames=16, speed=2)


def test_gif_merged_frames_expanded(tmp_path):
    # Pillow writes frames 1 and 2 as one frame of double duration, and the reader must restore four frames.
    frames = np.stack([np.full((8, 8, 3), value, np.uint8) for value in (0, 60, 60, 120)])
    write_gif(tmp_path / "a.gif", frames, fps=10)
    np.testing.assert_array_equal(read_video(tmp_path / "a.gif"), frames)


# ---- the builder ----------------------------------------------------------------------------------------


def test_csv_round_trip_through_builder(clip_csv, tmp_path):
    data = load_video_caption(clip_csv, data_dir=tmp_path, resolutions=(32,), frame_counts=(16,))
    assert data.num_records == 12
    assert data.skipped == {"missing": 0, "unreadable": 0, "too_short": 0}
    assert [bucket.shape for bucket in data.buckets] == [(16, 32, 32)]
    bucket = data.buckets[0]
    assert bucket.frames.shape == (12, 16, 32, 32, 3)
    assert bucket.frames.dtype == np.uint8

    rows = {row["path"]: row for row in csv.DictReader(clip_csv.open(encoding="utf-8"))}
    assert sorted(bucket.path) == sorted(rows)
    clips = make_digit_clips(12, split="test", tinted=True, seed=3)
    for frames, caption, path in zip(bucket.frames, bucket.caption, bucket.path):
        index = int(path.removesuffix(".gif").rsplit("_", 1)[1])
        assert caption == rows[path]["text"] == clips.caption[index]
        np.testing.assert_array_equal(frames, read_video(clip_csv.parent / path))
        # GIF keeps up to 256 colours per frame. These clips differ by 0 with Pillow 13.0, and 2 allows rounding.
        assert np.abs(frames.astype(int) - clips.frames[index]).max() <= 2
        # The stored video still moves in the direction its caption states.
        direction = rows[path]["direction"]
        steps = np.diff(centre_of_mass(frames, clips.background[index]), axis=0)
        np.testing.assert_allclose(steps, np.tile(EXPECTED_STEP[direction], (15, 1)), atol=0.05)


def test_npy_clips_round_trip_exactly(tmp_path):
    csv_path = write_digit_clip_folder(tmp_path / "clips", 3, video_format="npy", seed=8)
    data = load_video_caption(csv_path, data_dir=tmp_path / "tfds")
    clips = make_digit_clips(3, seed=8)
    order = np.argsort(data.buckets[0].path)
    np.testing.assert_array_equal(data.buckets[0].frames[order], clips.frames)


def test_bad_videos_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "good.npy", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "short.npy", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "grey.npy", rng.integers(0, 256, (8, 16, 16), dtype=np.uint8))
    (tmp_path / "broken.gif").write_bytes(b"GIF89a but not really")
    csv_path = write_csv(tmp_path / "meta.csv", [(name, f"clip {name}") for name in (
        "good.npy", "short.npy", "grey.npy", "broken.gif", "absent.gif")])
    with caplog.at_level(logging.WARNING, logger=builder_lib.__name__):
        data = load_video_caption(csv_path, data_dir=tmp_path / "tfds", resolutions=(16,), frame_counts=(8,))
    assert len(data) == 1
    assert list(data.buckets[0].caption) == ["clip good.npy"]
    assert data.skipped == {"missing": 1, "unreadable": 2, "too_short": 1}
    assert data.num_skipped == 4
    for name in ("short.npy", "grey.npy", "broken.gif", "absent.gif"):
        assert name in caplog.text


def test_skip_counts_survive_reload(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((8, 16, 16, 3), np.uint8))
    csv_path = write_csv(tmp_path / "meta.csv", [("good.npy", "a"), ("absent.npy", "b")])
    first = load_video_caption(csv_path, data_dir=tmp_path / "tfds", resolutions=(16,), frame_counts=(8,))
    second = load_video_caption(csv_path, data_dir=tmp_path / "tfds", resolutions=(16,), frame_counts=(8,))
    assert first.skipped == second.skipped == {"missing": 1, "unreadable": 0, "too_short": 0}
    assert second.num_records == 2


def test_bucketing_by_frames_and_resolution(tmp_path):
    rng = np.random.default_rng(1)
    videos = {
        "full.npy": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),  # -> (16, 32, 32) unchanged
        "long.npy": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),  # -> (8, 32, 32), first 8 frames
        "tall.npy": rng.integers(0, 256, (16, 48, 24, 3), dtype=np.uint8),  # -> (16, 40, 24), rows 4..43
        "small.npy": rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8),  # -> (8, 16, 16), first 8 frames
    }
    for name, frames in videos.items():
        np.save(tmp_path / name, frames)
    csv_path = write_csv(tmp_path / "meta.csv", [(name, name) for name in videos])
    data = load_video_caption(csv_path, data_dir=tmp_path / "tfds", resolutions=(16, 32), frame_counts=(8, 16),
                              multiple=8)
    by_path = {bucket.path[0]: bucket for bucket in data.buckets}
    assert len(data.buckets) == 4
    expected = {"full.npy": ((16, 32, 32), videos["full.npy"]),
                "long.npy": ((8, 32, 32), videos["long.npy"][:8]),
                "tall.npy": ((16, 40, 24), videos["tall.npy"][:, 4:44]),
                "small.npy": ((8, 16, 16), videos["small.npy"][:8])}
    for name, (shape, frames) in expected.items():
        assert by_path[name].shape == shape
        np.testing.assert_array_equal(by_path[name].frames[0], frames)
        np.testing.assert_array_equal(by_path[name].original_shape[0], videos[name].shape[:3])
    np.testing.assert_array_equal(by_path["tall.npy"].crop_top_left[0], [4, 0])


def test_bucket_assignment_rules():
    layout = BucketLayout(resolutions=(16, 32), frame_counts=(8, 16), multiple=8)
    buckets = layout.buckets
    assert layout.assign(7, 32, 32) is None
    assert buckets[layout.assign(100, 64, 64)] == (16, 32, 32)
    assert buckets[layout.assign(9, 20, 20)] == (8, 16, 16)
    assert buckets[layout.assign(16, 8, 8)] == (16, 16, 16)  # Below every resolution: the smallest.
    assert buckets[layout.assign(16, 30, 60)] == (16, 24, 40)


def test_bucket_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="frame_counts"):
        BucketLayout(resolutions=(32,), frame_counts=())
    with pytest.raises(ValueError, match="multiple"):
        BucketLayout(resolutions=(20,), frame_counts=(8,), multiple=16)


def test_missing_csv_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv not found"):
        load_video_caption(tmp_path / "absent.csv", data_dir=tmp_path / "tfds")


def test_missing_caption_column_named(tmp_path):
    (tmp_path / "meta.csv").write_text("path,caption\na.gif,x\n")
    with pytest.raises(ValueError, match="'text'"):
        read_metadata(tmp_path / "meta.csv")


# ---- batches --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_bucket_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_buckets")
    rng = np.random.default_rng(2)
    rows = []
    for index in range(11):
        num_frames = 16 if index < 6 else 8
        np.save(folder / f"v{index}.npy", rng.integers(0, 256, (num_frames, 16, 16, 3), dtype=np.uint8))
        rows.append((f"v{index}.npy", f"video {index}"))
    csv_path = write_csv(folder / "meta.csv", rows)
    return load_video_caption(csv_path, data_dir=folder / "tfds", resolutions=(16,), frame_counts=(8, 16))


def test_batches_share_one_shape(two_bucket_data):
    loader = make_batch_loader(two_bucket_data, 2, seed=0)
    assert loader.steps_per_epoch == 3 + 2
    shapes = set()
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        assert batch["frames"].shape[0] == 2
        assert batch["caption"].shape == (2,)
        shapes.add(batch["frames"].shape)
    assert shapes == {(2, 8, 16, 16, 3), (2, 16, 16, 16, 3)}


def test_loader_resume_gives_identical_batches(two_bucket_data):
    uninterrupted = make_batch_loader(two_bucket_data, 2, seed=7)
    expected = [next(uninterrupted) for _ in range(12)]
    first = make_batch_loader(two_bucket_data, 2, seed=7)
    for _ in range(7):
        next(first)
    resumed = make_batch_loader(two_bucket_data, 2, seed=7)
    resumed.restore(json.loads(json.dumps(first.state())))
    for want in expected[7:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["frames"], want["frames"])
        assert list(got["caption"]) == list(want["caption"])
