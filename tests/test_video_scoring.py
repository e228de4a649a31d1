"""jaxgen.video_scoring and benchmarks.video_quality: real clips score high, noise, blank and static clips and
shuffled labels score low, input checks, and the CLI's JSON, Markdown and errors.

Measured on a 2-core x86 CPU with scikit-learn 1.9.1, with 300 real "test" split clips (seed 123) of 16
frames, 32x32, digit side 16 and speed 1: digit accuracy 0.977 per frame and per clip, direction accuracy
1.000, in white on black and tinted alike. The classifier fits in 0.5 s.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import video_quality
from conftest import REPO_ROOT, run_module
from jaxgen import video_scoring
from jaxgen.data.video_caption.builtin import DIRECTIONS, make_digit_clips

NUM_CLIPS = 300
NUM_FRAMES = 16


@pytest.fixture(scope="module")
def real_clips():
    """Real held-out clips in white on black: 16 frames, 32x32, digit side 16, speed 1."""
    return make_digit_clips(NUM_CLIPS, split="test", num_frames=NUM_FRAMES, seed=123)


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def write_run(folder, clips, steps=(100, 200)) -> None:
    """Write clips as RUN/samples/step_*.npz for each step: blank frames for all but the last step."""
    (folder / "samples").mkdir(parents=True)
    for step in steps:
        frames = clips.frames if step == steps[-1] else np.zeros_like(clips.frames)
        np.savez(folder / "samples" / f"step_{step:06d}.npz", frames=frames, digit=clips.digit,
                 direction=clips.direction, caption=clips.caption.astype(str))


# ----- scores of real and broken clips -------------------------------------------------------------


def test_real_clips_score_high(real_clips):
    scores = video_scoring.score_videos(real_clips.frames, real_clips.digit, real_clips.direction)
    assert set(real_clips.direction.tolist()) == set(range(len(DIRECTIONS)))
    assert scores["digit_accuracy"] > 0.85
    assert scores["clip_digit_accuracy"] > 0.85
    assert scores["direction_accuracy"] >= 0.99
    assert scores["frames_without_ink"] == 0
    assert scores["static_clips"] == 0
    assert scores["num_clips"] == NUM_CLIPS
    assert scores["num_frames"] == NUM_CLIPS * NUM_FRAMES
    assert scores["correct_frames"] == round(scores["digit_accuracy"] * NUM_CLIPS * NUM_FRAMES)


def test_tinted_clips_score_high():
    clips = make_digit_clips(100, split="test", num_frames=8, tinted=True, seed=5)
    scores = video_scoring.score_videos(clips.frames, clips.digit, clips.direction)
    assert scores["digit_accuracy"] > 0.85
    assert scores["direction_accuracy"] >= 0.99


def test_other_geometry_scores_high():
    clips = make_digit_clips(60, split="test", num_frames=6, size=(40, 48), digit_side=12, speed=2, seed=9)
    scores = video_scoring.score_videos(clips.frames, clips.digit, clips.direction, digit_side=12, speed=2)
    assert scores["digit_accuracy"] > 0.85
    assert scores["direction_accuracy"] >= 0.99


def test_noisy_real_clips_score_high(real_clips):
    # A grey haze of 20 levels plus Gaussian pixel noise (standard deviation 30 levels), as a weak generator
    # might leave. On the 300 clips this measured 0.978 digit accuracy per frame.
    rng = np.random.default_rng(2)
    noisy = real_clips.frames[:100].astype(np.float32) + 20 + rng.normal(0, 30, real_clips.frames[:100].shape)
    noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    scores = video_scoring.score_videos(noisy, real_clips.digit[:100], real_clips.direction[:100])
    assert scores["digit_accuracy"] > 0.85
    assert scores["direction_accuracy"] >= 0.99


def test_noise_scores_low(real_clips):
    noise = np.random.default_rng(0).integers(0, 256, real_clips.frames.shape, dtype=np.uint8)
    scores = video_scoring.score_videos(noise, real_clips.digit, real_clips.direction)
    assert scores["digit_accuracy"] < 0.3
    assert scores["clip_digit_accuracy"] < 0.3
    assert scores["direction_accuracy"] < 0.3


def test_blank_clips_score_zero(real_clips):
    blank = np.zeros_like(real_clips.frames[:50])
    scores = video_scoring.score_videos(blank, real_clips.digit[:50], real_clips.direction[:50])
    assert scores["digit_accuracy"] == 0.0
    assert scores["clip_digit_accuracy"] == 0.0
    assert scores["direction_accuracy"] == 0.0
    assert scores["frames_without_ink"] == 50 * NUM_FRAMES
    assert scores["static_clips"] == 50


def test_shuffled_labels_near_chance(real_clips):
    permutation = np.random.default_rng(1).permutation(NUM_CLIPS)
    scores = video_scoring.score_videos(real_clips.frames, real_clips.digit[permutation],
                                        real_clips.direction[permutation])
    # Binomial standard errors over 300 clips: 0.017 for p = 0.1 and 0.025 for p = 0.25.
    assert abs(scores["clip_digit_accuracy"] - 0.1) < 0.06
    assert abs(scores["digit_accuracy"] - 0.1) < 0.06
    assert abs(scores["direction_accuracy"] - 0.25) < 0.1


def test_static_clip_direction_wrong(real_clips):
    static = np.repeat(real_clips.frames[:40, :1], NUM_FRAMES, axis=1)
    scores = video_scoring.score_videos(static, real_clips.digit[:40], real_clips.direction[:40])
    assert scores["direction_accuracy"] == 0.0
    assert scores["static_clips"] == 40
    assert scores["digit_accuracy"] > 0.85


def test_motion_threshold(real_clips):
    # Frame t of the slow clips repeats real frame t // 5, so the digit travels 15 // 5 = 3 pixels in total.
    # The moving clips use t // 3 and travel 5 pixels. The threshold is 0.25 * speed * (T - 1) = 3.75 pixels.
    slow = real_clips.frames[:20, np.arange(NUM_FRAMES) // 5]  # 3 pixels
    moving = real_clips.frames[:20, np.arange(NUM_FRAMES) // 3]  # 5 pixels
    labels = real_clips.digit[:20], real_clips.direction[:20]
    assert video_scoring.score_videos(slow, *labels)["static_clips"] == 20
    assert video_scoring.score_videos(moving, *labels)["direction_accuracy"] == 1.0


def test_frames_without_ink_count_wrong(real_clips):
    frames = real_clips.frames[:30].copy()
    frames[:, NUM_FRAMES // 2:] = 0
    scores = video_scoring.score_videos(frames, real_clips.digit[:30], real_clips.direction[:30])
    assert scores["frames_without_ink"] == 30 * NUM_FRAMES // 2
    assert scores["digit_accuracy"] <= 0.5
    assert scores["digit_accuracy"] > 0.85 / 2
    # The majority vote and the direction use the frames that still show the digit.
    assert scores["clip_digit_accuracy"] > 0.85
    assert scores["direction_accuracy"] == 1.0


def test_read_videos_marks_unreadable(real_clips):
    frames = real_clips.frames[:2].copy()
    frames[1] = 0
    readout = video_scoring.read_videos(frames)
    assert readout.frame_digits.shape == (2, NUM_FRAMES)
    assert (readout.frame_digits[1] == video_scoring.UNREADABLE).all()
    assert readout.clip_digits[1] == video_scoring.UNREADABLE
    assert readout.directions[1] == video_scoring.UNREADABLE
    assert readout.directions[0] == real_clips.direction[0]
    assert readout.has_ink[0].all()


def test_classifier_cached_and_deterministic(real_clips):
    classifier = video_scoring.fit_digit_classifier(16)
    assert video_scoring.fit_digit_classifier(16) is classifier
    refitted = video_scoring.fit_digit_classifier.__wrapped__(16)
    ink = video_scoring.ink_maps(real_clips.frames[:50, :2])
    crops = video_scoring.crop_digits(ink, video_scoring.ink_centroids(ink)[0], 16)
    np.testing.assert_array_equal(classifier.predict(crops), refitted.predict(crops))
    assert classifier.train_crops == 2 * 1497


# ----- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, message", [
    (np.zeros((2, 4, 32, 32), np.uint8), r"shape \(2, 4, 32, 32\); expected \[N, T, H, W, 3\]"),
    (np.zeros((2, 4, 32, 32, 1), np.uint8), r"shape \(2, 4, 32, 32, 1\); expected \[N, T, H, W, 3\]"),
    (np.zeros((2, 0, 32, 32, 3), np.uint8), r"shape \(2, 0, 32, 32, 3\)"),
    (np.zeros((2, 4, 32, 32, 3), np.float32), r"dtype float32; expected uint8"),
])
def test_invalid_frames_rejected(frames, message):
    with pytest.raises(ValueError, match=message):
        video_scoring.score_videos(frames, np.zeros(2, np.int32), np.zeros(2, np.int32))


@pytest.mark.parametrize("digit, direction, message", [
    (np.zeros(3, np.int32), np.zeros(2, np.int32), r"digit has shape \(3,\); expected \(2,\)"),
    (np.zeros(2, np.int32), np.zeros((2, 1), np.int32), r"direction has shape \(2, 1\); expected \(2,\)"),
    (np.zeros(2, np.float32), np.zeros(2, np.int32), r"digit has dtype float32; expected integers"),
    (np.array([0, 10]), np.zeros(2, np.int32), r"digit contains \[10\], outside 0..9"),
    (np.zeros(2, np.int32), np.array([-1, 4]), r"direction contains \[-1, 4\], outside 0..3"),
])
def test_invalid_labels_rejected(digit, direction, message):
    frames = np.zeros((2, 4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        video_scoring.score_videos(frames, digit, direction)


@pytest.mark.parametrize("options, message", [
    ({"digit_side": 4}, "digit_side must be an integer >= 8"),
    ({"speed": 0}, "speed must be an integer >= 1"),
])
def test_invalid_options_rejected(options, message):
    frames = np.zeros((2, 4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        video_scoring.score_videos(frames, np.zeros(2, np.int32), np.zeros(2, np.int32), **options)


# ----- benchmarks.video_quality ------------------------------------------------------------------


def test_cli_writes_json_and_markdown(tmp_path):
    clips = make_digit_clips(32, split="test", num_frames=12, seed=11)
    run = tmp_path / "run"
    write_run(run, clips)
    out = tmp_path / "results" / "video_quality.json"
    run_module("benchmarks.video_quality", ["--run", str(run), "--out", str(out)], cli_env(), timeout=120)

    result = json.loads(out.read_text())
    assert {"command", "environment", "run", "samples", "step", "num_clips", "frames_per_clip", "height", "width",
            "digit_side", "speed", "seed", "classifier", "scoring_seconds", "rows"} <= set(result)
    assert result["step"] == 200
    assert result["samples"].endswith("step_000200.npz")
    assert (result["num_clips"], result["frames_per_clip"], result["height"], result["width"]) == (32, 12, 32, 32)
    assert [row["row"] for row in result["rows"]] == list(video_quality.ROW_NAMES)
    rows = {row["row"]: row for row in result["rows"]}
    # The newest samples are real clips, so they score like the ceiling. The blank step 100 would score 0.
    assert rows["samples"]["digit_accuracy"] > 0.85
    assert rows["real clips (ceiling)"]["digit_accuracy"] > 0.85
    assert rows["real clips (ceiling)"]["direction_accuracy"] >= 0.99
    assert rows["real clips (ceiling)"]["num_clips"] == 32
    assert rows["shuffled labels"]["num_clips"] == 32
    assert rows["chance"]["digit_accuracy"] == 0.1
    assert rows["chance"]["direction_accuracy"] == 0.25
    assert result["classifier"]["fit_seconds"] > 0

    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("Command: `python -m benchmarks.video_quality --run")
    assert "| real clips (ceiling) |" in markdown
    assert "| chance | 0.100 | 0.100 | 0.250 | - |" in markdown


def test_cli_run_without_samples(tmp_path):
    (tmp_path / "run" / "samples").mkdir(parents=True)
    result = run_module("benchmarks.video_quality", ["--run", str(tmp_path / "run"), "--out",
                                                     str(tmp_path / "out.json")], cli_env(), check=False, timeout=120)
    assert result.returncode == 2
    assert "no samples/step_*.npz in run folder" in result.stderr
    assert "python -m jaxgen.train --cfg opensora.py" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_missing_run_folder(tmp_path, capsys):
    assert video_quality.main(["--run", str(tmp_path / "absent"), "--out", str(tmp_path / "out.json")]) == 2
    assert f"run folder {tmp_path / 'absent'} not found" in capsys.readouterr().err


def test_samples_missing_array(tmp_path, capsys):
    path = tmp_path / "step_000001.npz"
    np.savez(path, frames=np.zeros((2, 4, 32, 32, 3), np.uint8), digit=np.zeros(2, np.int32))
    assert video_quality.main(["--samples", str(path), "--out", str(tmp_path / "out.json")]) == 2
    assert "lacks the array(s) direction" in capsys.readouterr().err


def test_samples_too_small_for_real_clips(tmp_path, capsys):
    path = tmp_path / "step_000001.npz"
    np.savez(path, frames=np.zeros((2, 16, 20, 20, 3), np.uint8), digit=np.zeros(2, np.int32),
             direction=np.zeros(2, np.int32))
    assert video_quality.main(["--samples", str(path), "--out", str(tmp_path / "out.json")]) == 2
    assert "cannot make real clips shaped like the samples" in capsys.readouterr().err


def test_unlabelled_samples_left_out(tmp_path):
    clips = make_digit_clips(12, split="test", num_frames=8, seed=13)
    digit, direction = clips.digit.copy(), clips.direction.copy()
    digit[:4] = -1
    direction[:4] = -1
    path = tmp_path / "step_000050.npz"
    np.savez(path, frames=clips.frames, digit=digit, direction=direction)
    out = tmp_path / "out.json"
    assert video_quality.main(["--samples", str(path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["unlabelled_clips_left_out"] == 4
    assert result["num_clips"] == 8
    assert result["rows"][0]["num_clips"] == 8
    assert "(4 more without labels left out)" in out.with_suffix(".md").read_text()


def test_all_unlabelled_samples_rejected(tmp_path, capsys):
    path = tmp_path / "step_000050.npz"
    np.savez(path, frames=np.zeros((3, 8, 32, 32, 3), np.uint8), digit=np.full(3, -1, np.int32),
             direction=np.full(3, -1, np.int32))
    assert video_quality.main(["--samples", str(path), "--out", str(tmp_path / "out.json")]) == 2
    assert "none of the 3 clips" in capsys.readouterr().err


def test_mismatched_label_shapes_rejected(tmp_path, capsys):
    path = tmp_path / "step_000050.npz"
    np.savez(path, frames=np.zeros((3, 8, 32, 32, 3), np.uint8), digit=np.zeros(2, np.int32),
             direction=np.zeros(3, np.int32))
    assert video_quality.main(["--samples", str(path), "--out", str(tmp_path / "out.json")]) == 2
    assert "digit has shape (2,); expected (3,)" in capsys.readouterr().err
