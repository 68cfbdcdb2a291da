"""Input convention (BGR/RGB normalisation) and official image I/O (reading, resizing, min side)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from retrieval.data.image_io import ImageReadError, ensure_min_side, read_image, resize_scale
from retrieval.data.transforms import pixel_stats, to_tensor

IMAGENET_RGB_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_RGB_STD = np.array([0.229, 0.224, 0.225])


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_pixel_stats_orders() -> None:
    mean, std = pixel_stats("BGR")
    np.testing.assert_allclose(mean, IMAGENET_RGB_MEAN[::-1])
    np.testing.assert_allclose(std, IMAGENET_RGB_STD[::-1])
    mean, std = pixel_stats("RGB")
    np.testing.assert_allclose(mean, IMAGENET_RGB_MEAN)
    np.testing.assert_allclose(std, IMAGENET_RGB_STD)
    with pytest.raises(ValueError, match="'bgr'"):
        pixel_stats("bgr")


@pytest.mark.parametrize("input_format", ["BGR", "RGB"])
def test_to_tensor_matches_reference(input_format: str) -> None:
    image = _noise(5, 7)
    tensor = to_tensor(image, input_format)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    order = (
        [0, 1, 2] if input_format == "BGR" else [2, 1, 0]
    )  # image channel feeding tensor channel c
    rgb_index = (
        [2, 1, 0] if input_format == "BGR" else [0, 1, 2]
    )  # ImageNet statistic of tensor channel c
    for c in range(3):
        expected = (
            image[:, :, order[c]] / 255.0 - IMAGENET_RGB_MEAN[rgb_index[c]]
        ) / IMAGENET_RGB_STD[rgb_index[c]]
        np.testing.assert_allclose(tensor[c].numpy(), expected, atol=1e-5)


def test_bgr_and_rgb_differ_only_by_channel_order() -> None:
    image = _noise(4, 4, seed=1)
    torch.testing.assert_close(to_tensor(image, "RGB"), to_tensor(image, "BGR").flip(0))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(image.astype(np.float32), "BGR")


@pytest.mark.parametrize(
    ("height", "width", "scale", "expected"),
    [
        (768, 1024, 0.7071, (543, 724)),
        (1024, 768, 1.4142, (1448, 1086)),
        (683, 1024, 0.7071, (483, 724)),
    ],
)
def test_resize_scale_official_sizes(
    height: int, width: int, scale: float, expected: tuple
) -> None:
    assert resize_scale(_noise(height, width), scale).shape[:2] == expected


@pytest.mark.parametrize(
    ("scale", "interpolation"), [(0.7071, cv2.INTER_AREA), (1.4142, cv2.INTER_LINEAR)]
)
def test_resize_scale_uses_factor_form(scale: float, interpolation: int) -> None:
    image = _noise(96, 128, seed=2)
    out = resize_scale(image, scale)
    np.testing.assert_array_equal(
        out, cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=interpolation)
    )
    by_size = cv2.resize(image, (out.shape[1], out.shape[0]), interpolation=interpolation)
    assert (
        np.abs(out.astype(int) - by_size).max() > 0
    )  # the explicit-size form maps pixels differently
    other = cv2.INTER_LINEAR if interpolation == cv2.INTER_AREA else cv2.INTER_AREA
    assert not np.array_equal(
        out, cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=other)
    )


def test_resize_scale_one_keeps_image() -> None:
    image = _noise(10, 12)
    assert resize_scale(image, 1.0) is image


def test_read_image_roundtrip_and_errors(tmp_path) -> None:
    image = _noise(9, 11)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)  # BGR kept, lossless
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError, match="nope.jpg"):
        read_image(missing)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_ensure_min_side() -> None:
    small = _noise(20, 50)
    out, upscaled = ensure_min_side(small, 32)
    assert upscaled and out.shape[:2] == (32, 80)
    big = _noise(40, 50)
    out, upscaled = ensure_min_side(big, 32)
    assert not upscaled and out is big
