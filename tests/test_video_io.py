"""Tests of video reading and writing: MP4 through PyAV, GIF through Pillow, .npy, damaged files and atomic writes."""

from __future__ import annotations

import csv
import logging

import av
import numpy as np
import PIL.GifImagePlugin
import PIL.Image
import pytest

from jaxgen import video_io
from jaxgen.data.video_caption import builder as builder_lib
from jaxgen.data.video_caption import builtin as builtin_lib
from jaxgen.data.video_caption import load_video_caption, make_digit_clips, write_digit_clip_folder
from jaxgen.video_io import VideoDecodeError, VideoNotFoundError, read_video, video_fps, write_video

# Mean absolute error of an MP4 round trip, in uint8 levels. yuv420p halves the colour resolution, which
# blurs the sharp edges of tinted digits. With PyAV 18.1 and libx264, the clips here measured at most 3.0,
# and 64 tinted 32x32 clips at most 4.2.
MP4_MEAN_ERROR_LEVELS = 6.0


@pytest.fixture(scope="module")
def clips():
    return make_digit_clips(6, tinted=True, size=(32, 48), num_frames=12, seed=3)


def mean_error(decoded: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(decoded.astype(np.float64) - expected.astype(np.float64)).mean())


def centre_of_mass(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Return the (row, column) centre of mass of the pixels far from the background colour, [T, 2].

    Differences of at most 60 (summed over RGB) count as background, so compression noise spread over
    the canvas does not pull the centre towards the middle.
    """
    weight = np.abs(frames.astype(np.float64) - background.astype(np.float64)).sum(-1)
    weight[weight <= 60] = 0
    rows, cols = np.indices(weight.shape[1:])
    total = weight.sum((1, 2))
    return np.stack([(weight * rows).sum((1, 2)) / total, (weight * cols).sum((1, 2)) / total], axis=-1)


def packet_ends(path) -> list[int]:
    """Return the byte offset just past each video packet of a file, in file order."""
    with av.open(str(path)) as container:
        return sorted(packet.pos + packet.size for packet in container.demux(video=0) if packet.size)


# ---- round trips ----------------------------------------------------------------------------------------


def test_mp4_round_trip_digit_clips(clips, tmp_path):
    for index, frames in enumerate(clips.frames):
        path = write_video(tmp_path / f"clip{index}.mp4", frames, fps=10)
        decoded = read_video(path)
        assert decoded.dtype == np.uint8
        assert decoded.shape == frames.shape == (12, 32, 48, 3)
        assert mean_error(decoded, frames) < MP4_MEAN_ERROR_LEVELS
        # The digit stays where it was in every frame, so it still moves as its caption states. These
        # clips measured at most 0.17 pixels apart.
        np.testing.assert_allclose(centre_of_mass(decoded, clips.background[index]),
                                   centre_of_mass(frames, clips.background[index]), atol=0.3)


def test_mp4_is_h264_yuv420p(clips, tmp_path):
    path = write_video(tmp_path / "clip.mp4", clips.frames[0], fps=10)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.format.name == "yuv420p"
        assert stream.frames == 12


@pytest.mark.parametrize("fps, expected", [(10, 10.0), (24, 24.0), (29.97, 29.97), (30000 / 1001, 30000 / 1001),
                                           (0.5, 0.5)])
def test_mp4_frame_rate_stored(clips, tmp_path, fps, expected):
    path = write_video(tmp_path / "clip.mp4", clips.frames[0], fps=fps)
    assert video_fps(path) == pytest.approx(expected, rel=1e-6)
    assert read_video(path).shape[0] == 12


def test_mp4_single_frame(clips, tmp_path):
    decoded = read_video(write_video(tmp_path / "one.mp4", clips.frames[0][:1], fps=10))
    assert decoded.shape == (1, 32, 48, 3)
    assert mean_error(decoded, clips.frames[0][:1]) < MP4_MEAN_ERROR_LEVELS


def test_gif_round_trip(clips, tmp_path):
    path = write_video(tmp_path / "clip.gif", clips.frames[1], fps=10)
    decoded = read_video(path)
    assert decoded.shape == clips.frames[1].shape
    # GIF keeps up to 256 colours per frame. These clips differ by 0 with Pillow 13.0, and 2 allows rounding.
    assert np.abs(decoded.astype(int) - clips.frames[1]).max() <= 2
    assert video_fps(path) == pytest.approx(10.0)


@pytest.mark.parametrize("values", [(0, 60, 60, 120), (0, 0, 60, 60), (7, 7, 7, 7)])
def test_gif_merged_frames_expanded(tmp_path, values):
    # Pillow writes each run of equal frames as one frame of longer duration. With runs of 2 only, the
    # durations alone (200, 200) would suggest a 200 ms period, so the reader needs the stored period.
    frames = np.stack([np.full((8, 8, 3), value, np.uint8) for value in values])
    path = builtin_lib.write_gif(tmp_path / "a.gif", frames, fps=10)
    np.testing.assert_array_equal(read_video(path), frames)
    assert video_fps(path) == pytest.approx(10.0)


def test_gif_without_period_comment_uses_gcd(tmp_path):
    # This GIF has no period comment, like one from another writer. Frames of 100, 200 and 100 ms give a
    # 100 ms period.
    images = [PIL.Image.new("RGB", (8, 8), (value, 0, 0)) for value in (0, 60, 120)]
    images[0].save(tmp_path / "other.gif", save_all=True, append_images=images[1:], duration=[100, 200, 100])
    decoded = read_video(tmp_path / "other.gif")
    np.testing.assert_array_equal(decoded[:, 0, 0, 0], [0, 60, 60, 120])
    assert video_fps(tmp_path / "other.gif") == pytest.approx(10.0)


def test_gif_rate_rounded_to_10_ms(clips, tmp_path):
    path = write_video(tmp_path / "clip.gif", clips.frames[0], fps=30)
    assert video_fps(path) == pytest.approx(1000 / 30)  # 33 ms is stored as 30 ms.


def test_npy_round_trip_exact(clips, tmp_path):
    path = write_video(tmp_path / "clip.npy", clips.frames[2], fps=10)
    np.testing.assert_array_equal(read_video(path), clips.frames[2])
    assert video_fps(path) is None


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".npy"])
def test_max_frames_keeps_first_frames(clips, tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}", clips.frames[0], fps=10)
    full = read_video(path)
    first = read_video(path, max_frames=5)
    assert first.shape == (5, 32, 48, 3)
    np.testing.assert_array_equal(first, full[:5])
    assert read_video(path, max_frames=100).shape[0] == 12
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, max_frames=0)


@pytest.mark.parametrize("suffix, muxer, codec", [(".mov", "mov", "libx264"), (".mkv", "matroska", "libx264"),
                                                  (".avi", "avi", "mpeg4"), (".webm", "webm", "libvpx-vp9")])
def test_reads_other_containers(clips, tmp_path, suffix, muxer, codec):
    frames = clips.frames[0]
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    # Default encoder settings, so a looser bound than for write_video's MP4 files.
    assert mean_error(decoded, frames) < 2 * MP4_MEAN_ERROR_LEVELS
    assert video_fps(path) == pytest.approx(10.0)


def test_mpeg4_fallback_without_libx264(clips, tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_MP4_ENCODERS", tuple(e for e in video_io._MP4_ENCODERS if e[0] != "libx264"))
    path = write_video(tmp_path / "clip.mp4", clips.frames[0], fps=10)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    decoded = read_video(path)
    assert decoded.shape == clips.frames[0].shape
    assert mean_error(decoded, clips.frames[0]) < MP4_MEAN_ERROR_LEVELS


def test_no_mp4_encoder_named(clips, tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_MP4_ENCODERS", (("no_such_encoder", {}),))
    with pytest.raises(RuntimeError, match="no_such_encoder"):
        write_video(tmp_path / "clip.mp4", clips.frames[0], fps=10)
    assert list(tmp_path.iterdir()) == []


# ---- sizes and input checks -----------------------------------------------------------------------------


def test_mp4_odd_size_rejected(tmp_path):
    frames = np.zeros((4, 33, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="even height and width for yuv420p, got 33x32"):
        write_video(tmp_path / "odd.mp4", frames, fps=10)
    assert not (tmp_path / "odd.mp4").exists()


@pytest.mark.parametrize("suffix", [".gif", ".npy"])
def test_odd_size_allowed_for_gif_and_npy(tmp_path, suffix):
    frames = np.zeros((4, 33, 31, 3), np.uint8)
    frames[:, 10:20, 5:15] = (200, 40, 90)
    decoded = read_video(write_video(tmp_path / f"odd{suffix}", frames, fps=10))
    np.testing.assert_array_equal(decoded, frames)


@pytest.mark.parametrize("frames, match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8 with jaxgen.images.to_uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"\[T, H, W, 3\], got shape \(8, 8, 3\)"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"got shape \(2, 8, 8, 4\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"got shape \(0, 8, 8, 3\)"),
])
def test_invalid_frames_rejected(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        write_video(tmp_path / "clip.npy", frames, fps=10)


@pytest.mark.parametrize("name, fps, match", [
    ("clip.mp4", 0, "positive finite"),
    ("clip.mp4", float("inf"), "positive finite"),
    ("clip.mp4", True, "positive finite"),
    ("clip.gif", 101, "at most 100"),
    ("clip.avi", 10, r"invalid video suffix in .*clip.avi. Expected one of \['.mp4', '.gif', '.npy'\]"),
])
def test_invalid_write_arguments_rejected(tmp_path, name, fps, match):
    with pytest.raises(ValueError, match=match):
        write_video(tmp_path / name, np.zeros((2, 8, 8, 3), np.uint8), fps=fps)


def test_video_format_overrides_suffix(clips, tmp_path):
    path = write_video(tmp_path / "clip.bin", clips.frames[0], fps=10, video_format="mp4")
    with av.open(str(path)) as container:
        assert container.format.name.split(",")[0] == "mov"  # FFmpeg's demuxer for MP4 and MOV.
    with pytest.raises(ValueError, match="invalid video_format 'webm'"):
        write_video(tmp_path / "clip.webm", clips.frames[0], fps=10, video_format="webm")


# ---- damaged files --------------------------------------------------------------------------------------


def test_missing_file_is_both_error_types(tmp_path):
    with pytest.raises(VideoNotFoundError, match="absent.mp4 not found") as caught:
        read_video(tmp_path / "absent.mp4")
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, VideoDecodeError)


@pytest.mark.parametrize("name, content, match", [
    ("empty.mp4", b"", "empty"),
    ("noise.mp4", np.random.default_rng(0).bytes(4000), "failed to decode"),
    ("text.mp4", b"a caption, not a video\n" * 50, "failed to decode"),
    ("noise.gif", b"GIF89a" + np.random.default_rng(1).bytes(200), "failed to decode"),
    ("noise.npy", np.random.default_rng(2).bytes(200), "failed to load"),
])
def test_non_video_files_raise(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VideoDecodeError, match=match) as caught:
        read_video(tmp_path / name)
    assert name in str(caught.value)


def test_folder_named_like_video_raises(tmp_path):
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(VideoDecodeError, match="folder.mp4 is not a regular file"):
        read_video(tmp_path / "folder.mp4")


def test_audio_only_file_raises(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoDecodeError, match="audio.mp4 contains no video stream"):
        read_video(path)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        video_fps(path)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.95])
def test_truncated_mp4_raises(clips, tmp_path, fraction):
    data = write_video(tmp_path / "full.mp4", clips.frames[0], fps=10).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        read_video(path)


def test_mp4_cut_between_packets_raises(clips, tmp_path):
    # A cut at a packet boundary decodes without an FFmpeg error, so only the frame count reveals it.
    full = write_video(tmp_path / "full.mp4", clips.frames[0], fps=10)
    ends = packet_ends(full)
    path = tmp_path / "cut.mp4"
    path.write_bytes(full.read_bytes()[:ends[5]])
    with pytest.raises(VideoDecodeError, match="cut.mp4 is truncated: its index lists 12 frames, but only 6"):
        read_video(path)
    # The frames before the cut can still be read on request.
    assert read_video(path, max_frames=2).shape == (2, 32, 48, 3)


# ---- atomic writes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".npy"])
def test_failed_write_keeps_old_file(tmp_path, monkeypatch, suffix):
    frames = make_digit_clips(1, num_frames=60, size=(80, 80), seed=1).frames[0]
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=10)
    before = path.read_bytes()
    from_ndarray = av.VideoFrame.from_ndarray
    calls = []

    def from_ndarray_until_50(*args, **kwargs):
        calls.append(1)
        if len(calls) > 50:  # By now the encoder has sent packets, so the output file is open and written.
            raise KeyboardInterrupt("interrupted mid-write")
        return from_ndarray(*args, **kwargs)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-write")

    # Fail inside each format's writer, after it has opened its output file.
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray_until_50)
    monkeypatch.setattr(PIL.GifImagePlugin, "_write_multiple_frames", fail)
    monkeypatch.setattr(video_io.np, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        write_video(path, frames[::-1], fps=10)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_write_creates_missing_folder(clips, tmp_path):
    path = write_video(tmp_path / "a" / "b" / "clip.mp4", clips.frames[0], fps=10)
    assert [entry.name for entry in path.parent.iterdir()] == ["clip.mp4"]


# ---- the built-in clips and the TFDS builder ------------------------------------------------------------


def test_old_import_paths_still_work():
    assert builder_lib.VideoDecodeError is VideoDecodeError
    assert builder_lib.read_video is read_video
    assert builtin_lib.write_gif is video_io.write_gif


def test_digit_clip_folder_mp4(tmp_path):
    csv_paths = [write_digit_clip_folder(tmp_path / name, 3, video_format="mp4", tinted=True, seed=4)
                 for name in ("a", "b")]
    clips = make_digit_clips(3, tinted=True, seed=4)
    rows = list(csv.DictReader(csv_paths[0].open(encoding="utf-8")))
    assert [row["path"] for row in rows] == [f"train/clip_{index:04d}.mp4" for index in range(3)]
    for index, row in enumerate(rows):
        first = tmp_path / "a" / row["path"]
        # libx264 runs without its macroblock tree, so the same arguments give the same bytes.
        assert first.read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
        assert mean_error(read_video(first), clips.frames[index]) < MP4_MEAN_ERROR_LEVELS
        assert video_fps(first) == pytest.approx(10.0)


def test_clip_folder_odd_mp4_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"even height and width.*size \(33, 33\)"):
        write_digit_clip_folder(tmp_path, 2, video_format="mp4", size=(33, 33), num_frames=8)
    assert not (tmp_path / "train").exists()


def test_builder_skips_corrupt_mp4_rows(tmp_path, caplog):
    csv_path = write_digit_clip_folder(tmp_path / "clips", 4, video_format="mp4", tinted=True, seed=6)
    folder = csv_path.parent
    # Replace the last clip with its first half, and list one more clip that is random bytes.
    cut = folder / "train" / "clip_0003.mp4"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (folder / "train" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    with csv_path.open("a", newline="", encoding="utf-8") as file:
        csv.writer(file).writerow(["train/noise.mp4", "random bytes", 0, "left", 16, 32, 32, 10])

    with caplog.at_level(logging.WARNING, logger=builder_lib.__name__):
        data = load_video_caption(csv_path, data_dir=tmp_path / "tfds", resolutions=(32,), frame_counts=(16,))
    assert data.num_records == 5
    assert data.skipped == {"missing": 0, "unreadable": 2, "too_short": 0}
    assert "clip_0003.mp4" in caplog.text
    assert "noise.mp4" in caplog.text

    clips = make_digit_clips(4, tinted=True, seed=6)
    bucket = data.buckets[0]
    assert bucket.frames.shape == (3, 16, 32, 32, 3)
    assert sorted(bucket.path) == [f"train/clip_{index:04d}.mp4" for index in range(3)]
    for frames, caption, path in zip(bucket.frames, bucket.caption, bucket.path):
        index = int(path.removesuffix(".mp4").rsplit("_", 1)[1])
        assert caption == clips.caption[index]
        assert mean_error(frames, clips.frames[index]) < MP4_MEAN_ERROR_LEVELS
