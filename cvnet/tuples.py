"""Per-epoch training tuples of CVNet-Rerank and the Hide-and-Seek augmentation (CVNet supp. S1,
Tab. S1, S2).

Every epoch, each class of the selected subset gives one tuple: a random query among its images that
have an overlapped positive, a random overlapped positive of that query, and a negative that is
*hard* with probability r_H (a random member of the query's pool of global-descriptor nearest
neighbours of other classes) and random otherwise (any image of another class). r_H grows linearly
from HARD_NEG_RATIO[0] at the first epoch to HARD_NEG_RATIO[1] at the last (curriculum, Tab. S1: 0.2
-> 1.0). Tuples are a pure function of (seed, epoch). Hide-and-Seek (Tab. S2): the image is cut into
a GRID x GRID grid and every cell is hidden with probability p_has, growing linearly over the epochs
like r_H; hidden cells take the dataset mean, i.e. 0 after normalisation.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def linear_schedule(start: float, end: float, epoch: int, epochs: int) -> float:
    """start at epoch 0, end at epoch epochs - 1, linear in between (start if epochs <= 1)."""
    if epochs <= 1:
        return float(start)
    return float(start + (end - start) * min(max(epoch, 0), epochs - 1) / (epochs - 1))


@dataclass(frozen=True)
class TrainTuple:
    """Image indices of one training tuple and whether its negative was drawn from the hard pool."""

    query: int
    positive: int
    negative: int
    hard: bool


# Pairs CSV of tools/select_pairs.py; files written before query_box existed still give the pairs.
PAIRS_COLUMNS = ["query_id", "positive_id", "landmark_id", "inliers", "query_box"]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


def read_pairs(
    path: str | os.PathLike, index_of: Mapping[str, int], with_boxes: bool = False
) -> tuple[dict[int, list[int]], dict[tuple[int, int], Box] | None]:
    """The pairs CSV in one pass: query index -> overlapped positives and, with ``with_boxes``,
    (query, positive) index pair -> the box of the query that the positive shows (inliers; the
    file needs the query_box column). Without ``with_boxes`` the boxes are None and optional."""
    header, rows = _rows(path, PAIRS_COLUMNS, PAIRS_COLUMNS[:4])
    if with_boxes and header != PAIRS_COLUMNS:
        raise ValueError(
            f"{path} has no query_box column (written before tools/select_pairs.py stored the "
            "inlier boxes): rerun tools/select_pairs.py with --restart, or set "
            "RERANK_TRAIN.QUERY_CROP none"
        )
    positives: dict[int, list[int]] = {}
    boxes: dict[tuple[int, int], Box] | None = {} if with_boxes else None
    for line, row in rows:
        query, positive = _index(index_of, row[0], path, line), _index(index_of, row[1], path, line)
        positives.setdefault(query, []).append(positive)
        if boxes is not None:
            box = tuple(int(v) for v in row[4].split()) if _is_box(row[4]) else None
            if box is None or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
                raise ValueError(f"{path}:{line}: query_box {row[4]!r} is not 'x0 y0 x1 y1' pixels")
            boxes[(query, positive)] = box
    return positives, boxes


def _is_box(text: str) -> bool:
    """Four integers separated by spaces."""
    fields = text.split()
    return len(fields) == 4 and all(f.lstrip("-").isdigit() for f in fields)


def read_hard_negatives(
    path: str | os.PathLike, index_of: Mapping[str, int]
) -> dict[int, list[int]]:
    """query index -> hard-negative pool (nearest first) from a CSV query_id,negative_ids."""
    pools = {}
    for line, row in _rows(path, ["query_id", "negative_ids"])[1]:
        pools[_index(index_of, row[0], path, line)] = [
            _index(index_of, i, path, line) for i in row[1].split()
        ]
    return pools


def _rows(
    path: str | os.PathLike, *headers: list[str]
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a CSV after checking that its header is one of
    ``headers`` and every row has as many fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (written by tools/select_pairs.py)")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] not in headers:
        expected = " or ".join(",".join(h) for h in headers)
        raise ValueError(f"{path}:1: header {rows[0] if rows else None!r}, expected {expected}")
    header = rows[0]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}:{line}: expected {len(header)} fields ({','.join(header)}), got {row!r}"
            )
    return header, list(enumerate(rows[1:], start=2))


def _index(index_of: Mapping[str, int], image_id: str, path: str | os.PathLike, line: int) -> int:
    """Index of an image id of the training list, with an error naming the CSV line."""
    if image_id not in index_of:
        raise ValueError(
            f"{path}:{line}: image {image_id!r} is not in the training CSV (TRAIN.CSV)"
        )
    return index_of[image_id]


class TupleSampler:
    """Deterministic per-epoch tuples (one per class) with a hard-negative curriculum."""

    def __init__(
        self,
        labels: Sequence[int],
        positives: Mapping[int, Sequence[int]],
        hard_pools: Mapping[int, Sequence[int]],
        hard_ratio: tuple[float, float] = (0.2, 1.0),
        pool_size: int = 20,
        epochs: int = 1,
        seed: int = 0,
    ) -> None:
        if not positives:
            raise ValueError("TupleSampler: no overlapped positive pairs")
        self.labels = np.asarray(labels)
        self.positives = {q: list(p) for q, p in sorted(positives.items())}
        self.hard_pools = {q: list(p)[:pool_size] for q, p in hard_pools.items()}
        self.hard_ratio, self.epochs, self.seed = tuple(hard_ratio), epochs, seed
        queries = np.array(list(self.positives))
        self.class_queries = [
            queries[self.labels[queries] == c] for c in np.unique(self.labels[queries])
        ]
        # negatives are drawn from the selected subset (the training set of the paper)
        self.subset = np.unique(
            np.concatenate([queries, *map(np.asarray, self.positives.values())])
        )

    def __len__(self) -> int:
        """Tuples per epoch: one per class."""
        return len(self.class_queries)

    def hard_negative_ratio(self, epoch: int) -> float:
        """r_H of ``epoch`` (Tab. S1)."""
        return linear_schedule(*self.hard_ratio, epoch, self.epochs)

    def _negative(self, query: int, rng: np.random.Generator, ratio: float) -> tuple[int, bool]:
        """Hard negative with probability ``ratio`` (if the query has a pool), else a random one."""
        pool = self.hard_pools.get(query, [])
        if pool and rng.random() < ratio:
            return int(pool[rng.integers(len(pool))]), True
        others = self.subset[self.labels[self.subset] != self.labels[query]]
        if len(others) == 0:
            raise ValueError(
                "TupleSampler: the subset has a single class, no negative can be drawn"
            )
        return int(others[rng.integers(len(others))]), False

    def epoch_tuples(self, epoch: int) -> list[TrainTuple]:
        """The tuples of ``epoch``, in class order (the trainer's sampler shuffles them)."""
        rng = np.random.default_rng([self.seed, epoch])
        ratio, tuples = self.hard_negative_ratio(epoch), []
        for queries in self.class_queries:
            query = int(queries[rng.integers(len(queries))])
            candidates = self.positives[query]
            positive = int(candidates[rng.integers(len(candidates))])
            tuples.append(TrainTuple(query, positive, *self._negative(query, rng, ratio)))
        return tuples


class HideAndSeek:
    """Hide each cell of a grid x grid partition with probability p (0 = the normalised mean)."""

    def __init__(
        self, grid: int = 4, prob: tuple[float, float] = (0.0, 0.2), epochs: int = 1
    ) -> None:
        if grid < 1:
            raise ValueError(f"Hide-and-Seek grid must be >= 1, got {grid}")
        self.grid, self.prob, self.epochs = grid, tuple(prob), epochs

    def probability(self, epoch: int) -> float:
        """p_has of ``epoch`` (Tab. S2)."""
        return linear_schedule(*self.prob, epoch, self.epochs)

    def __call__(self, image: torch.Tensor, epoch: int, rng: np.random.Generator) -> torch.Tensor:
        """(3, H, W) normalised image -> a copy with hidden cells set to 0."""
        hidden = rng.random((self.grid, self.grid)) < self.probability(epoch)  # (g, g)
        if not hidden.any():
            return image
        height, width = image.shape[-2:]
        rows = np.linspace(0, height, self.grid + 1).round().astype(int)
        cols = np.linspace(0, width, self.grid + 1).round().astype(int)
        out = image.clone()
        for r, c in zip(*np.nonzero(hidden)):
            out[..., rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 0.0
        return out
