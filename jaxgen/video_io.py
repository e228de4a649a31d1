"""Read and write videos as uint8 [T, H, W, 3] RGB frames: MP4 with PyAV, GIF with Pillow and .npy with NumPy.

The file suffix selects the format:

- .mp4 (write and read), and .mov, .avi, .webm and .mkv (read only): PyAV, the FFmpeg bindings. MP4 files are
  written as H.264 in yuv420p at CRF 10 with libx264, or as MPEG-4 Part 2 at quantiser 2 when the FFmpeg
  build has no libx264. yuv420p stores colour at half the height and width, so an MP4 round trip blurs sharp
  colour edges. For 64 tinted 32x32 moving-digit clips, the mean absolute error per clip was 2.6 of 255
  levels on average and 4.2 at most, and for white digits on black it was at most 0.2 (PyAV 18.1, libx264).
  yuv420p also needs an even height and width, and `write_video` raises a ValueError for odd sides rather
  than changing the frame size.
- .gif (write and read): Pillow, as an animated GIF that loops forever. A GIF frame contains at most 256
  colours, and its duration is stored in units of 10 ms.
- .npy (write and read): the frames as they are, loaded without pickle. No frame rate is stored.
- Any other suffix is read with Pillow (animated WebP or PNG, or a single image as one frame).

Writes are atomic. The file is written under a temporary name in the target folder and then renamed over
the target with `os.replace`, so readers never see a partly written video. A write that raises deletes its
temporary file, but a process killed mid-write leaves a `.NAME.*.tmp.SUFFIX` file behind.

Shape vocabulary: T frames, H and W frame height and width.
"""

from __future__ import annotations

import contextlib
import fractions
import math
import numbers
import os
import pathlib
import uuid
from collections.abc import Iterator

import av
import numpy as np
import PIL.Image
import PIL.ImageSequence

PYAV_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv")
WRITE_FORMATS = ("mp4", "gif", "npy")

# MP4 encoders in order of preference, with options for high quality. libx264's default is CRF 23, and a
# lower CRF keeps more detail. x264's macroblock tree is off because with it, repeated writes of the same
# 64x64 clip sometimes gave other bytes, and pixels up to 3 levels apart (from 0 to 9 of 20 writes,
# varying by process, with PyAV 18.1 and x264 core 165). Without it, 1,950 writes gave identical bytes.
# For MPEG-4 Part 2, global_quality is the quantiser times FFmpeg's FF_QP2LAMBDA (118), so 236 is
# quantiser 2.
_MP4_ENCODERS = (
    ("libx264", {"crf": "10", "preset": "medium", "x264-params": "mbtree=0"}),
    ("mpeg4", {"flags": "+qscale", "global_quality": "236"}),
)
_PYAV_WRITE_FORMATS = {"mp4": "mp4"}  # write_video's format name -> FFmpeg muxer name
_MAX_GIF_FPS = 100  # GIF frame durations are whole multiples of 10 ms.
_GIF_PERIOD_KEY = "jaxgen frame period ms="  # GIF comment that write_video stores and read_video uses


class VideoDecodeError(ValueError):
    """A video file is missing, empty, damaged or not a video, so it cannot become uint8 [T, H, W, 3] frames."""


class VideoNotFoundError(VideoDecodeError, FileNotFoundError):
    """A video file does not exist. Caught by both `except VideoDecodeError` and `except FileNotFoundError`."""


def write_video(path: str | os.PathLike[str], frames: np.ndarray, *, fps: float,
                video_format: str | None = None) -> pathlib.Path:
    """Write uint8 [T, H, W, 3] RGB frames as a video file atomically, creating its folder, and return its path.

    Args:
        path: the output file. An existing file is replaced.
        frames: uint8 [T, H, W, 3] frames with T >= 1. Map model outputs in [-1, 1] with
            `jaxgen.images.to_uint8` first. MP4 needs even H and W.
        fps: frames per second, a positive number. MP4 stores it as a fraction with a denominator of at most
            1001, so 29.97 and 30000 / 1001 both work. GIF stores a frame duration of round(1000 / fps) ms cut
            to 10 ms units, so fps must be at most 100 and rates that do not divide 100 come back changed
            (30 is read back as 33.3). .npy files do not store fps.
        video_format: "mp4", "gif" or "npy", or None to take it from the suffix of `path`.

    Raises:
        ValueError: if the frames are not uint8 [T, H, W, 3], fps is not a valid rate for the format, MP4
            frames have an odd height or width, or the format is unknown.
    """
    path = pathlib.Path(path)
    if video_format is None:
        video_format = path.suffix.lower().removeprefix(".")
        if video_format not in WRITE_FORMATS:
            raise ValueError(f"invalid video suffix in {path}. Expected one of "
                             f"{[f'.{name}' for name in WRITE_FORMATS]}, or pass video_format=")
    elif video_format not in WRITE_FORMATS:
        raise ValueError(f"invalid video_format {video_format!r}. Expected one of {list(WRITE_FORMATS)}")
    frames = np.asarray(frames)
    _check_frames(frames)
    _check_fps(fps, video_format)
    if video_format == "mp4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(
            f"MP4 frames must have an even height and width for yuv420p, got {frames.shape[1]}x{frames.shape[2]}. "
            "Crop or pad the frames, for example frames[:, :H // 2 * 2, :W // 2 * 2], or write .gif or .npy"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as temporary:
        if video_format == "npy":
            with temporary.open("wb") as file:
                np.save(file, frames, allow_pickle=False)
        elif video_format == "gif":
            _write_gif(temporary, frames, fps)
        else:
            _write_pyav(temporary, frames, fps, _PYAV_WRITE_FORMATS[video_format])
    return path


def read_video(path: str | os.PathLike[str], *, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file into uint8 [T, H, W, 3] RGB frames, all of them or the first `max_frames`.

    The suffix selects the decoder as the module docstring lists. PyAV returns every decoded frame in
    display order without resampling to a constant rate. Pillow's GIF writer merges identical consecutive
    frames into one frame with a longer duration, so each GIF frame is repeated duration / period times.
    The period is the one `write_video` stores in a GIF comment, or else the greatest common divisor of
    the frame durations, which overestimates it when every frame duration covers several merged frames.

    Raises:
        VideoNotFoundError: the file does not exist. It is also a FileNotFoundError.
        VideoDecodeError: the file is empty, damaged, truncated or not a video, has no video stream or no
            frames, or a .npy file does not contain uint8 [T, H, W, 3]. The message names the file and
            the cause.
    """
    path = pathlib.Path(path)
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral)
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be None or a positive integer, got {max_frames!r}")
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, max_frames)
    if suffix in PYAV_SUFFIXES:
        return _read_pyav(path, max_frames)
    frames, _ = _read_pillow(path)
    return frames[:max_frames]


def video_fps(path: str | os.PathLike[str]) -> float | None:
    """Return the frame rate stored in a video file, or None where the file stores none (.npy, untimed GIF).

    For PyAV formats this is the stream's average rate, or FFmpeg's guess from the timestamps. For
    animated images it is 1000 ms divided by the period that `read_video` expands frames to.

    Raises:
        VideoNotFoundError, VideoDecodeError: as `read_video` raises.
    """
    path = pathlib.Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return None
    if suffix in PYAV_SUFFIXES:
        try:
            with av.open(os.fspath(path)) as container:
                stream = _video_stream(container, path)
                rate = stream.average_rate or stream.guessed_rate
        except av.FFmpegError as error:
            raise VideoDecodeError(f"failed to read {path} with PyAV {av.__version__}: {error}") from None
        return float(rate) if rate else None
    _, period_ms = _read_pillow(path)
    return 1000 / period_ms if period_ms else None


def write_gif(path: str | os.PathLike[str], frames: np.ndarray, *, fps: float) -> pathlib.Path:
    """Write uint8 [T, H, W, 3] frames as an animated GIF that loops forever, whatever the suffix of `path`.

    See `write_video` for the GIF limits. Pillow merges identical consecutive frames, and `read_video`
    expands them again.
    """
    return write_video(path, frames, fps=fps, video_format="gif")


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype} {frames.shape}. Map frames in [-1, 1] to "
                         "uint8 with jaxgen.images.to_uint8")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be non-empty RGB video frames [T, H, W, 3], got shape {frames.shape}")


def _check_fps(fps: float, video_format: str) -> None:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    if video_format == "gif" and fps > _MAX_GIF_FPS:
        raise ValueError(f"a GIF stores frame durations in 10 ms units, so fps must be at most {_MAX_GIF_FPS}, "
                         f"got {fps!r}. Write .mp4 for higher rates")


@contextlib.contextmanager
def _atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path` and rename it to `path` if the block finishes without error."""
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _mp4_encoder() -> tuple[str, dict[str, str]]:
    for name, options in _MP4_ENCODERS:
        if name in av.codecs_available:
            return name, options
    raise RuntimeError(f"this FFmpeg build (PyAV {av.__version__}) has none of the MP4 encoders "
                       f"{[name for name, _ in _MP4_ENCODERS]}. Write .gif or .npy instead")


def _write_pyav(path: pathlib.Path, frames: np.ndarray, fps: float, muxer: str) -> None:
    codec, options = _mp4_encoder()
    rate = fractions.Fraction(fps).limit_denominator(1001)
    # faststart moves the index to the front of the file, so players can start before the whole file arrives.
    with av.open(os.fspath(path), "w", format=muxer, options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index  # In units of 1 / rate, the encoder's time base.
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # Flush the frames that the encoder still buffers.


def _write_gif(path: pathlib.Path, frames: np.ndarray, fps: float) -> None:
    duration_ms = round(1000 / fps)
    # Pillow merges identical consecutive frames, so the durations alone can hide the frame period (two
    # pairs of equal frames give two 200 ms frames for 100 ms frames). The comment states the period as
    # the GIF stores it, cut to 10 ms units.
    comment = f"{_GIF_PERIOD_KEY}{duration_ms // 10 * 10}"
    images = [PIL.Image.fromarray(frame) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
                   comment=comment)


def _check_file(path: pathlib.Path) -> None:
    if not path.exists():
        raise VideoNotFoundError(f"video {path} not found")
    if not path.is_file():
        raise VideoDecodeError(f"video {path} is not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"video {path} is empty (0 bytes)")


def _read_npy(path: pathlib.Path, max_frames: int | None) -> np.ndarray:
    try:
        # A memory map reads only the frames that are kept.
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise VideoDecodeError(f"failed to load {path} as a .npy array: {error}") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise VideoDecodeError(
            f"{path} contains {frames.dtype} {frames.shape}, expected non-empty uint8 [T, H, W, 3] frames"
        )
    return np.array(frames[:max_frames])


def _video_stream(container: av.container.InputContainer, path: pathlib.Path) -> av.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(f"{path} contains no video stream")
    return container.streams.video[0]


def _read_pyav(path: pathlib.Path, max_frames: int | None) -> np.ndarray:
    frames = []
    try:
        with av.open(os.fspath(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"  # Decode with several threads, across frames and within them.
            indexed = stream.frames  # The container's frame count, or 0 where it stores none (WebM, MKV).
            packets = 0
            # demux() ends with an empty packet whose decode() flushes the frames that the decoder buffers.
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                frames.extend(frame.to_ndarray(format="rgb24") for frame in packet.decode())
                if max_frames is not None and len(frames) >= max_frames:
                    return _stack_frames(frames[:max_frames], path)
    except av.FFmpegError as error:
        raise VideoDecodeError(f"failed to decode {path} with PyAV {av.__version__}: {error}") from None
    # A file cut at a packet boundary decodes without an error, but yields fewer packets than its index lists.
    # NOTE: this check needs the index, so truncated WebM and MKV files pass it with the frames they still have.
    if packets < indexed:
        raise VideoDecodeError(f"{path} is truncated: its index lists {indexed} frames, but only {packets} "
                               "are in the file")
    return _stack_frames(frames, path)


def _stack_frames(frames: list[np.ndarray], path: pathlib.Path) -> np.ndarray:
    if not frames:
        raise VideoDecodeError(f"{path} contains no decodable frames")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise VideoDecodeError(f"{path} has frames of different sizes: {sorted(shapes)}")
    return np.stack(frames)


def _read_pillow(path: pathlib.Path) -> tuple[np.ndarray, int | None]:
    """Decode an image or animated image, and return its frames and the period in ms (None if untimed)."""
    frames, durations = [], []
    try:
        with PIL.Image.open(path) as video:
            comment = video.info.get("comment", b"")
            for frame in PIL.ImageSequence.Iterator(video):
                frames.append(np.asarray(frame.convert("RGB"), np.uint8))
                durations.append(int(frame.info.get("duration") or 0))
    # Pillow raises these for damaged files, and DecompressionBombError for a header with a huge size.
    except (OSError, ValueError, EOFError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise VideoDecodeError(f"failed to decode {path} with Pillow: {error}") from None
    stacked = _stack_frames(frames, path)
    if not all(durations):
        return stacked, None
    period = _stored_gif_period(comment)
    if period is None or any(duration % period for duration in durations):
        period = math.gcd(*durations)
    return np.repeat(stacked, [duration // period for duration in durations], axis=0), period


def _stored_gif_period(comment: bytes | str) -> int | None:
    """Return the frame period in ms that `_write_gif` stored in a GIF comment, or None if there is none."""
    text = comment.decode("latin-1") if isinstance(comment, bytes) else comment
    if not text.startswith(_GIF_PERIOD_KEY):
        return None
    value = text.removeprefix(_GIF_PERIOD_KEY)
    return int(value) if value.isdigit() and int(value) > 0 else None
