"""The input convention, applied in this one place: channel order, /255 and ImageNet mean/std.

Images are read with cv2 (BGR, HWC, uint8). ``MODEL.INPUT_FORMAT`` names what the network expects:
BGR (official CVNet/SENet, pycls lineage: mean/std in BGR order) or RGB (torchvision lineage).
"""

from __future__ import annotations

import numpy as np
import torch

# ImageNet statistics in BGR order (spec/cvnet.md §5); the RGB order is the reverse.
_BGR_MEAN = (0.406, 0.456, 0.485)
_BGR_STD = (0.225, 0.224, 0.229)
INPUT_FORMATS = ("BGR", "RGB")


def _check_format(input_format: str) -> None:
    """Reject an unknown input format with the allowed values."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(
            f"input format {input_format!r} is not allowed; expected one of {INPUT_FORMATS}"
        )


def pixel_stats(input_format: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in the channel order of ``input_format``."""
    _check_format(input_format)
    if input_format == "BGR":
        return _BGR_MEAN, _BGR_STD
    return tuple(reversed(_BGR_MEAN)), tuple(reversed(_BGR_STD))


def to_tensor(image_bgr_uint8: np.ndarray, input_format: str) -> torch.Tensor:
    """(H, W, 3) BGR uint8 -> (3, H, W) float32, normalised in ``input_format`` order."""
    image = np.asarray(image_bgr_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 BGR image, got shape {image.shape} dtype {image.dtype}"
        )
    mean, std = pixel_stats(input_format)
    if input_format == "RGB":
        image = image[:, :, ::-1]
    pixels = image.astype(np.float32) / 255.0  # (H, W, 3)
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(
        np.ascontiguousarray(pixels.transpose(2, 0, 1))
    )  # (H, W, 3) -> (3, H, W)
