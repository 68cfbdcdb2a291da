"""Geometric verification (GV): local features, mutual-NN matching and RANSAC inlier counts.

Used as the GV re-ranker of CVNet supp. S4 (TEST.RERANKER gv) and by the overlapped-pair selection
of supp. S1 (cvnet/pair_selection.py). Pieces, each replaceable:
* local features (retrieval/evaluation/local_features.py): dense backbone-map cells (res4, the
  largest L2 norms, up to 1000) or SIFT, at the scales TEST.GV_SCALES (TEST.GV_LOCAL_FEATURES).
* matching: mutual nearest neighbours under cosine similarity.
* estimation: a homography with pydegensac (the paper's choice) or an affine model with
  scikit-learn's RANSACRegressor (the scikit-learn RANSAC the supplementary compares against),
  resolved once by name.

Re-rank score: the inlier count when it reaches ``min_inliers`` (supp. S4: 100), else 0. Fused as
s_global + w * score (retrieval/evaluation/rerank.py), verified items therefore move ahead of
unverified ones in the order of their inlier counts, as in DELG's GV.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Protocol

import numpy as np
import torch
from torch import nn

from retrieval.evaluation.local_features import (
    LocalFeatureExtractor,
    LocalFeatures,
    build_local_features,
)

logger = logging.getLogger(__name__)
ESTIMATORS = ("degensac", "sklearn")
# Matches needed to fit each model (homography: 4 correspondences, affine: 3).
MIN_SAMPLES = {"degensac": 4, "sklearn": 3}


def mutual_nearest_neighbours(desc_a: torch.Tensor, desc_b: torch.Tensor) -> torch.Tensor:
    """(Na, D), (Nb, D) unit rows -> (M, 2) pairs (i, j) of mutual cosine nearest neighbours."""
    if len(desc_a) == 0 or len(desc_b) == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=desc_a.device)
    sim = desc_a @ desc_b.t()  # (Na, Nb)
    a_to_b = sim.argmax(dim=1)  # (Na,)
    b_to_a = sim.argmax(dim=0)  # (Nb,)
    rows = torch.arange(len(desc_a), device=desc_a.device)
    mutual = b_to_a[a_to_b] == rows
    return torch.stack([rows[mutual], a_to_b[mutual]], dim=1)


def match_features(
    a: LocalFeatures, b: LocalFeatures, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-NN matches of two feature sets -> (src (M, 2), dst (M, 2)) keypoints in pixels."""
    pairs = (
        mutual_nearest_neighbours(
            torch.from_numpy(a.descriptors).to(device), torch.from_numpy(b.descriptors).to(device)
        )
        .cpu()
        .numpy()
    )
    return a.keypoints[pairs[:, 0]].astype(np.float64), b.keypoints[pairs[:, 1]].astype(np.float64)


# A RANSAC inlier finder: (src (M, 2), dst (M, 2)) matched pixel coordinates -> inlier mask (M,)
# bool. The mask, not only its count: pair selection keeps where the inliers lie (the overlap box).
Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


def degensac_mask(
    src: np.ndarray,
    dst: np.ndarray,
    px_threshold: float,
    confidence: float,
    max_iters: int,
    seed: int = 0,
) -> np.ndarray:
    """Inlier mask (M,) of a pydegensac homography (none below 4 matches); fixed seed."""
    import pydegensac  # lazily: only the GV paths need it

    if len(src) < MIN_SAMPLES["degensac"]:
        return np.zeros(len(src), bool)
    _, mask = pydegensac.findHomography(src, dst, px_threshold, confidence, max_iters, seed=seed)
    return np.asarray(mask, bool).reshape(-1) if mask is not None else np.zeros(len(src), bool)


def _euclidean_loss(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-match reprojection distance (M,) for sklearn's RANSACRegressor."""
    return np.linalg.norm(y_true - y_pred, axis=1)


def sklearn_mask(
    src: np.ndarray, dst: np.ndarray, px_threshold: float, max_iters: int, seed: int = 0
) -> np.ndarray:
    """Inlier mask (M,) of an affine dst = A src + t by sklearn's RANSACRegressor."""
    from sklearn.linear_model import LinearRegression, RANSACRegressor  # lazily: optional GV path

    if len(src) < MIN_SAMPLES["sklearn"]:
        return np.zeros(len(src), bool)
    ransac = RANSACRegressor(
        LinearRegression(),
        min_samples=MIN_SAMPLES["sklearn"],
        residual_threshold=px_threshold,
        max_trials=max_iters,
        loss=_euclidean_loss,
        random_state=seed,
    )
    try:
        ransac.fit(src, dst)
    except ValueError:  # no consensus set found within max_trials
        return np.zeros(len(src), bool)
    return np.asarray(ransac.inlier_mask_, bool)


def build_estimator(
    name: str, px_threshold: float = 16.0, confidence: float = 0.999, max_iters: int = 1000
) -> Estimator:
    """The inlier finder named ``name`` ('degensac' homography | 'sklearn' affine)."""
    # partials of module functions pickle, so the estimator can run in worker processes
    if name == "degensac":
        return partial(
            degensac_mask, px_threshold=px_threshold, confidence=confidence, max_iters=max_iters
        )
    if name == "sklearn":
        return partial(sklearn_mask, px_threshold=px_threshold, max_iters=max_iters)
    raise ValueError(f"GV estimator {name!r} unknown; expected one of {ESTIMATORS}")


class GeometricVerifier:
    """Inlier count of a pair of LocalFeatures: mutual-NN matching then the estimator."""

    def __init__(self, estimator: Estimator, device: torch.device | str = "cpu") -> None:
        self.estimator, self.device = estimator, device

    def inliers(self, a: LocalFeatures, b: LocalFeatures) -> int:
        """RANSAC inliers among the mutual nearest-neighbour matches of a and b."""
        return int(self.estimator(*match_features(a, b, self.device)).sum())


class ImageSource(Protocol):
    """Indexable images, e.g. retrieval.data.revisitop.ImageListDataset (crop, min side applied)."""

    def load(self, index: int) -> tuple[np.ndarray, bool]:
        """((H, W, 3) BGR uint8 image, was_upscaled) of ``index``."""
        ...


class GeometricReranker:
    """Reranker protocol: score = inliers if inliers >= min_inliers else 0 (DELG/CVNet supp. S4)."""

    def __init__(
        self,
        queries: ImageSource,
        database: ImageSource,
        extractor: LocalFeatureExtractor,
        verifier: GeometricVerifier,
        min_inliers: int = 100,
        cache_size: int = 2048,
    ) -> None:
        self.queries, self.database, self.extractor = queries, database, extractor
        self.verifier, self.min_inliers, self.cache_size = verifier, min_inliers, cache_size
        self._query: tuple[int, LocalFeatures] | None = None
        self._db_cache: OrderedDict[int, LocalFeatures] = OrderedDict()

    def _query_features(self, index: int) -> LocalFeatures:
        """Features of one query, kept while the same query is scored."""
        if self._query is None or self._query[0] != index:
            self._query = (index, self.extractor(self.queries.load(index)[0]))
        return self._query[1]

    def _db_features(self, index: int) -> LocalFeatures:
        """Database image features through a bounded LRU cache (query shortlists overlap)."""
        if index in self._db_cache:
            self._db_cache.move_to_end(index)
            return self._db_cache[index]
        feats = self.extractor(self.database.load(index)[0])
        self._db_cache[index] = feats
        if len(self._db_cache) > self.cache_size:
            self._db_cache.popitem(last=False)
        return feats

    def inliers(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        """Raw inlier counts (len(db_indices),) of a query against database items."""
        query = self._query_features(query_index)
        return np.array(
            [self.verifier.inliers(query, self._db_features(int(i))) for i in db_indices],
            np.float64,
        )

    def score(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        """Thresholded inlier counts: below min_inliers a pair scores 0."""
        counts = self.inliers(query_index, db_indices)
        return np.where(counts >= self.min_inliers, counts, 0.0)


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a global model (``.backbone``) or of CVNet-Rerank (``.encoder.backbone``)."""
    owner = model.encoder if hasattr(model, "encoder") else model
    if not hasattr(owner, "backbone"):
        raise ValueError(f"{type(model).__name__} has no backbone for GV local features")
    return owner.backbone


def build_gv_local_features(
    cfg, model: nn.Module | None, device: torch.device | str
) -> LocalFeatureExtractor:
    """Local-feature extractor from TEST.GV_* (the backbone of ``model`` for dense features)."""
    backbone = backbone_of(model) if cfg.TEST.GV_LOCAL_FEATURES == "backbone" else None
    return build_local_features(
        cfg.TEST.GV_LOCAL_FEATURES,
        backbone,
        cfg.TEST.GV_FEATURE,
        cfg.TEST.GV_SCALES,
        cfg.TEST.GV_MAX_FEATURES,
        cfg.MODEL.INPUT_FORMAT,
        device,
    )


def build_gv_estimator(cfg) -> Estimator:
    """Inlier counter from TEST.GV_ESTIMATOR, _PIXEL_THRESHOLD, _CONFIDENCE and _MAX_ITERS."""
    return build_estimator(
        cfg.TEST.GV_ESTIMATOR,
        cfg.TEST.GV_PIXEL_THRESHOLD,
        cfg.TEST.GV_CONFIDENCE,
        cfg.TEST.GV_MAX_ITERS,
    )


def build_gv_reranker(
    cfg,
    model: nn.Module | None,
    queries: ImageSource,
    database: ImageSource,
    device: torch.device | str = "cpu",
) -> GeometricReranker:
    """GeometricReranker of TEST.GV_* on ``model``'s backbone; min inliers TEST.GV_MIN_INLIERS."""
    verifier = GeometricVerifier(build_gv_estimator(cfg), device)
    extractor = build_gv_local_features(cfg, model, device)
    return GeometricReranker(queries, database, extractor, verifier, cfg.TEST.GV_MIN_INLIERS)
