"""Image reading and resizing exactly as the official test path (cv2, BGR uint8, fx/fy form).

The official multi-scale resize passes the *factor* to OpenCV (``cv2.resize(im, (0, 0), fx=s,
fy=s)``): an explicit output size of the same value maps pixels differently (spec/cvnet.md §5), so
only the factor form is used here.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded; the message names the path."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) BGR uint8; raises ImageReadError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image {str(path)!r} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageReadError(f"image {str(path)!r} cannot be decoded (corrupt or not an image)")
    return image


def resize_scale(image: np.ndarray, scale: float) -> np.ndarray:
    """Official resize by factor s: INTER_AREA below 1, INTER_LINEAR above; s == 1 keeps it."""
    if scale == 1.0:
        return image
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=interpolation)


def ensure_min_side(image: np.ndarray, min_side: int) -> tuple[np.ndarray, bool]:
    """Upscale (INTER_LINEAR, aspect kept) to a shorter side >= min_side: (image, upscaled)."""
    short = min(image.shape[:2])
    if min_side <= 0 or short >= min_side:
        return image, False
    if short == 0:
        raise ValueError(f"image of shape {image.shape} is empty (a crop outside the image?)")
    factor = min_side / short
    height, width = image.shape[:2]
    size = (
        max(min_side, round(width * factor)),
        max(min_side, round(height * factor)),
    )  # cv2 takes (w, h)
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), True
