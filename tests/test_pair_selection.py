"""Overlapped-pair selection on a tiny synthetic GLDv2 set: true overlaps, resume, CSV format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cvnet.pair_selection import (
    PAIRS_HEADER,
    PairVerifier,
    SelectionSettings,
    filter_pairs,
    hard_negative_pools,
    same_class_candidates,
    select_pairs,
)
from retrieval.data.gldv2 import image_path, read_train_csv
from retrieval.data.image_io import read_image
from retrieval.data.synthetic import make_synthetic, read_geometry
from retrieval.data.synthetic_geometry import clip_polygon, true_overlapping_pairs, visible_region
from retrieval.data.synthetic_render import warp_points
from retrieval.evaluation.geometric import build_estimator
from retrieval.evaluation.local_features import SiftLocalFeatures

SETTINGS = SelectionSettings(
    num_neighbors=10, min_inliers=8, min_class_images=1, hard_neg_pool=3, chunk_classes=1
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 landmarks x 6 views of 256 px (GLDv2 format) with their exact geometry."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(
        root,
        progress=False,
        n_train_landmarks=4,
        views_per_landmark=6,
        image_size=256,
        test_sets=(),
    )
    train = root / "train"
    train_list = read_train_csv(train / "train_clean.csv")
    features = {}  # SIFT of every image, computed once for all tests of the module
    extractor = SiftLocalFeatures(2000, (2.0,))
    for i, image_id in enumerate(train_list.image_ids):
        features[i] = extractor(read_image(image_path(train, image_id)))
    return train, train_list, features


def descriptors_for(labels: list[int]) -> np.ndarray:
    """Random unit global descriptors (6 views < 10 neighbours: candidates cover whole classes)."""
    x = np.random.default_rng(0).normal(size=(len(labels), 16))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingFeatures:
    """Precomputed features by image index; counts calls and can fail after ``fail_after``."""

    def __init__(self, features: dict, fail_after: int | None = None) -> None:
        self.features, self.fail_after, self.calls = features, fail_after, 0

    def __call__(self, image: int):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.features[image]


def run(
    tiny,
    out: Path,
    extractor,
    settings: SelectionSettings = SETTINGS,
    workers: int = 0,
    images: int = 24,
    restart: bool = False,
) -> dict:
    """select_pairs on the first ``images`` images of the tiny set, SIFT features by index."""
    _, train_list, _ = tiny
    labels = train_list.labels[:images]
    verifier = PairVerifier(extractor, lambda i: i, build_estimator("degensac", 8.0), workers)
    return select_pairs(
        descriptors_for(labels),
        labels,
        train_list.image_ids[:images],
        train_list.classes,
        verifier,
        settings,
        out / "pairs.csv",
        out / "negatives.csv",
        {"test": 1},
        restart=restart,
    )


def read_rows(path: Path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


def test_selection_recovers_true_overlapping_pairs(tiny, tmp_path):
    train, train_list, features = tiny
    run(tiny, tmp_path, CountingFeatures(features))
    rows = read_rows(tmp_path / "pairs.csv")
    assert rows[0] == PAIRS_HEADER
    selected = {frozenset(r[:2]) for r in rows[1:]}
    truth = {frozenset(p[:2]) for p in true_overlapping_pairs(*read_geometry(train))}
    hits = len(selected & truth)
    assert hits / len(selected) >= 0.9 and hits / len(truth) >= 0.8, (
        hits,
        len(selected),
        len(truth),
    )
    label_of = dict(zip(train_list.image_ids, [train_list.classes[i] for i in train_list.labels]))
    for query, positive, landmark, inliers, _ in rows[1:]:
        assert (
            label_of[query] == label_of[positive] == landmark
            and int(inliers) >= SETTINGS.min_inliers
        )
    directed = {tuple(r[:2]) for r in rows[1:]}
    assert all((b, a) in directed for a, b in directed)  # both directions of every pair


def box_intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Area shared by two boxes x0 y0 x1 y1."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def test_query_box_is_where_the_query_overlaps_the_positive(tiny, tmp_path):
    train, _, features = tiny
    run(tiny, tmp_path, CountingFeatures(features))
    views, scenes = read_geometry(train)
    inside, covered = [], []
    for query, positive, _, _, box in read_rows(tmp_path / "pairs.csv")[1:]:
        box = np.array(box.split(), float)
        vq, vp = views[query], views[positive]
        width, height = vq.size
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        scene = scenes[vq.scene]
        shared = clip_polygon(
            visible_region(vq.H, vq.size, scene), visible_region(vp.H, vp.size, scene)
        )
        truth = warp_points(vq.H, shared)  # the overlap in the query's pixels
        truth = np.array([*truth.min(0), *truth.max(0)])
        shared_area = box_intersection(box, truth)
        inside.append(shared_area / ((box[2] - box[0]) * (box[3] - box[1])))
        covered.append(shared_area / ((truth[2] - truth[0]) * (truth[3] - truth[1])))
    # the inliers lie in the true overlap and span most of it (SIFT finds few points at its edges)
    # (measured: median inside 1.0, 85 % of boxes > 0.8 inside; median coverage 0.74)
    inside, covered = np.array(inside), np.array(covered)
    assert np.median(inside) > 0.95 and (inside > 0.8).mean() > 0.75, inside
    assert np.median(covered) > 0.6, covered


def test_resume_after_interruption_gives_the_same_csv(tiny, tmp_path):
    _, _, features = tiny
    run(tiny, tmp_path / "full", CountingFeatures(features), images=18)  # 3 classes, one chunk each
    with pytest.raises(KeyboardInterrupt):
        run(
            tiny, tmp_path / "resumed", CountingFeatures(features, fail_after=8), images=18
        )  # dies in chunk 2
    assert not (tmp_path / "resumed" / "pairs.csv").exists()
    second = CountingFeatures(features)
    run(
        tiny, tmp_path / "resumed", second, workers=1, images=18
    )  # RANSAC in a worker process this time
    assert second.calls == 18 - 6  # the finished first class (6 images) is not extracted again
    for name in ("pairs.csv", "negatives.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_changed_settings_are_refused_on_resume(tiny, tmp_path):
    _, _, features = tiny
    run(tiny, tmp_path, CountingFeatures(features), images=6)
    other = SelectionSettings(
        num_neighbors=2, min_inliers=8, min_class_images=1, hard_neg_pool=3, chunk_classes=1
    )
    with pytest.raises(ValueError, match="--restart"):
        run(tiny, tmp_path, CountingFeatures(features), other, images=6)
    # --restart discards the stale progress and recomputes every image with the new settings
    again = CountingFeatures(features)
    run(tiny, tmp_path, again, other, images=6, restart=True)
    assert again.calls == 6


def test_progress_of_an_older_chunk_layout_is_refused(tiny, tmp_path):
    _, _, features = tiny
    run(tiny, tmp_path, CountingFeatures(features), images=6)
    meta = tmp_path / "pairs.csv.progress" / "meta.json"
    key = json.loads(meta.read_text())
    del key["chunk_format"]  # as written before the chunks held inlier boxes
    meta.write_text(json.dumps(key))
    with pytest.raises(ValueError, match="--restart"):
        run(tiny, tmp_path, CountingFeatures(features), images=6)


def test_candidates_are_same_class_nearest_neighbours():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [0, 0, 0, 0, 1]
    pairs = same_class_candidates(x, labels, k=1)
    # nearest same-class neighbours: 0<->1, 2->3, 3->2 (image 4 is alone in its class)
    assert pairs.tolist() == [[0, 1], [2, 3]]
    assert len(same_class_candidates(x, labels, k=10)) == 6  # all pairs of class 0


def test_filter_pairs_thresholds_and_class_rule():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    rows = np.array([[0, 1, 50], [1, 2, 9], [3, 4, 40], [5, 6, 30], [7, 8, 31], [6, 7, 3]])
    rows = np.pad(rows, ((0, 0), (0, 8)))  # the inlier boxes play no part in the filter
    kept = filter_pairs(rows, labels, min_inliers=10, min_class_images=2)
    # class 0: 2 images in kept pairs (not > 2), class 1: 2, class 2: 4 images -> kept
    assert kept[:, :3].tolist() == [[5, 6, 30], [7, 8, 31]]
    assert len(filter_pairs(rows, labels, min_inliers=10, min_class_images=1)) == 4


def test_hard_negative_pools_are_nearest_other_class_images():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(12) % 3
    subset = np.array([0, 1, 2, 4, 5, 7, 9, 11])
    pools = hard_negative_pools(x, labels, subset, k=3, chunk=3)
    for q, pool in zip(subset, pools):
        others = [j for j in subset if labels[j] != labels[q]]
        expected = sorted(others, key=lambda j: -x[q] @ x[j])[:3]
        assert pool.tolist() == expected


def test_hard_negative_pools_are_ragged_when_few_other_class_images():
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    pools = hard_negative_pools(x, [0, 0, 0, 0, 1], np.arange(5), k=3)
    assert [p.tolist() for p in pools] == [[4], [4], [4], [4], [0, 1, 2]]


def test_no_surviving_pair_is_a_clear_error(tiny, tmp_path):
    _, _, features = tiny
    strict = SelectionSettings(
        10, min_inliers=10**6, min_class_images=1, hard_neg_pool=3, chunk_classes=1
    )
    with pytest.raises(ValueError, match="MIN_INLIERS"):
        run(tiny, tmp_path, CountingFeatures(features), strict, images=6)
