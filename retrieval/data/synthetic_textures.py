"""Procedural texture families for the synthetic landmark benchmark.

Window grids, bricks, stripes, noise, glyphs, arcades, tiles and patches of the sample pictures that
matplotlib ships, each drawn from a numpy Generator and coloured with a small palette. All landmarks
share these families, so landmarks differ by layout, palette and details (synthetic_scene.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

Palette = np.ndarray  # (K, 3) float32 BGR colours in [0, 255]
Texture = Callable[[np.random.Generator, int, int, Palette], np.ndarray]  # -> (h, w, 3) uint8
PHOTO_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _hillshade(elevation: np.ndarray) -> np.ndarray:
    """Relief shading of a terrain model: a rich grey texture. (H, W) -> (H, W) uint8."""
    gy, gx = np.gradient(elevation.astype(np.float32))
    shade = gx - gy
    lo, hi = np.percentile(shade, [2, 98])
    return (np.clip((shade - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """Sample pictures shipped with matplotlib as (name, BGR uint8); empty without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return ()
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [(name, cv2.imread(str(folder / name), cv2.IMREAD_COLOR)) for name in PHOTO_FILES]
    dem = folder / "jacksboro_fault_dem.npz"
    if dem.is_file():
        with np.load(dem) as data:
            photos.append(
                (dem.name, cv2.cvtColor(_hillshade(data["elevation"]), cv2.COLOR_GRAY2BGR))
            )
    return tuple((name, img) for name, img in photos if img is not None)


def random_palette(rng: np.random.Generator, k: int = 4) -> Palette:
    """k colours around one random hue (stone, brick, glass...) plus a contrasting accent."""
    hue = rng.uniform(0, 180)
    hues = (hue + rng.uniform(-12, 12, k)) % 180
    hues[-1] = (hue + rng.uniform(60, 120)) % 180  # accent
    sat = rng.uniform(0.05, 0.75, k) * 255
    val = np.sort(rng.uniform(0.15, 0.95, k))[rng.permutation(k)] * 255
    hsv = np.stack([hues, sat, val], axis=1).astype(np.uint8)[None]  # (1, k, 3)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0].astype(np.float32)


def colorize(field: np.ndarray, palette: Palette) -> np.ndarray:
    """Map a [0, 1] field through the palette as a linear gradient. (H, W) -> (H, W, 3) uint8."""
    stops = np.linspace(0, 1, len(palette))
    chans = [np.interp(field, stops, palette[:, c]) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


def value_noise(
    rng: np.random.Generator, h: int, w: int, cell: int = 32, octaves: int = 4
) -> np.ndarray:
    """Multi-octave value noise in [0, 1] (cubic-upsampled random grids). -> (h, w) float32."""
    out = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        size = max(cell >> octave, 2)
        grid = rng.random((h // size + 2, w // size + 2)).astype(np.float32)
        out += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) * 0.5**octave
    return (out - out.min()) / max(float(np.ptp(out)), 1e-6)


def noise_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """Stone- or foliage-like coloured noise."""
    return colorize(value_noise(rng, h, w, int(rng.integers(8, 48))), pal)


def stripes_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """Crisp, slightly wavy stripes at a random angle and period."""
    theta = rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) / rng.uniform(5, 22) * 2 * np.pi
    wave = np.sin(phase + 1.5 * value_noise(rng, h, w, 48, 2))
    return colorize(np.clip(wave * rng.uniform(1.5, 4) * 0.5 + 0.5, 0, 1), pal)


def bricks_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """Offset courses of bricks (or ashlar blocks) with mortar lines."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = pal[0]
    bh = int(rng.integers(6, 18))
    bw = int(bh * rng.uniform(1.5, 4))
    for row, y in enumerate(range(0, h, bh)):
        for x in range(-(row % 2) * bw // 2, w, bw):
            colour = pal[rng.integers(1, len(pal))] + rng.normal(0, 12, 3)
            cv2.rectangle(img, (x + 1, y + 1), (x + bw - 2, y + bh - 2), colour.tolist(), -1)
    shade = value_noise(rng, h, w, 16, 3)[..., None] * 0.5 + 0.75
    return np.clip(img * shade, 0, 255).astype(np.uint8)


def windows_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """A building facade: a wall with a grid of framed, sometimes arched, sometimes lit windows."""
    img = colorize(value_noise(rng, h, w, 24, 3) * 0.3 + 0.6, pal)
    rows, cols = int(rng.integers(2, 7)), int(rng.integers(2, 9))
    ch, cw = h / rows, w / cols
    fw, fh = rng.uniform(0.35, 0.7), rng.uniform(0.4, 0.75)
    arched, frame = rng.random() < 0.4, max(1, int(rng.integers(1, 4)))
    glass, lit = pal[int(np.argmin(pal.sum(1)))], pal[int(np.argmax(pal.sum(1)))]
    for r in range(rows):
        for c in range(cols):
            x0, y0 = int((c + (1 - fw) / 2) * cw), int((r + (1 - fh) / 2) * ch)
            x1, y1 = int(x0 + fw * cw), int(y0 + fh * ch)
            colour = (lit if rng.random() < 0.15 else glass + rng.normal(0, 10, 3)).tolist()
            cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
            if arched:
                centre, axes = ((x0 + x1) // 2, y0), ((x1 - x0) // 2, (x1 - x0) // 3 + 1)
                cv2.ellipse(img, centre, axes, 0, 180, 360, colour, -1, cv2.LINE_AA)
            cv2.rectangle(img, (x0, y0), (x1, y1), pal[0].tolist(), frame)
    return img


Glyph = Callable[[np.random.Generator, np.ndarray, int, int, float, list], None]


def _letter(
    rng: np.random.Generator, img: np.ndarray, x: int, y: int, size: float, ink: list
) -> None:
    """One letter or digit in a random Hershey font."""
    font, thick = FONTS[rng.integers(len(FONTS))], int(rng.integers(1, 4))
    cv2.putText(
        img, str(rng.choice(list(LETTERS))), (x, y), font, size / 14, ink, thick, cv2.LINE_AA
    )


def _ring(
    rng: np.random.Generator, img: np.ndarray, x: int, y: int, size: float, ink: list
) -> None:
    """A disc or a ring."""
    cv2.circle(img, (x, y), int(size), ink, int(rng.choice([-1, 2, 3])), cv2.LINE_AA)


def _blob(
    rng: np.random.Generator, img: np.ndarray, x: int, y: int, size: float, ink: list
) -> None:
    """A random filled polygon with 3 to 6 vertices."""
    pts = np.array([x, y]) + rng.normal(0, size, (int(rng.integers(3, 7)), 2))
    cv2.fillPoly(img, [pts.astype(np.int32)], ink, cv2.LINE_AA)


def _stroke(
    rng: np.random.Generator, img: np.ndarray, x: int, y: int, size: float, ink: list
) -> None:
    """A straight stroke of random length and width."""
    end = (int(x + rng.normal(0, 3 * size)), int(y + rng.normal(0, 3 * size)))
    cv2.line(img, (x, y), end, ink, int(rng.integers(1, 5)), cv2.LINE_AA)


GLYPHS: tuple[Glyph, ...] = (_letter, _ring, _blob, _stroke)


def glyphs_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """Random letters, circles, polygons and lines (signage, ornaments) on a plain wall."""
    img = colorize(value_noise(rng, h, w, 32, 2) * 0.4, pal)
    for _ in range(int(rng.integers(6, 20))):
        ink = pal[rng.integers(1, len(pal))].tolist()
        x, y, size = int(rng.integers(0, w)), int(rng.integers(0, h)), rng.uniform(6, 30)
        GLYPHS[rng.integers(len(GLYPHS))](rng, img, x, y, size, ink)
    return img


def arches_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """An arcade: columns carrying round arches over dark openings."""
    img = colorize(value_noise(rng, h, w, 16, 3) * 0.3 + 0.7, pal)
    period = int(rng.integers(16, 48))
    col_w, dark = max(2, int(period * rng.uniform(0.15, 0.35))), pal[int(np.argmin(pal.sum(1)))]
    top = int(h * rng.uniform(0.15, 0.45))
    for x in range(0, w + period, period):
        x0, x1 = x + col_w // 2, x + period - col_w // 2
        cv2.rectangle(img, (x0, top + (x1 - x0) // 2), (x1, h), dark.tolist(), -1)
        cv2.ellipse(
            img,
            ((x0 + x1) // 2, top + (x1 - x0) // 2),
            ((x1 - x0) // 2, (x1 - x0) // 2),
            0,
            180,
            360,
            dark.tolist(),
            -1,
            cv2.LINE_AA,
        )
    return img


def tiles_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """A (possibly rotated) checkerboard of tiles with noisy shading."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, period = rng.uniform(0, np.pi / 2), rng.uniform(6, 24)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period
    v = (yy * np.cos(theta) - xx * np.sin(theta)) / period
    checker = (np.floor(u) + np.floor(v)) % 2
    return colorize(np.clip(0.7 * checker + 0.3 * value_noise(rng, h, w, 16, 2), 0, 1), pal)


def photo_texture(rng: np.random.Generator, h: int, w: int, pal: Palette) -> np.ndarray:
    """A random crop of a sample picture, often recoloured with the palette (mural, poster)."""
    photos = sample_photos()
    if not photos:
        return noise_texture(rng, h, w, pal)
    src = photos[int(rng.integers(len(photos)))][1]
    ch = src.shape[0] * rng.uniform(0.3, 0.8)
    ch, cw = min(ch, src.shape[1] * h / w), min(ch * w / h, src.shape[1])
    y0, x0 = int(rng.uniform(0, src.shape[0] - ch)), int(rng.uniform(0, src.shape[1] - cw))
    crop = cv2.resize(
        src[y0 : y0 + int(ch), x0 : x0 + int(cw)], (w, h), interpolation=cv2.INTER_AREA
    )
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.6:
        return colorize(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) / 255.0, pal)
    return np.ascontiguousarray(crop)


TEXTURES: dict[str, Texture] = {
    "windows": windows_texture,
    "bricks": bricks_texture,
    "stripes": stripes_texture,
    "noise": noise_texture,
    "glyphs": glyphs_texture,
    "arches": arches_texture,
    "tiles": tiles_texture,
    "photo": photo_texture,
}
TEXTURE_WEIGHTS = (
    np.array([3, 2, 1.5, 1, 1.5, 1.5, 1, 1]) / 12.5
)  # facades dominate, like landmarks
