"""Endless, resumable shuffled batches over in-memory numpy arrays.

Each epoch visits the examples in a fresh order, `np.random.default_rng([seed, epoch]).permutation(N)`,
so the order depends only on the seed and the epoch number. The loader's whole state is the epoch and the
position in it, a small JSON-serialisable dict that a checkpoint can store and `restore` can resume from.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_STATE_KEYS = ("epoch", "position")


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return `value` as an int, or raise ValueError if it is not an integer >= `minimum`."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got the bool {value!r}.")
    try:
        as_int = operator.index(value)
    except TypeError:
        message = f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}."
        raise ValueError(message) from None
    if as_int < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {as_int}.")
    return as_int


class BatchLoader(Iterator[dict[str, np.ndarray]]):
    """Yield dicts of numpy batches forever, epoch after epoch, each epoch in a seeded random order.

    Every array in `arrays` is indexed along its first axis with the same example indices, so a batch
    keeps images and labels aligned. With `drop_remainder=True` every batch contains `batch_size` examples
    and the last `N % batch_size` examples of each epoch's order are skipped. With `drop_remainder=False`
    the last batch of an epoch is smaller instead.

    `state()` returns where the next batch starts, and a loader built on the same arrays and seed that
    calls `restore(state)` yields exactly the batches this loader would have yielded next. The position
    counts examples, not batches, so a run may also resume with another batch size.

    NOTE: the order comes from `np.random.Generator.permutation`, whose output NumPy may change between
    releases, so an exact resume needs the same NumPy version.

    Example:
        loader = BatchLoader({"image": images, "label": labels}, 128, seed=0)
        batch = next(loader)  # {"image": [128, S, S, 1], "label": [128]}
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int,
        drop_remainder: bool = True,
    ):
        if not isinstance(arrays, Mapping):
            raise ValueError(f"arrays must be a dict of name -> array, got a {type(arrays).__name__}.")
        if not arrays:
            raise ValueError("arrays is an empty dict. Pass at least one name -> array entry.")
        self._arrays = {name: np.asarray(value) for name, value in arrays.items()}

        for name, value in self._arrays.items():
            if value.ndim == 0:
                raise ValueError(f"Array {name!r} is a scalar, but every array needs a leading example axis.")
        lengths = {name: len(value) for name, value in self._arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All arrays must have the same length along axis 0, got lengths {lengths}.")
        self._num_examples = next(iter(lengths.values()))
        if self._num_examples == 0:
            raise ValueError(f"The arrays are empty (lengths {lengths}). Pass at least one example.")

        self._batch_size = _check_int("batch_size", batch_size, minimum=1)
        if self._batch_size > self._num_examples:
            raise ValueError(
                f"batch_size {self._batch_size} is larger than the data set of {self._num_examples} examples. "
                f"Use a batch_size <= {self._num_examples}."
            )
        self._seed = _check_int("seed", seed, minimum=0)
        self._drop_remainder = bool(drop_remainder)

        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(self._epoch)

    @property
    def batch_size(self) -> int:
        """Number of examples in each full batch."""
        return self._batch_size

    @property
    def num_examples(self) -> int:
        """Number of examples N in the arrays."""
        return self._num_examples

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per epoch: floor(N / batch_size), or ceil with `drop_remainder=False`."""
        if self._drop_remainder:
            return self._num_examples // self._batch_size
        return -(-self._num_examples // self._batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._num_examples)

    def _seek(self, epoch: int, position: int) -> None:
        """Move to `position` in `epoch`, or to the start of the next epoch if no batch is left there."""
        remaining = self._num_examples - position
        if remaining <= 0 or (self._drop_remainder and remaining < self._batch_size):
            epoch, position = epoch + 1, 0
        if epoch != self._epoch:
            self._order = self._epoch_order(epoch)
        self._epoch, self._position = epoch, position

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        stop = min(self._position + self._batch_size, self._num_examples)
        indices = self._order[self._position : stop]
        batch = {name: value[indices] for name, value in self._arrays.items()}
        self._seek(self._epoch, stop)
        return batch

    def state(self) -> dict[str, int]:
        """Return the position of the next batch as {"epoch": int, "position": example offset}."""
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from a `state()` dict, so that the next batch is the one that followed it.

        Raises:
            ValueError: if a key is missing or unknown, or a value is not a non-negative integer or lies
                beyond the end of the epoch.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict with keys {list(_STATE_KEYS)}, got {state!r}.")
        missing = [key for key in _STATE_KEYS if key not in state]
        unknown = sorted(str(key) for key in state if key not in _STATE_KEYS)
        if missing or unknown:
            raise ValueError(
                f"Invalid loader state {dict(state)!r}: missing keys {missing}, unknown keys {unknown}. "
                f"Expected exactly {list(_STATE_KEYS)}."
            )
        epoch = _check_int("state['epoch']", state["epoch"], minimum=0)
        position = _check_int("state['position']", state["position"], minimum=0)
        if position > self._num_examples:
            raise ValueError(
                f"state['position'] {position} is beyond the {self._num_examples} examples of an epoch. "
                "Restore a state saved by a loader over the same arrays."
            )
        self._seek(epoch, position)
