"""Overlapped-positive selection for CVNet-Rerank training (CVNet supp. S1) and the hard-negative
pools.

For every training image, up to NUM_NEIGHBORS nearest neighbours of the same class by global
descriptor are candidates; every candidate pair (unordered, verified once: overlap is symmetric) is
geometrically verified (retrieval/evaluation/geometric.py) and kept with >= MIN_INLIERS inliers;
only classes with more than MIN_CLASS_IMAGES images in kept pairs stay. Output CSV
``query_id,positive_id,landmark_id,inliers,query_box`` with both directions of every kept pair;
query_box is ``x0 y0 x1 y1``, the bounding box of the inliers in the query's pixels: the part of the
query seen in the positive, to which RERANK_TRAIN.QUERY_CROP inliers crops the training query the
way the test protocol crops a query to its landmark. Hard-negative pools (Tab. S1): per image of the
kept subset, its HARD_NEG_POOL nearest neighbours of other kept classes, CSV
``query_id,negative_ids`` (space-separated, nearest first).

Work is cut into chunks of whole classes. Per chunk the main process extracts local features and
matches them (on the device); RANSAC runs in worker processes. Every finished chunk stores the raw
inlier count and the inliers' boxes in both images of all its candidates in
``<csv>.progress/chunk_<n>.csv`` (atomic rename), so a rerun skips it; ``meta.json`` there holds
what the counts depend on and a rerun with other settings is refused. Thresholds are applied at the
merge, so MIN_INLIERS and MIN_CLASS_IMAGES can change without re-verifying.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from retrieval.evaluation.geometric import (
    Estimator,
    LocalFeatureExtractor,
    LocalFeatures,
    match_features,
)

logger = logging.getLogger(__name__)
PAIRS_HEADER = ["query_id", "positive_id", "landmark_id", "inliers", "query_box"]
# Progress rows: a pair, its inlier count and the inliers' boxes x0 y0 x1 y1 in image i and image j.
CHUNK_HEADER = [
    "i",
    "j",
    "inliers",
    *(f"{im}_{c}" for im in "ij" for c in ("x0", "y0", "x1", "y1")),
]
# Bumped when CHUNK_HEADER changes, so progress of an older layout is refused, not misread.
CHUNK_FORMAT = 2
NEGATIVES_HEADER = ["query_id", "negative_ids"]


@dataclass(frozen=True)
class SelectionSettings:
    """Thresholds and work split of the selection (RERANK_TRAIN.*)."""

    num_neighbors: int = 10
    min_inliers: int = 30
    min_class_images: int = 10
    hard_neg_pool: int = 20
    chunk_classes: int = 100
    workers: int = 0


def same_class_candidates(descriptors: np.ndarray, labels: Sequence[int], k: int) -> np.ndarray:
    """(P, 2) pairs i < j where j is a k-nearest same-class neighbour of i or i of j."""
    labels = np.asarray(labels)
    pairs = set()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        sims = descriptors[members] @ descriptors[members].T  # (n_c, n_c)
        np.fill_diagonal(sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, len(members) - 1)]
        pairs.update((min(a, b), max(a, b)) for a, row in zip(members, order) for b in members[row])
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def class_chunks(pairs: np.ndarray, labels: Sequence[int], chunk_classes: int) -> list[np.ndarray]:
    """Chunks of pairs, each covering ``chunk_classes`` consecutive classes (empty ones dropped)."""
    chunk_of = np.asarray(labels)[pairs[:, 0]] // chunk_classes
    return [pairs[chunk_of == c] for c in np.unique(chunk_of)]


def inlier_box(points: np.ndarray, mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] integer pixel box around the masked (M, 2) points; zeros when none."""
    if not mask.any():
        return [0, 0, 0, 0]
    inliers = points[mask]
    (x0, y0), (x1, y1) = np.floor(inliers.min(0)), np.ceil(inliers.max(0))
    return [int(x0), int(y0), int(x1), int(y1)]


def ransac_verify(
    estimator: Estimator, matches: list[tuple[np.ndarray, np.ndarray]]
) -> list[list[int]]:
    """Per (src, dst) match list: [inliers, *box in src, *box in dst] (runs in a worker process)."""
    rows = []
    for src, dst in matches:
        mask = estimator(src, dst)
        rows.append([int(mask.sum()), *inlier_box(src, mask), *inlier_box(dst, mask)])
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Atomic CSV write."""
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    _atomic_write_text(path, "\n".join(lines) + "\n")


class ChunkStore:
    """The progress folder: finished chunks with raw inlier counts and boxes, guarded by a key."""

    def __init__(self, folder: Path, key: dict, restart: bool = False) -> None:
        self.folder = folder
        meta = folder / "meta.json"
        key = json.loads(json.dumps({**key, "chunk_format": CHUNK_FORMAT}))
        if meta.is_file() and json.loads(meta.read_text()) != key:
            if not restart:
                raise ValueError(
                    f"{folder} holds progress of a selection with other inputs or settings "
                    f"({meta}); run with --restart (or delete the folder) to start over"
                )
            logger.warning("%s: progress of other inputs or settings discarded (--restart)", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(meta, json.dumps(key, indent=1))

    def path(self, chunk: int) -> Path:
        """File of one chunk."""
        return self.folder / f"chunk_{chunk:06d}.csv"

    def done(self, chunk: int) -> bool:
        """True when the chunk was finished by an earlier run."""
        return self.path(chunk).is_file()

    def save(self, chunk: int, pairs: np.ndarray, results: Sequence[Sequence[int]]) -> None:
        """Store the rows (i, j, inliers, boxes) of a chunk; ``results`` from ransac_verify."""
        _write_csv(
            self.path(chunk),
            CHUNK_HEADER,
            [[a, b, *r] for (a, b), r in zip(pairs.tolist(), results)],
        )

    def load_all(self, num_chunks: int) -> np.ndarray:
        """(P, 11) rows (i, j, inliers, box in i, box in j) of every chunk."""
        rows = []
        for chunk in range(num_chunks):
            with self.path(chunk).open() as handle:
                rows += [[int(v) for v in row] for row in list(csv.reader(handle))[1:]]
        return np.array(rows, dtype=np.int64).reshape(-1, len(CHUNK_HEADER))


class PairVerifier:
    """Local features + matching in this process, RANSAC in ``workers`` processes (0 = inline)."""

    def __init__(
        self,
        extractor: LocalFeatureExtractor,
        load_image: Callable[[int], np.ndarray],
        estimator: Estimator,
        workers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.extractor, self.load_image, self.estimator = extractor, load_image, estimator
        self.workers, self.device = workers, device

    def matches(self, pairs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Mutual-NN matches (src, dst) of every pair; each image's features are extracted once."""
        feats: dict[int, LocalFeatures] = {}
        for index in np.unique(pairs):
            feats[int(index)] = self.extractor(self.load_image(int(index)))
        return [match_features(feats[a], feats[b], self.device) for a, b in pairs.tolist()]

    def run(self, chunks: list[np.ndarray], store: ChunkStore) -> None:
        """Verify every chunk not yet in ``store``; chunks are saved as their RANSAC finishes."""
        todo = [c for c in range(len(chunks)) if not store.done(c)]
        if len(todo) < len(chunks):
            logger.info(
                "pair selection: resuming, %d of %d chunks already done",
                len(chunks) - len(todo),
                len(chunks),
            )
        # spawn: the workers only run numpy/pydegensac and must not inherit a CUDA context by fork
        context = multiprocessing.get_context("spawn")
        executor = (
            ProcessPoolExecutor(self.workers, mp_context=context) if self.workers > 0 else None
        )
        try:
            self._run(chunks, todo, store, executor)
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)

    def _run(
        self,
        chunks: list[np.ndarray],
        todo: list[int],
        store: ChunkStore,
        executor: Executor | None,
    ) -> None:
        """Extract/match chunk after chunk while at most 2 x workers RANSAC jobs are in flight."""
        pending: dict[int, Future] = {}
        for chunk in tqdm(todo, desc="verify pairs"):
            matches = self.matches(chunks[chunk])
            if executor is None:
                store.save(chunk, chunks[chunk], ransac_verify(self.estimator, matches))
                continue
            pending[chunk] = executor.submit(ransac_verify, self.estimator, matches)
            while len(pending) > 2 * self.workers:
                self._collect(pending, chunks, store, block=True)
            self._collect(pending, chunks, store, block=False)
        while pending:
            self._collect(pending, chunks, store, block=True)

    @staticmethod
    def _collect(
        pending: dict[int, Future], chunks: list[np.ndarray], store: ChunkStore, block: bool
    ) -> None:
        """Save finished jobs (the oldest one waited for when ``block``)."""
        for chunk in list(pending):
            if block or pending[chunk].done():
                store.save(chunk, chunks[chunk], pending.pop(chunk).result())
                block = False


def filter_pairs(
    rows: np.ndarray, labels: Sequence[int], min_inliers: int, min_class_images: int
) -> np.ndarray:
    """Rows (i, j, inliers, ...) >= min_inliers of classes with > min_class_images images."""
    labels = np.asarray(labels)
    kept = rows[rows[:, 2] >= min_inliers]
    images = np.unique(kept[:, :2])
    counts = np.bincount(labels[images], minlength=labels.max() + 1)
    return kept[counts[labels[kept[:, 0]]] > min_class_images]


def hard_negative_pools(
    descriptors: np.ndarray,
    labels: Sequence[int],
    subset: np.ndarray,
    k: int,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> list[np.ndarray]:
    """Per subset image, up to k nearest other-class subset images (indices, nearest first)."""
    x = torch.as_tensor(descriptors[subset], device=device, dtype=torch.float32)  # (S, D)
    y = torch.as_tensor(np.asarray(labels)[subset], device=device)
    k = min(k, len(subset))
    pools = []
    for start in range(0, len(subset), chunk):
        sims = x[start : start + chunk] @ x.t()  # (c, S)
        sims[y[start : start + chunk, None] == y[None, :]] = -torch.inf  # same class and self
        top, where = sims.topk(k, dim=1)  # (c, k); -inf entries are same-class fillers
        pools += [subset[w[t > -torch.inf].numpy()] for t, w in zip(top.cpu(), where.cpu())]
    return pools


def write_outputs(
    pairs_csv: Path,
    negatives_csv: Path,
    kept: np.ndarray,
    image_ids: Sequence[str],
    classes: Sequence[str],
    labels: Sequence[int],
    negatives: list[np.ndarray],
    subset: np.ndarray,
) -> None:
    """Atomically write the pairs CSV (both directions, sorted) and the hard-negative CSV."""
    # (query, positive, inliers, query box): each kept pair in both directions; kept rows hold the
    # inlier box in i at 3:7 and in j at 7:11
    rows = [[i, j, c, boxes[:4]] for i, j, c, *boxes in kept.tolist()]
    rows += [[j, i, c, boxes[4:]] for i, j, c, *boxes in kept.tolist()]
    rows.sort()
    pairs_csv.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(
        pairs_csv,
        PAIRS_HEADER,
        [
            [image_ids[a], image_ids[b], classes[labels[a]], c, " ".join(map(str, box))]
            for a, b, c, box in rows
        ],
    )
    neg_rows = [
        [image_ids[q], " ".join(image_ids[n] for n in pool)]
        for q, pool in zip(subset.tolist(), negatives)
    ]
    _write_csv(negatives_csv, NEGATIVES_HEADER, neg_rows)


def select_pairs(
    descriptors: np.ndarray,
    labels: Sequence[int],
    image_ids: Sequence[str],
    classes: Sequence[str],
    verifier: PairVerifier,
    settings: SelectionSettings,
    pairs_csv: str | os.PathLike,
    negatives_csv: str | os.PathLike,
    key: dict,
    device: torch.device | str = "cpu",
    restart: bool = False,
) -> dict:
    """The whole resumable selection; ``key`` names the inputs of the inlier counts; ``restart``
    discards progress of other inputs instead of refusing it. -> summary."""
    pairs_csv, labels = Path(pairs_csv), np.asarray(labels)
    candidates = same_class_candidates(descriptors, labels, settings.num_neighbors)
    chunks = class_chunks(candidates, labels, settings.chunk_classes)
    store = ChunkStore(
        pairs_csv.with_name(pairs_csv.name + ".progress"),
        {
            **key,
            "num_neighbors": settings.num_neighbors,
            "chunk_classes": settings.chunk_classes,
            "num_images": len(image_ids),
        },
        restart,
    )
    verifier.run(chunks, store)
    kept = filter_pairs(
        store.load_all(len(chunks)), labels, settings.min_inliers, settings.min_class_images
    )
    if len(kept) == 0:
        raise ValueError(
            f"no pair has >= RERANK_TRAIN.MIN_INLIERS={settings.min_inliers} inliers in a class "
            f"with > RERANK_TRAIN.MIN_CLASS_IMAGES={settings.min_class_images} images; lower them"
        )
    subset = np.unique(kept[:, :2])
    negatives = hard_negative_pools(descriptors, labels, subset, settings.hard_neg_pool, device)
    write_outputs(
        pairs_csv, Path(negatives_csv), kept, image_ids, classes, labels, negatives, subset
    )
    summary = {
        "candidates": len(candidates),
        "pairs": len(kept),
        "images": len(subset),
        "classes": len(np.unique(labels[subset])),
        "settings": asdict(settings),
    }
    logger.info("pair selection: %s", summary)
    return summary
