"""Endless, resumable shuffled batches drawn from aspect-ratio buckets, one bucket per batch.

Images of different sizes cannot share a batch, so each batch comes from one bucket. Each epoch shuffles
every bucket's examples with `np.random.default_rng([seed, epoch, bucket])`, cuts them into full batches
(the remainder of each bucket is dropped for that epoch), and shuffles the list of batches with
`np.random.default_rng([seed, epoch])`. The loader's state is the epoch and the index of the next batch in
that list, so a restored loader yields the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxgen.data.loader import _check_int

logger = logging.getLogger(__name__)

_STATE_KEYS = ("epoch", "batch")


class BucketBatchLoader(Iterator[dict[str, np.ndarray]]):
    """Yield dicts of numpy batches forever; every array of a batch comes from the same bucket.

    Args:
        buckets: one dict of name -> array per bucket; within a bucket, all arrays share axis 0.
        batch_size: examples per batch.
        seed: shuffling seed.

    A bucket with fewer than `batch_size` examples never yields a batch, and the loader logs a warning
    naming it. If no bucket can fill a batch, construction raises ValueError.
    """

    def __init__(self, buckets: Sequence[Mapping[str, np.ndarray]], batch_size: int, *, seed: int):
        self._batch_size = _check_int("batch_size", batch_size, minimum=1)
        self._seed = _check_int("seed", seed, minimum=0)
        self._buckets = []
        for index, arrays in enumerate(buckets):
            arrays = {name: np.asarray(value) for name, value in arrays.items()}
            lengths = {name: len(value) for name, value in arrays.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"bucket {index}: arrays have different lengths along axis 0: {lengths}")
            self._buckets.append(arrays)
        sizes = [len(next(iter(arrays.values()))) for arrays in self._buckets]
        too_small = [index for index, size in enumerate(sizes) if size < self._batch_size]
        if len(too_small) == len(sizes):
            raise ValueError(
                f"no bucket has batch_size={batch_size} examples (bucket sizes {sizes}); lower the batch size"
            )
        for index in too_small:
            logger.warning("bucket %d has %d examples, fewer than batch_size=%d, so it is never used",
                           index, sizes[index], batch_size)
        self._sizes = sizes
        self._epoch = 0
        self._batch = 0
        self._plan = self._epoch_plan(0)

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per epoch: the sum over buckets of floor(bucket size / batch_size)."""
        return sum(size // self._batch_size for size in self._sizes)

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        plan = []
        for bucket, size in enumerate(self._sizes):
            order = np.random.default_rng([self._seed, epoch, bucket]).permutation(size)
            for start in range(0, size - self._batch_size + 1, self._batch_size):
                plan.append((bucket, order[start:start + self._batch_size]))
        shuffle = np.random.default_rng([self._seed, epoch]).permutation(len(plan))
        return [plan[i] for i in shuffle]

    def __iter__(self) -> BucketBatchLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        bucket, indices = self._plan[self._batch]
        batch = {name: value[indices] for name, value in self._buckets[bucket].items()}
        self._batch += 1
        if self._batch == len(self._plan):
            self._epoch, self._batch = self._epoch + 1, 0
            self._plan = self._epoch_plan(self._epoch)
        return batch

    def state(self) -> dict[str, int]:
        """Return the position of the next batch as {"epoch": int, "batch": index in the epoch's plan}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from a `state()` dict, so that the next batch is the one that followed it.

        Raises:
            ValueError: if a key is missing or unknown, or a value is invalid for these buckets.
        """
        if not isinstance(state, Mapping) or sorted(state) != sorted(_STATE_KEYS):
            raise ValueError(f"invalid loader state {state!r}: expected exactly the keys {list(_STATE_KEYS)}")
        epoch = _check_int("state['epoch']", state["epoch"], minimum=0)
        batch = _check_int("state['batch']", state["batch"], minimum=0)
        if batch >= self.steps_per_epoch:
            raise ValueError(
                f"state['batch']={batch} is beyond the {self.steps_per_epoch} batches of an epoch; restore a "
                "state saved by a loader over the same buckets and batch size"
            )
        self._epoch, self._batch = epoch, batch
        self._plan = self._epoch_plan(epoch)
