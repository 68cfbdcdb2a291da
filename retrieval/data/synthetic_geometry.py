"""Exact geometric ground truth for the synthetic benchmark, from canvas -> view homographies.

Every view of a landmark sees a convex region of its planar canvas. Overlaps are areas of polygon
intersections in canvas coordinates; the viewpoint change between two views is read from the local
affine part (Jacobian) of the view-to-view homography. `label_view` turns both into revisitop
easy / hard / junk labels, `true_overlapping_pairs` gives positive pairs for pair-based training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from retrieval.data.synthetic_render import homography_jacobian, warp_points

EASY_OVERLAP = 0.6  # easy: at least this fraction of the query region is in view...
MILD_SCALE, MILD_ROTATION, MILD_ANISOTROPY = 1.5, 20.0, 1.35  # ...and the viewpoint change is mild
JUNK_OVERLAP = 0.2  # junk: less than this fraction of the query region is in view
MIN_VISIBLE_AREA = 0.02  # junk: the shared region covers less than this fraction of the db image

Size = tuple[int, int]  # (width, height) in pixels


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Corners of an axis-aligned box, counter-clockwise in image axes. -> (4, 2)."""
    return np.array([[x0, y0], [x0, y1], [x1, y1], [x1, y0]], np.float64)


def _signed_area(poly: np.ndarray) -> float:
    """Shoelace signed area (0 for fewer than 3 vertices)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(x @ np.roll(y, -1) - y @ np.roll(x, -1))


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon given as (N, 2) vertices."""
    return abs(_signed_area(poly))


def clip_polygon(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman intersection of a polygon with a convex polygon (either orientation)."""
    if len(clip) < 3:  # an empty (degenerate) clip region keeps nothing
        return np.zeros((0, 2))
    orientation = 1.0 if _signed_area(clip) >= 0 else -1.0
    out = [np.asarray(p, np.float64) for p in subject]
    for a, b in zip(clip, np.roll(clip, -1, axis=0), strict=True):
        if not out:
            break
        edge = b - a
        side = [orientation * (edge[0] * (p[1] - a[1]) - edge[1] * (p[0] - a[0])) for p in out]
        inp, out = out, []
        for i, (p, sp) in enumerate(zip(inp, side, strict=True)):
            q, sq = inp[(i + 1) % len(inp)], side[(i + 1) % len(inp)]
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                out.append(p + (q - p) * (sp / (sp - sq)))
    return np.array(out, np.float64).reshape(-1, 2)


def visible_region(
    H: np.ndarray, view_size: Size, scene_size: Size, box: Sequence[float] | None = None
) -> np.ndarray:
    """Canvas polygon (M, 2) seen by a view, inside `box` = (x1, y1, x2, y2) when given."""
    outline = warp_points(H, rect_polygon(0, 0, *scene_size))  # the canvas as seen in the view
    window = rect_polygon(*(box if box is not None else (0, 0, *view_size)))
    seen = clip_polygon(outline, window)
    return warp_points(np.linalg.inv(H), seen) if len(seen) >= 3 else np.zeros((0, 2))


def overlap_fraction(
    H_a: np.ndarray,
    H_b: np.ndarray,
    size_a: Size,
    size_b: Size,
    scene_size: Size,
    box_a: Sequence[float] | None = None,
) -> float:
    """Fraction of the canvas region seen by view a (inside box_a) that view b also sees."""
    region_a = visible_region(H_a, size_a, scene_size, box_a)
    area_a = polygon_area(region_a)
    if area_a == 0:
        return 0.0
    return polygon_area(clip_polygon(region_a, visible_region(H_b, size_b, scene_size))) / area_a


def relative_homography(H_a: np.ndarray, H_b: np.ndarray) -> np.ndarray:
    """Homography from view a pixels to view b pixels: H_b @ inv(H_a), scaled to H[2, 2] = 1."""
    h = H_b @ np.linalg.inv(H_a)
    return h / h[2, 2]


@dataclass(frozen=True)
class ViewChange:
    """Local change from view a to view b: scale ratio, rotation (degrees), anisotropy."""

    scale: float
    rotation: float
    anisotropy: float

    def is_mild(self) -> bool:
        """True when all three stay within the easy-label limits."""
        return (
            self.scale <= MILD_SCALE
            and self.rotation <= MILD_ROTATION
            and self.anisotropy <= MILD_ANISOTROPY
        )


def viewpoint_change(H_a: np.ndarray, H_b: np.ndarray, point_a: np.ndarray) -> ViewChange:
    """Viewpoint change around a pixel of view a, from the SVD of the a -> b Jacobian."""
    jac = homography_jacobian(relative_homography(H_a, H_b), point_a)
    u, s, vt = np.linalg.svd(jac)
    rot = u @ vt
    zoom = float(np.sqrt(s[0] * s[1]))
    angle = abs(float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0]))))
    return ViewChange(max(zoom, 1 / zoom), angle, float(s[0] / s[1]))


def label_view(
    H_q: np.ndarray,
    size_q: Size,
    box_q: Sequence[float],
    H_b: np.ndarray,
    size_b: Size,
    scene_size: Size,
    severe: bool = False,
) -> str:
    """revisitop label of a database view of the query's landmark: 'easy', 'hard' or 'junk'.

    * junk: under JUNK_OVERLAP of the query region in view, or a sliver (< MIN_VISIBLE_AREA of
      the db image), also views that miss it entirely (same-landmark images are never negatives);
    * easy: at least EASY_OVERLAP in view, a mild viewpoint change, no severe photometric change;
    * hard: everything else.
    """
    query_region = visible_region(H_q, size_q, scene_size, box_q)
    shared = clip_polygon(query_region, visible_region(H_b, size_b, scene_size))
    overlap = polygon_area(shared) / max(polygon_area(query_region), 1e-9)
    if overlap < JUNK_OVERLAP or len(shared) < 3:
        return "junk"
    if polygon_area(warp_points(H_b, shared)) < MIN_VISIBLE_AREA * size_b[0] * size_b[1]:
        return "junk"
    change = viewpoint_change(H_q, H_b, warp_points(H_q, shared.mean(0, keepdims=True))[0])
    return "easy" if overlap >= EASY_OVERLAP and change.is_mild() and not severe else "hard"


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view comes from: its scene key, canvas -> view homography and image size (w, h)."""

    scene: str
    H: np.ndarray
    size: Size


def true_overlapping_pairs(
    views: Mapping[str, ViewGeometry], scene_sizes: Mapping[str, Size], threshold: float = 0.5
) -> list[tuple[str, str, float]]:
    """Pairs (a, b, overlap) of views of one scene sharing more than `threshold` of a region.

    overlap = area(region_a & region_b) / min(area_a, area_b): a close-up inside a wide view counts.
    """
    by_scene: dict[str, list[str]] = {}
    for name, view in sorted(views.items()):
        by_scene.setdefault(view.scene, []).append(name)
    pairs = []
    for scene, names in by_scene.items():
        regions = {n: visible_region(views[n].H, views[n].size, scene_sizes[scene]) for n in names}
        for a, b in combinations(names, 2):
            smaller = min(polygon_area(regions[a]), polygon_area(regions[b]))
            shared = polygon_area(clip_polygon(regions[a], regions[b])) / max(smaller, 1e-9)
            if shared > threshold:
                pairs.append((a, b, shared))
    return pairs
