"""Score videos of one moving digit against their labels: which digit each frame shows, and where it moves.

The scorer needs no trained network of jaxgen. It reads the clips of `make_digit_clips` and generated videos of
the same kind (one digit of side D drifting left, right, up or down at constant speed) in four steps:

1. Ink map. The background colour of a clip is the median colour of all its pixels. A pixel's ink is its RGB
   distance from that colour, divided by the clip's contrast: the 99.9th percentile of those distances, at
   least MIN_CONTRAST. The lowest NOISE_FLOOR of that range is cut off, so that a faint haze over the whole
   frame does not pull the centroid. Ink is in [0, 1] for any pair of digit and background colours.
2. Centroid. The ink-weighted mean (row, column) of each frame. A frame whose total ink is below
   MIN_INK_FRACTION * D * D has no digit, and every score counts it as wrong.
3. Digit. A D x D window of the ink map centred on the centroid goes to an RBF support vector classifier
   (scikit-learn SVC) fitted on the same crops of real "train" split clips. It is fitted deterministically
   on first use (0.5 s for D = 16 on a 2-core x86 CPU, plus under 1 s to import scikit-learn) and kept for the
   rest of the process.
4. Direction. A least-squares line through the centroids over time gives a velocity. The axis with the larger
   speed and its sign give left, right, up or down. A clip whose fitted path along that axis is shorter than
   MIN_MOTION_FRACTION * speed * (T - 1) pixels counts as static, and static clips count as wrong.

Shape vocabulary: N clips, T frames, H and W the frame height and width, D the digit side.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from jaxgen.data.video_caption.builtin import DIRECTIONS, make_digit_clips

NUM_DIGITS = 10
# RGB distance from the background, in 0..255 units, below which a clip counts as having no contrast at all.
# It is 10% of the largest RGB distance, 255 * sqrt(3). The closest pair of colours that tinted clips use
# (red and yellow) is 164 apart.
MIN_CONTRAST = 0.1 * 255 * np.sqrt(3)
# Fraction of the clip's contrast that counts as background noise and is subtracted before the ink is used.
NOISE_FLOOR = 0.25
# Minimum total ink of a frame with a digit, as a fraction of D * D. Over all 1,497 training scans at side 16,
# a digit leaves at least 38 (15% of D * D) after the noise floor, and 60 on the median.
MIN_INK_FRACTION = 0.02
# Minimum travel of a moving clip, as a fraction of the travel of a real clip, speed * (T - 1) pixels.
MIN_MOTION_FRACTION = 0.25
# Value of a frame's digit or a clip's direction that the scorer could not read (no ink, or no motion).
UNREADABLE = -1

# Real "train" split clips that fit the classifier: every training scan once in white on black and once in
# two random colours from the tinted palette, one frame each, on a canvas of 2 D x 2 D.
_TRAIN_SEEDS = {False: 0, True: 1}
_TRAIN_SCANS = 1497
# RBF support vector classifier settings. On crops of side 16 it classified 97.7% of the 300 held-out scans
# correctly, against 95.7% for logistic regression and for a one-layer MLP on the same crops.
_SVC_C = 10.0


@dataclasses.dataclass(frozen=True)
class DigitCropClassifier:
    """A digit classifier for D x D ink crops, fitted on crops of real training clips."""

    model: object  # sklearn.svm.SVC, fitted on flattened [D * D] crops
    digit_side: int
    train_crops: int
    fit_seconds: float

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Classify float32 ink crops [..., D, D] in [0, 1] as digits int32 [...]."""
        leading = crops.shape[:-2]
        flat = crops.reshape(-1, self.digit_side * self.digit_side)
        if len(flat) == 0:
            return np.zeros(leading, np.int32)
        return self.model.predict(flat).astype(np.int32).reshape(leading)


@functools.lru_cache(maxsize=None)
def fit_digit_classifier(digit_side: int = 16) -> DigitCropClassifier:
    """Fit the crop classifier for digits of side `digit_side` on real "train" split clips, once per process."""
    _check_digit_side(digit_side)
    from sklearn.svm import SVC  # imported here so that importing this module stays cheap

    started = time.perf_counter()
    crops, labels = [], []
    for tinted, seed in _TRAIN_SEEDS.items():
        clips = make_digit_clips(_TRAIN_SCANS, split="train", num_frames=1, size=(2 * digit_side, 2 * digit_side),
                                 digit_side=digit_side, tinted=tinted, seed=seed)
        ink = ink_maps(clips.frames)
        centroids, _ = ink_centroids(ink)
        crops.append(crop_digits(ink, centroids, digit_side)[:, 0])
        labels.append(clips.digit)
    features = np.concatenate(crops).reshape(-1, digit_side * digit_side)
    model = SVC(C=_SVC_C, gamma="scale")
    model.fit(features, np.concatenate(labels))
    return DigitCropClassifier(model=model, digit_side=digit_side, train_crops=len(features),
                               fit_seconds=time.perf_counter() - started)


def ink_maps(frames: np.ndarray) -> np.ndarray:
    """Compute the ink of uint8 frames [N, T, H, W, 3] as float32 [N, T, H, W] in [0, 1], 0 on the background.

    Each clip is normalised on its own, by its median colour and its contrast (step 1 of the module docstring).
    """
    pixels = frames.astype(np.float32)
    num_clips = pixels.shape[0]
    background = np.median(pixels.reshape(num_clips, -1, 3), axis=1)  # [N, 3]
    distance = np.linalg.norm(pixels - background[:, None, None, None, :], axis=-1)  # [N, T, H, W]
    contrast = np.percentile(distance.reshape(num_clips, -1), 99.9, axis=1)
    contrast = np.maximum(contrast, MIN_CONTRAST)[:, None, None, None]
    ink = (distance / contrast - NOISE_FLOOR) / (1.0 - NOISE_FLOOR)
    return np.clip(ink, 0.0, 1.0).astype(np.float32)


def ink_centroids(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the ink-weighted (row, column) centroids float64 [N, T, 2] and the ink mass [N, T] of each frame.

    A frame without ink gets the centroid of the frame's centre, so that a crop around it is still defined.
    """
    height, width = ink.shape[-2:]
    mass = ink.sum(axis=(-2, -1), dtype=np.float64)
    safe_mass = np.where(mass > 0, mass, 1.0)
    rows = (ink.sum(axis=-1, dtype=np.float64) * np.arange(height)).sum(axis=-1) / safe_mass
    columns = (ink.sum(axis=-2, dtype=np.float64) * np.arange(width)).sum(axis=-1) / safe_mass
    centroids = np.stack([rows, columns], axis=-1)
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    centroids = np.where((mass > 0)[..., None], centroids, centre)
    return centroids, mass


def crop_digits(ink: np.ndarray, centroids: np.ndarray, digit_side: int) -> np.ndarray:
    """Cut a D x D window centred on each centroid out of ink [N, T, H, W], as float32 [N, T, D, D].

    Parts of a window outside the frame read as 0 (no ink).
    """
    num_clips, num_frames = ink.shape[:2]
    padded = np.pad(ink, ((0, 0), (0, 0), (digit_side, digit_side), (digit_side, digit_side)))
    # The window's first row and column, shifted by the padding.
    corners = np.round(centroids - (digit_side - 1) / 2).astype(np.int64) + digit_side
    crops = np.empty((num_clips, num_frames, digit_side, digit_side), np.float32)
    for clip in range(num_clips):
        for frame in range(num_frames):
            top, left = corners[clip, frame]
            crops[clip, frame] = padded[clip, frame, top:top + digit_side, left:left + digit_side]
    return crops


def fit_directions(centroids: np.ndarray, has_ink: np.ndarray, *, speed: int = 1) -> np.ndarray:
    """Read the direction of each clip from its centroids [N, T, 2] as int32 [N], an index into DIRECTIONS.

    Only frames where `has_ink` [N, T] is True enter the fitted line. A clip with fewer than two such frames,
    or whose fitted travel along the dominant axis is below MIN_MOTION_FRACTION * speed * (T - 1) pixels,
    gets UNREADABLE.
    """
    num_clips, num_frames = has_ink.shape
    min_travel = MIN_MOTION_FRACTION * speed * (num_frames - 1)
    times = np.arange(num_frames, dtype=np.float64)
    directions = np.full(num_clips, UNREADABLE, np.int32)
    for clip in range(num_clips):
        inked = has_ink[clip]
        if inked.sum() < 2:
            continue
        # Least-squares slopes of row and column against time, in pixels per frame.
        slopes = np.polyfit(times[inked], centroids[clip, inked], deg=1)[0]
        axis = int(np.argmax(np.abs(slopes)))
        if abs(slopes[axis]) * (num_frames - 1) < min_travel:
            continue
        if axis == 0:
            name = "down" if slopes[0] > 0 else "up"
        else:
            name = "right" if slopes[1] > 0 else "left"
        directions[clip] = DIRECTIONS.index(name)
    return directions


@dataclasses.dataclass(frozen=True)
class VideoReadout:
    """Digits per frame and directions per clip, read from N clips of T frames."""

    frame_digits: np.ndarray  # int32 [N, T], 0..9, or UNREADABLE for a frame without ink
    clip_digits: np.ndarray  # int32 [N], majority vote over the frames with ink, or UNREADABLE if none
    directions: np.ndarray  # int32 [N], index into DIRECTIONS, or UNREADABLE for a static clip
    has_ink: np.ndarray  # bool [N, T]
    centroids: np.ndarray  # float64 [N, T, 2], (row, column) of the ink


def read_videos(frames: np.ndarray, *, digit_side: int = 16, speed: int = 1) -> VideoReadout:
    """Read the digit in every frame and the direction of every clip of uint8 frames [N, T, H, W, 3].

    Raises:
        ValueError: if frames is not uint8 [N, T, H, W, 3], or digit_side or speed is invalid.
    """
    frames = _check_frames(frames)
    _check_digit_side(digit_side)
    if isinstance(speed, bool) or not isinstance(speed, (int, np.integer)) or speed < 1:
        raise ValueError(f"speed must be an integer >= 1 (pixels per frame), got {speed!r}")

    classifier = fit_digit_classifier(int(digit_side))
    ink = ink_maps(frames)
    centroids, mass = ink_centroids(ink)
    has_ink = mass >= MIN_INK_FRACTION * digit_side * digit_side
    frame_digits = classifier.predict(crop_digits(ink, centroids, digit_side))
    frame_digits = np.where(has_ink, frame_digits, UNREADABLE).astype(np.int32)
    return VideoReadout(
        frame_digits=frame_digits,
        clip_digits=_majority_vote(frame_digits),
        directions=fit_directions(centroids, has_ink, speed=speed),
        has_ink=has_ink,
        centroids=centroids,
    )


def score_videos(frames: np.ndarray, digit: np.ndarray, direction: np.ndarray, *, digit_side: int = 16,
                 speed: int = 1) -> dict[str, float | int]:
    """Score videos [N, T, H, W, 3] uint8 against their digit labels [N] (0..9) and directions [N].

    `direction` contains indices into DIRECTIONS ("left", "right", "up", "down"). `digit_side` and `speed` are
    the digit's side in pixels and its motion in pixels per frame in the clips that the videos imitate.

    Returns:
        digit_accuracy: fraction of all N * T frames whose digit is read correctly. Frames without ink count
            as wrong.
        clip_digit_accuracy: fraction of clips whose majority vote over frames is correct. Ties go to the
            smaller digit.
        direction_accuracy: fraction of clips whose direction is read correctly. Static clips count as wrong.
        num_clips, frames_per_clip, num_frames (N * T), frames_without_ink, static_clips, and the correct
        counts correct_frames, correct_clips, correct_directions.

    Raises:
        ValueError: if an array has the wrong shape, dtype or values, or digit_side or speed is invalid.
    """
    frames = _check_frames(frames)
    num_clips, frames_per_clip = frames.shape[:2]
    digit = _check_labels("digit", digit, num_clips, NUM_DIGITS, "a digit 0..9")
    direction = _check_labels("direction", direction, num_clips, len(DIRECTIONS),
                              f"an index into DIRECTIONS {DIRECTIONS}")
    readout = read_videos(frames, digit_side=digit_side, speed=speed)

    correct_frames = int((readout.frame_digits == digit[:, None]).sum())
    correct_clips = int((readout.clip_digits == digit).sum())
    correct_directions = int((readout.directions == direction).sum())
    num_frames = num_clips * frames_per_clip
    return {
        "digit_accuracy": correct_frames / num_frames,
        "clip_digit_accuracy": correct_clips / num_clips,
        "direction_accuracy": correct_directions / num_clips,
        "num_clips": num_clips,
        "frames_per_clip": frames_per_clip,
        "num_frames": num_frames,
        "frames_without_ink": int((~readout.has_ink).sum()),
        # Clips with enough inked frames but too little motion, plus clips with fewer than two inked frames.
        "static_clips": int((readout.directions == UNREADABLE).sum()),
        "correct_frames": correct_frames,
        "correct_clips": correct_clips,
        "correct_directions": correct_directions,
    }


def _majority_vote(frame_digits: np.ndarray) -> np.ndarray:
    """Return each clip's most frequent readable digit int32 [N], UNREADABLE if it has none."""
    votes = np.zeros((frame_digits.shape[0], NUM_DIGITS), np.int64)
    for clip, row in enumerate(frame_digits):
        votes[clip] = np.bincount(row[row >= 0], minlength=NUM_DIGITS)
    winners = votes.argmax(axis=1).astype(np.int32)
    return np.where(votes.sum(axis=1) > 0, winners, UNREADABLE).astype(np.int32)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames has shape {frames.shape}; expected [N, T, H, W, 3] RGB videos with N, T, H, "
                         "W >= 1")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames has dtype {frames.dtype}; expected uint8 in 0..255. Convert float frames in "
                         "[0, 1] with np.round(frames * 255).astype(np.uint8)")
    return frames


def _check_labels(name: str, labels, num_clips: int, num_values: int, meaning: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_clips,):
        raise ValueError(f"{name} has shape {labels.shape}; expected ({num_clips},), one label per clip of frames")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} has dtype {labels.dtype}; expected integers, each {meaning}")
    invalid = labels[(labels < 0) | (labels >= num_values)]
    if invalid.size:
        raise ValueError(f"{name} contains {invalid[:5].tolist()}, outside 0..{num_values - 1}; expected {meaning}")
    return labels.astype(np.int64)


def _check_digit_side(digit_side) -> None:
    if isinstance(digit_side, bool) or not isinstance(digit_side, (int, np.integer)) or digit_side < 8:
        raise ValueError(f"digit_side must be an integer >= 8 (pixels, as in make_digit_clips), got {digit_side!r}")
