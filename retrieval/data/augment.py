"""Training augmentation of cv2 BGR uint8 images: random resized crop, colour jitter, flip
(TrainAugment), or an aspect-preserving resize and colour jitter (NativeAugment).

Every random draw comes from the numpy Generator passed in (seeded by the dataset from seed, epoch
and sample index), so a resumed run sees exactly the augmentations of an uninterrupted one. The crop
follows the usual random-resized-crop rule (area fraction uniform in CROP_SCALE, log-uniform aspect
ratio, 10 attempts, then a centre crop clamped to the ratio range). The result goes through
transforms.to_tensor, the one place applying the channel order and mean/std.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from yacs.config import CfgNode

from retrieval.data.transforms import to_tensor

# BGR weights of the luma used as the "grey" image by saturation jitter (ITU-R 601).
_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)
_CROP_ATTEMPTS = 10


def random_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in ``scale`` and aspect w/h in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])  # fallback: largest centred crop in range
    w, h = (
        (width, round(width / aspect))
        if aspect > width / height
        else (round(height * aspect), height)
    )
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation factors uniform in [1 - s, 1 + s]; uint8 (H, W, 3)."""
    b, c, s = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    x = image.astype(np.float32) * b
    mean_grey = float((x @ _LUMA_BGR).mean())  # contrast scales around the mean grey level
    x = (x - mean_grey) * c + mean_grey
    grey = (x @ _LUMA_BGR)[:, :, None]  # (H, W, 1)
    x = (x - grey) * s + grey
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class TrainAugment:
    """Random resized crop, colour jitter, flip, to_tensor: (H, W, 3) uint8 -> (3, S, S) float."""

    def __init__(
        self,
        size: int,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
        color_jitter: float = 0.2,
        hflip: float = 0.5,
        input_format: str = "BGR",
    ) -> None:
        if (
            size < 1
            or not 0 < crop_scale[0] <= crop_scale[1] <= 1
            or not 0 < crop_ratio[0] <= crop_ratio[1]
        ):
            raise ValueError(
                f"TrainAugment: bad size={size}, crop_scale={crop_scale} or crop_ratio={crop_ratio}"
            )
        self.size, self.crop_scale, self.crop_ratio = size, tuple(crop_scale), tuple(crop_ratio)
        self.jitter, self.hflip, self.input_format = color_jitter, hflip, input_format

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Augment one BGR uint8 image with draws from ``rng``."""
        top, left, h, w = random_crop_box(*image.shape[:2], self.crop_scale, self.crop_ratio, rng)
        crop = image[top : top + h, left : left + w]
        crop = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        if self.jitter > 0:
            crop = color_jitter(crop, self.jitter, rng)
        if rng.random() < self.hflip:
            crop = crop[:, ::-1]
        return to_tensor(np.ascontiguousarray(crop), self.input_format)


class NativeAugment:
    """Aspect-preserving: (H, W, 3) uint8 -> (3, h, w) with max(h, w) <= max_size (never upscaled),
    colour jitter; no crop or flip, so a pair keeps the geometry a test pair has."""

    def __init__(self, max_size: int, color_jitter: float = 0.2, input_format: str = "BGR") -> None:
        if max_size < 1:
            raise ValueError(f"NativeAugment: bad max_size={max_size}")
        self.max_size, self.jitter, self.input_format = max_size, color_jitter, input_format

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Augment one BGR uint8 image with draws from ``rng``."""
        height, width = image.shape[:2]
        scale = self.max_size / max(height, width)
        if scale < 1:
            size = (max(round(width * scale), 1), max(round(height * scale), 1))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        if self.jitter > 0:
            image = color_jitter(image, self.jitter, rng)
        return to_tensor(np.ascontiguousarray(image), self.input_format)


def build_train_augment(cfg: CfgNode) -> TrainAugment:
    """TrainAugment from TRAIN.IMG_SIZE, TRAIN.AUG and MODEL.INPUT_FORMAT."""
    aug = cfg.TRAIN.AUG
    return TrainAugment(
        cfg.TRAIN.IMG_SIZE,
        tuple(aug.CROP_SCALE),
        tuple(aug.CROP_RATIO),
        aug.COLOR_JITTER,
        aug.HFLIP,
        cfg.MODEL.INPUT_FORMAT,
    )
