"""Distributed, resumable training sampler with an optional class-aware order.

The global order of an epoch is a pure function of (seed, epoch): a permutation of all samples, or
with ``samples_per_class`` k > 1 a shuffled sequence of groups of k images of one class (a class
with fewer than k images repeats some of them). The order is cut into global batches of
``global_batch`` samples; rank r takes the r-th contiguous slice of every batch, so the union over
ranks of one step is exactly the batch a single process would see (DDP with W ranks == one process
with the same global batch). ``set_epoch(epoch, start)`` skips the first ``start`` batches, so a run
resumed mid-epoch continues with the same sample order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def class_groups(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled groups of k same-class indices, flattened: (num_groups * k,)."""
    order = np.argsort(labels, kind="stable")  # indices grouped by class
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = []
    for members in np.split(order, bounds):
        members = rng.permutation(members)
        pad = (-len(members)) % k  # fill the last group with other images of the class
        members = np.concatenate(
            [members, rng.choice(members, size=pad, replace=pad > len(members))]
        )
        groups.extend(members.reshape(-1, k))
    return np.concatenate([groups[i] for i in rng.permutation(len(groups))])


class TrainSampler(Sampler[int]):
    """Per-epoch deterministic order, sharded over ranks by global batch, resumable mid-epoch."""

    def __init__(
        self,
        labels: Sequence[int],
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        samples_per_class: int = 1,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the world size {world_size}"
            )
        self.local_batch = global_batch // world_size
        if samples_per_class < 1 or self.local_batch % samples_per_class:
            raise ValueError(
                f"TRAIN.SAMPLES_PER_CLASS={samples_per_class} must be >= 1 and divide the per-rank "
                f"batch "
                f"{self.local_batch} (global batch {global_batch} / {world_size} ranks)"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.global_batch, self.world_size, self.rank = global_batch, world_size, rank
        self.seed, self.samples_per_class = seed, samples_per_class
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.labels)} training samples are fewer than one global batch "
                f"{global_batch}"
            )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch``, truncated to whole global batches."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.samples_per_class == 1:
            order = rng.permutation(len(self.labels))
        else:
            order = class_groups(self.labels, self.samples_per_class, rng)
        return order[: len(order) // self.global_batch * self.global_batch]

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (the same for every epoch: class groups are padded to k)."""
        k = self.samples_per_class
        counts = np.bincount(self.labels)
        return int((-(-counts // k) * k).sum()) // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first ``start_batch`` global batches (resume)."""
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        batches = self.epoch_order(self.epoch).reshape(
            -1, self.world_size, self.local_batch
        )  # (N, W, b)
        return iter(batches[self.start :, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.local_batch
