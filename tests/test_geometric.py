"""Geometric verification: RANSAC on known homographies, mutual NN, dense keypoints, reranker."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from retrieval.config import load_cfg
from retrieval.evaluation.geometric import (
    GeometricReranker,
    GeometricVerifier,
    build_estimator,
    build_gv_reranker,
    degensac_mask,
    match_features,
    mutual_nearest_neighbours,
    sklearn_mask,
)
from retrieval.evaluation.local_features import (
    DenseLocalFeatures,
    LocalFeatures,
    SiftLocalFeatures,
    TopNormDetector,
)
from retrieval.modeling.backbone import ResNetBackbone
from retrieval.modeling.registry import build_model

H_TRUE = np.array([[0.9, 0.12, 14.0], [-0.08, 1.05, -6.0], [2e-4, -1e-4, 1.0]])


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homography to (N, 2) points."""
    p = np.c_[points, np.ones(len(points))] @ h.T
    return p[:, :2] / p[:, 2:]


def texture(seed: int, size: int = 256) -> np.ndarray:
    """A blob texture with corners and scale structure (BGR uint8)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(
        rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
        (size, size),
        interpolation=cv2.INTER_CUBIC,
    )
    fine = cv2.resize(
        rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
        (size, size),
        interpolation=cv2.INTER_NEAREST,
    )
    return cv2.addWeighted(coarse, 0.6, fine, 0.4, 0)


class Images:
    """ImageSource over a list of arrays."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def load(self, index: int) -> tuple[np.ndarray, bool]:
        return self.images[index], False


def test_degensac_recovers_known_homography_inliers():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 400, (300, 2))
    dst = project(H_TRUE, src) + rng.normal(0, 0.3, (300, 2))
    dst[180:] = rng.uniform(0, 400, (120, 2))  # 40% outliers
    exact = np.linalg.norm(project(H_TRUE, src) - dst, axis=1) < 3.0  # inliers of the true model
    found = degensac_mask(src, dst, 3.0, 0.999, 2000)
    assert found.shape == (300,) and found.dtype == bool
    assert (found != exact).sum() <= 2  # the mask marks the true model's inliers
    too_few = degensac_mask(src[:3], dst[:3], 3.0, 0.999, 100)  # too few matches for a homography
    assert too_few.tolist() == [False] * 3


def test_sklearn_affine_counts_affine_inliers():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, (200, 2))
    dst = src @ np.array([[1.1, 0.2], [-0.1, 0.9]]).T + [5.0, -3.0]
    dst[150:] = rng.uniform(0, 300, (50, 2))
    found = sklearn_mask(src, dst, 2.0, 100)
    assert found.shape == (200,) and found[:150].all() and found[150:].sum() <= 2


def test_build_estimator_resolves_names():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 300, (50, 2))
    dst = src + 7.0
    assert build_estimator("degensac", 2.0)(src, dst).sum() == 50
    assert build_estimator("sklearn", 2.0)(src, dst).sum() == 50
    with pytest.raises(ValueError, match="magsac"):
        build_estimator("magsac")


def test_mutual_nearest_neighbours_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    b = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    expected = set()
    for i in range(40):
        j = max(range(30), key=lambda j: float(a[i] @ b[j]))
        if max(range(40), key=lambda k: float(a[k] @ b[j])) == i:
            expected.add((i, j))
    got = {tuple(p) for p in mutual_nearest_neighbours(a, b).tolist()}
    assert got == expected and len(got) > 0
    assert mutual_nearest_neighbours(a[:0], b).shape == (0, 2)


def test_sift_views_of_a_homography_verify():
    image = texture(0)
    warped = cv2.warpPerspective(image, H_TRUE, (256, 256))
    features = SiftLocalFeatures(1000)
    a, b, other = features(image), features(warped), features(texture(7))
    src, dst = match_features(a, b)
    inlier = degensac_mask(src, dst, 3.0, 0.999, 2000).sum()
    assert inlier > 60
    assert np.median(np.linalg.norm(project(H_TRUE, src) - dst, axis=1)) < 2.0  # matches follow H
    assert degensac_mask(*match_features(a, other), 3.0, 0.999, 2000).sum() < 15


def test_dense_keypoints_follow_a_stride_aligned_shift():
    torch.manual_seed(0)
    big = texture(3, 320)
    crop_a, crop_b = (
        big[0:224, 0:224],
        big[32:256, 48:272],
    )  # shift by (48, 32) px: multiples of the stride
    extractor = DenseLocalFeatures(ResNetBackbone(18), "res4", (1.0,), max_features=200)
    a, b = extractor(crop_a), extractor(crop_b)
    assert a.keypoints.shape == (196, 2) and np.allclose(np.linalg.norm(a.descriptors, axis=1), 1.0)
    assert a.keypoints.min() == 7.5 and a.keypoints.max() == 215.5  # cell centres of a 14 x 14 map
    src, dst = match_features(a, b)
    shift_ok = np.all(np.isclose(src - dst, [48.0, 32.0]), axis=1)
    assert shift_ok.sum() > 60  # interior cells are identical up to the shift
    assert GeometricVerifier(build_estimator("degensac", 4.0)).inliers(a, b) >= shift_ok.sum()


def test_top_norm_detector_keeps_largest_norms():
    fmap = torch.zeros(4, 3, 5)
    fmap[:, 1, 2], fmap[:, 0, 4] = 3.0, 2.0
    assert TopNormDetector(2)(fmap).tolist() == [7, 4]
    assert len(TopNormDetector(100)(fmap)) == 15


def fake_features(image: np.ndarray) -> LocalFeatures:
    """First pixel n -> n features of one fixed set: two images share min(n, m) exact matches."""
    n = int(image[0, 0, 0])
    points = np.random.default_rng(0).uniform(0, 500, (n, 2)).astype(np.float32)
    return LocalFeatures(points, np.eye(200, dtype=np.float32)[:n])


def test_geometric_reranker_thresholds_inliers():
    def image(n):  # an image whose first pixel tells the fake extractor how many features to give
        out = np.zeros((4, 4, 3), np.uint8)
        out[0, 0, 0] = n
        return out

    queries, db = Images([image(150)]), Images([image(150), image(60), image(3)])
    verifier = GeometricVerifier(build_estimator("degensac", 2.0))
    reranker = GeometricReranker(queries, db, fake_features, verifier, min_inliers=100)
    assert reranker.inliers(0, np.array([0, 1, 2])).tolist() == [150.0, 60.0, 0.0]
    assert reranker.score(0, np.array([0, 1, 2])).tolist() == [150.0, 0.0, 0.0]
    reranker.min_inliers = 50
    assert reranker.score(0, np.array([2, 1])).tolist() == [0.0, 60.0]


def test_build_gv_reranker_from_config_scores_views():
    cfg = load_cfg(
        None,
        [
            "MODEL.ARCH",
            "cvnet_global",
            "MODEL.DEPTH",
            18,
            "MODEL.REDUCTION_DIM",
            32,
            "TEST.GV_LOCAL_FEATURES",
            "sift",
            "TEST.GV_MIN_INLIERS",
            30,
            "TEST.GV_PIXEL_THRESHOLD",
            4.0,
        ],
    )
    image = texture(5)
    db = Images([cv2.warpPerspective(image, H_TRUE, (256, 256)), texture(9)])
    reranker = build_gv_reranker(cfg, build_model(cfg), Images([image]), db)
    scores = reranker.score(0, np.array([0, 1]))
    assert scores.shape == (2,) and scores[0] >= 30 and scores[1] == 0
    assert isinstance(reranker.extractor, SiftLocalFeatures)
    dense_cfg = load_cfg(
        None, ["MODEL.ARCH", "cvnet_global", "MODEL.DEPTH", 18, "TEST.GV_ESTIMATOR", "sklearn"]
    )
    model = build_model(dense_cfg)
    dense = build_gv_reranker(dense_cfg, model, Images([image]), db)
    assert (
        isinstance(dense.extractor, DenseLocalFeatures)
        and dense.extractor.backbone is model.backbone
    )
    assert dense.verifier.estimator.func is sklearn_mask
