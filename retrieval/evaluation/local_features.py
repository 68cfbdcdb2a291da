"""Local features for geometric verification: dense backbone-map locations or SIFT keypoints.

``DenseLocalFeatures`` takes the cells of a dense backbone map (default res4, stride 16) chosen by a
pluggable detector (default: the largest L2 norms, up to N = 1000 over all image scales, the
DELF/DELG-style attention proxy for a model without a trained local head); keypoints are the cell
centres in original image pixels. ``SiftLocalFeatures`` (cv2 SIFT, RootSIFT descriptors) is the
classical alternative. Both extract at several image scales and return unit-norm descriptors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from retrieval.data.image_io import resize_scale
from retrieval.data.transforms import to_tensor

LOCAL_FEATURES = ("backbone", "sift")


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints (N, 2) as (x, y) pixels and L2-normalised descriptors (N, D), float32."""

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)


# A local-feature extractor: (H, W, 3) BGR uint8 image -> LocalFeatures.
LocalFeatureExtractor = Callable[[np.ndarray], LocalFeatures]
# A keypoint detector on a dense map: (C, h, w) -> flat indices (N,) of kept cells, best first.
Detector = Callable[[torch.Tensor], torch.Tensor]


class TopNormDetector:
    """Keep the ``max_features`` locations with the largest descriptor L2 norm."""

    def __init__(self, max_features: int = 1000) -> None:
        if max_features < 1:
            raise ValueError(f"max_features must be >= 1, got {max_features}")
        self.max_features = max_features

    def __call__(self, fmap: torch.Tensor) -> torch.Tensor:
        """(C, h, w) -> indices (min(N, h*w),) into the flattened h*w grid, largest norm first."""
        norms = fmap.flatten(1).norm(dim=0)  # (C, h, w) -> (h*w,)
        return norms.topk(min(self.max_features, norms.numel())).indices


def cell_centres(height: int, width: int, stride_y: float, stride_x: float) -> torch.Tensor:
    """(h*w, 2) pixel centres (x, y) of the cells of an h x w map, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (
        torch.stack([(xs.flatten() + 0.5) * stride_x, (ys.flatten() + 0.5) * stride_y], dim=1) - 0.5
    )


class DenseLocalFeatures:
    """Local features from one dense backbone map at several image scales (CVNet supp. S4 style)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature: str = "res4",
        scales: Sequence[float] = (0.7071, 1.0, 1.4142),
        max_features: int = 1000,
        input_format: str = "BGR",
        device: torch.device | str = "cpu",
        detector: Detector | None = None,
    ) -> None:
        if feature not in backbone.output_shape():
            raise ValueError(
                f"feature {feature!r} unknown; the backbone gives {sorted(backbone.output_shape())}"
            )
        self.backbone, self.feature, self.scales = (
            backbone,
            feature,
            tuple(float(s) for s in scales),
        )
        self.max_features, self.input_format = max_features, input_format
        self.device = torch.device(device)
        self.detector = detector if detector is not None else TopNormDetector(max_features)

    @torch.no_grad()
    def _one_scale(self, image: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors (h*w, C) and keypoints in original pixels (h*w, 2) of one image scale."""
        resized = resize_scale(image, scale)
        batch = (
            to_tensor(resized, self.input_format).unsqueeze(0).to(self.device)
        )  # (1, 3, H_s, W_s)
        fmap = self.backbone(batch, (self.feature,))[self.feature][0].float()  # (C, h, w)
        h, w = fmap.shape[-2:]
        # real strides of this map (ceil rounding) mapped back to the original image size
        centres = cell_centres(h, w, image.shape[0] / h, image.shape[1] / w)
        return fmap, centres

    def __call__(self, image: np.ndarray) -> LocalFeatures:
        """BGR uint8 image -> up to max_features detected locations over all scales."""
        was_training = self.backbone.training
        self.backbone.eval()
        descs, points, norms = [], [], []
        for scale in self.scales:
            fmap, centres = self._one_scale(image, scale)
            keep = self.detector(fmap).cpu()
            flat = fmap.flatten(1).t().cpu()  # (C, h, w) -> (h*w, C)
            descs.append(flat[keep])
            points.append(centres[keep])
            norms.append(flat[keep].norm(dim=1))
        self.backbone.train(was_training)
        order = torch.cat(norms).argsort(descending=True)[: self.max_features]
        desc = nn.functional.normalize(torch.cat(descs)[order], dim=1)
        return LocalFeatures(
            torch.cat(points)[order].numpy().astype(np.float32), desc.numpy().astype(np.float32)
        )


class SiftLocalFeatures:
    """cv2 SIFT at the given image scales, RootSIFT descriptors, the strongest max_features."""

    def __init__(
        self,
        max_features: int = 1000,
        scales: Sequence[float] = (1.0,),
        contrast_threshold: float = 0.01,
    ) -> None:
        # a quarter of the cv2 default (0.04): keypoints on low-contrast (blurred, hazy) views
        self.sift = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=contrast_threshold)
        self.max_features, self.scales = max_features, tuple(float(s) for s in scales)

    def _one_scale(
        self, grey: np.ndarray, scale: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points in original pixels (n, 2), descriptors (n, 128), responses (n,)) at one scale."""
        resized = resize_scale(grey, scale)  # (h, w) grey
        keypoints, desc = self.sift.detectAndCompute(resized, None)
        if desc is None:
            return np.zeros((0, 2)), np.zeros((0, 128), np.float32), np.zeros(0)
        factor = np.array([resized.shape[1] / grey.shape[1], resized.shape[0] / grey.shape[0]])
        points = np.array([kp.pt for kp in keypoints]).reshape(-1, 2) / factor
        return points, desc, np.array([kp.response for kp in keypoints])

    def __call__(self, image: np.ndarray) -> LocalFeatures:
        """BGR uint8 image -> SIFT LocalFeatures (empty arrays when nothing is detected)."""
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        points, desc, response = (
            np.concatenate(parts) for parts in zip(*(self._one_scale(grey, s) for s in self.scales))
        )
        keep = np.argsort(-response, kind="stable")[: self.max_features]
        root = np.sqrt(
            desc[keep] / (desc[keep].sum(axis=1, keepdims=True) + 1e-12)
        )  # RootSIFT: unit L2 norm
        return LocalFeatures(points[keep].astype(np.float32), root.astype(np.float32))


def build_local_features(
    name: str,
    backbone: nn.Module | None = None,
    feature: str = "res4",
    scales: Sequence[float] = (1.0,),
    max_features: int = 1000,
    input_format: str = "BGR",
    device: torch.device | str = "cpu",
) -> LocalFeatureExtractor:
    """The local-feature extractor named ``name`` ('backbone' dense map | 'sift')."""
    if name == "backbone":
        if backbone is None:
            raise ValueError("local features 'backbone' need a backbone")
        return DenseLocalFeatures(backbone, feature, scales, max_features, input_format, device)
    if name == "sift":
        return SiftLocalFeatures(max_features, scales)
    raise ValueError(f"GV local features {name!r} unknown; expected one of {LOCAL_FEATURES}")
