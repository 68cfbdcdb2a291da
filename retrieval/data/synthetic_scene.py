"""Landmark canvases of the synthetic benchmark: textured panels plus ornaments on a plane.

A landmark is a canvas split into panels (guillotine cuts), each filled by a texture family, with
rose windows, clocks, signs or pediments drawn on top. A look-alike keeps the layout and palette but
redraws every panel and ornament: globally similar, locally different, so it fools global
descriptors more than local matching. A SceneSpec is pure data; render_scene draws it
deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from retrieval.data.synthetic_textures import (
    FONTS,
    LETTERS,
    TEXTURE_WEIGHTS,
    TEXTURES,
    Palette,
    random_palette,
)

Point = tuple[int, int]
Colour = list[float]


def _wheel(
    img: np.ndarray,
    c: Point,
    r: int,
    fill: Colour,
    ink: Colour,
    spokes: int,
    inner: float,
    phase: float,
) -> None:
    """A disc with `spokes` radial strokes from inner * r to its rim."""
    cv2.circle(img, c, r, fill, -1, cv2.LINE_AA)
    for a in np.linspace(0, 2 * np.pi, spokes, endpoint=False) + phase:
        p0 = (int(c[0] + inner * r * np.cos(a)), int(c[1] + inner * r * np.sin(a)))
        p1 = (int(c[0] + r * np.cos(a)), int(c[1] + r * np.sin(a)))
        cv2.line(img, p0, p1, ink, 2, cv2.LINE_AA)
    cv2.circle(img, c, r, ink, 2, cv2.LINE_AA)


def _rose(
    rng: np.random.Generator, img: np.ndarray, c: Point, r: int, fill: Colour, ink: Colour
) -> None:
    """Rose window: a disc with radial tracery."""
    _wheel(img, c, r, fill, ink, int(rng.integers(5, 13)), 0.15, rng.uniform(0, np.pi))


def _clock(
    rng: np.random.Generator, img: np.ndarray, c: Point, r: int, fill: Colour, ink: Colour
) -> None:
    """Clock face: a disc with twelve hour ticks."""
    _wheel(img, c, r, fill, ink, 12, 0.8, rng.uniform(0, np.pi))


def _sign(
    rng: np.random.Generator, img: np.ndarray, c: Point, r: int, fill: Colour, ink: Colour
) -> None:
    """A plaque with a random word."""
    word = "".join(rng.choice(list(LETTERS), int(rng.integers(3, 8))))
    cv2.rectangle(img, (c[0] - 2 * r, c[1] - r // 2), (c[0] + 2 * r, c[1] + r // 2), fill, -1)
    font = FONTS[rng.integers(len(FONTS))]
    cv2.putText(img, word, (c[0] - 2 * r + 3, c[1] + r // 4), font, r / 40, ink, 2, cv2.LINE_AA)


def _pediment(
    rng: np.random.Generator, img: np.ndarray, c: Point, r: int, fill: Colour, ink: Colour
) -> None:
    """A triangular gable with a border."""
    tri = np.array([[c[0] - 2 * r, c[1] + r], [c[0] + 2 * r, c[1] + r], [c[0], c[1] - r]], np.int32)
    cv2.fillPoly(img, [tri], fill, cv2.LINE_AA)
    cv2.polylines(img, [tri], True, ink, 3, cv2.LINE_AA)


ORNAMENTS = (_rose, _clock, _sign, _pediment)


def _decorate(rng: np.random.Generator, img: np.ndarray, pal: Palette) -> None:
    """Draw one random ornament in place, at a random place and size, in palette colours."""
    h, w = img.shape[:2]
    c = (int(rng.uniform(0.15, 0.85) * w), int(rng.uniform(0.1, 0.8) * h))
    r = int(rng.uniform(0.06, 0.16) * min(h, w)) + 4
    fill, ink = pal[rng.integers(len(pal))].tolist(), pal[rng.integers(len(pal))].tolist()
    ORNAMENTS[rng.integers(len(ORNAMENTS))](rng, img, c, r, fill, ink)


@dataclass(frozen=True)
class Panel:
    """One textured rectangle of a scene: rect = (x0, y0, x1, y1) in scene pixels."""

    rect: tuple[int, int, int, int]
    family: str
    seed: int


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to redraw a landmark canvas: size (w, h), palette, panels, ornaments."""

    size: tuple[int, int]
    palette: tuple[tuple[float, float, float], ...]
    panels: tuple[Panel, ...]
    decor_seed: int
    n_decor: int


def _split_layout(
    rng: np.random.Generator, w: int, h: int, n: int
) -> list[tuple[int, int, int, int]]:
    """Guillotine-split the canvas into n rectangles, cutting big panels across their long side."""
    rects = [(0, 0, w, h)]
    while len(rects) < n:
        areas = np.array([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects], np.float64)
        x0, y0, x1, y1 = rects.pop(int(rng.choice(len(rects), p=areas / areas.sum())))
        t = rng.uniform(0.3, 0.7)
        if (x1 - x0 > y1 - y0) == (rng.random() < 0.75):  # mostly cut the long side
            xm = int(x0 + t * (x1 - x0))
            rects += [(x0, y0, xm, y1), (xm, y0, x1, y1)]
        else:
            ym = int(y0 + t * (y1 - y0))
            rects += [(x0, y0, x1, ym), (x0, ym, x1, y1)]
    return rects


def _random_family(rng: np.random.Generator) -> str:
    """Draw a texture family name with the landmark-like weights."""
    return str(rng.choice(list(TEXTURES), p=TEXTURE_WEIGHTS))


def random_scene(rng: np.random.Generator, long_side: int) -> SceneSpec:
    """Draw a new landmark: aspect, palette, panel layout, textures and ornaments."""
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))  # width / height
    w, h = (
        (long_side, round(long_side / aspect))
        if aspect >= 1
        else (round(long_side * aspect), long_side)
    )
    palette = tuple(tuple(c) for c in random_palette(rng).tolist())
    rects = _split_layout(rng, w, h, int(rng.integers(3, 7)))
    panels = tuple(Panel(r, _random_family(rng), int(rng.integers(2**31))) for r in rects)
    return SceneSpec((w, h), palette, panels, int(rng.integers(2**31)), int(rng.integers(1, 4)))


def lookalike_scene(
    spec: SceneSpec, rng: np.random.Generator, keep_family: float = 0.5
) -> SceneSpec:
    """Same layout and palette, every panel and ornament redrawn (half keep their family)."""
    panels = tuple(
        replace(
            p,
            seed=int(rng.integers(2**31)),
            family=p.family if rng.random() < keep_family else _random_family(rng),
        )
        for p in spec.panels
    )
    return replace(spec, panels=panels, decor_seed=int(rng.integers(2**31)))


def render_scene(spec: SceneSpec) -> np.ndarray:
    """Draw the canonical landmark canvas. -> (h, w, 3) uint8 BGR."""
    w, h = spec.size
    pal = np.asarray(spec.palette, np.float32)
    img = np.zeros((h, w, 3), np.uint8)
    for panel in spec.panels:
        rng = np.random.default_rng(panel.seed)
        x0, y0, x1, y1 = panel.rect
        shifted = np.roll(pal, int(rng.integers(len(pal))), axis=0)  # same colours, new roles
        img[y0:y1, x0:x1] = TEXTURES[panel.family](rng, y1 - y0, x1 - x0, shifted)
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), pal[int(np.argmin(pal.sum(1)))].tolist(), 2)
    rng = np.random.default_rng(spec.decor_seed)
    for _ in range(spec.n_decor):
        _decorate(rng, img, pal)
    return img
