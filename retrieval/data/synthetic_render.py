"""Camera views of synthetic landmarks: known homographies, clutter, occluders, photometric change.

A view is a pinhole camera looking at the planar landmark canvas: the canvas is tilted about its
centre (yaw, pitch), zoomed, rolled and translated so that a chosen scene point lands at the image
centre. The 3x3 canvas -> view homography is returned with every view, so ground truth (overlap,
viewpoint change, point correspondences) is exact. Outside the landmark the view shows a sky and
other random buildings; occluders and photometric jitter are drawn after the warp.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from retrieval.data.synthetic_textures import TEXTURES, random_palette

FILL = 0.75  # at scale 1 the canvas long side spans this fraction of the view long side
CAMERA_DISTANCE = 1.5  # camera distance to the canvas centre, in canvas long sides
SEVERE_PROBABILITY = 0.15  # views with night, strong blur or a colour cast
VIEW_ASPECTS = ((4 / 3, 0.6), (3 / 4, 0.25), (1.0, 0.15))  # (width / height, probability)
# severe changes: (BGR gain multipliers, gamma factor, minimum blur sigma) for night, blur, sunset
SEVERE_CHANGES = (
    ((0.35, 0.35, 0.35), 1.5, 0.0),
    ((1, 1, 1), 1.0, 2.4),
    ((0.6, 0.9, 1.35), 1.0, 0.0),
)
SKIES = (
    (235, 206, 135),
    (200, 200, 200),
    (120, 170, 240),
    (90, 60, 40),
)  # BGR: blue, grey, dusk, night


@dataclass(frozen=True)
class ViewRange:
    """Ranges of a camera kind: log-uniform scale, +-degrees, +-centre offset (canvas fraction)."""

    scale: tuple[float, float]
    yaw: float
    pitch: float
    roll: float
    center: float


VIEW_RANGES = {
    "query": ViewRange((0.8, 1.3), 15, 10, 4, 0.08),
    "mild": ViewRange((0.75, 1.33), 20, 12, 6, 0.15),
    "strong": ViewRange((0.5, 2.0), 55, 35, 20, 0.4),
    "partial": ViewRange((1.4, 2.5), 30, 20, 10, 0.5),  # close-ups, often of a border region
}


def _translation(tx: float, ty: float) -> np.ndarray:
    """3x3 translation matrix."""
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def warp_points(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a homography to points. (N, 2) -> (N, 2)."""
    p = np.asarray(pts, np.float64) @ H[:, :2].T + H[:, 2]  # (N, 3)
    return p[:, :2] / p[:, 2:]


def homography_jacobian(H: np.ndarray, pt: np.ndarray) -> np.ndarray:
    """2x2 Jacobian of the homography at a point: the local affine approximation."""
    x = np.asarray(pt, np.float64)
    w = H[2, :2] @ x + H[2, 2]
    mapped = warp_points(H, x[None])[0]
    return (H[:2, :2] - np.outer(mapped, H[2, :2])) / w


def view_homography(
    scene_size: tuple[int, int],
    view_size: tuple[int, int],
    center: np.ndarray,
    scale: float,
    yaw: float,
    pitch: float,
    roll: float,
) -> np.ndarray:
    """Canvas -> view homography of a camera tilted by yaw/pitch, rolled, zoomed, aimed at center.

    Angles are in degrees; `center` (canvas pixels) lands on the view centre; scale 1 makes the
    canvas long side FILL times the view long side.
    """
    a, b, c = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = ry @ rx
    depth = CAMERA_DISTANCE * max(scene_size)
    # plane z=0 rotated by r, moved to depth, projected with focal length = depth
    tilt = np.array(
        [[r[0, 0], r[0, 1], 0], [r[1, 0], r[1, 1], 0], [r[2, 0] / depth, r[2, 1] / depth, 1]]
    )
    zoom = scale * FILL * max(view_size) / max(scene_size)
    spin = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    h0 = (
        np.diag([zoom, zoom, 1.0])
        @ spin
        @ tilt
        @ _translation(-scene_size[0] / 2, -scene_size[1] / 2)
    )
    aim = warp_points(h0, np.asarray(center, np.float64)[None])[0]
    h = _translation(view_size[0] / 2 - aim[0], view_size[1] / 2 - aim[1]) @ h0
    return h / h[2, 2]


def sample_view_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """Landscape, portrait or square photo with the given long side. -> (w, h)."""
    ratios, probs = zip(*VIEW_ASPECTS, strict=True)
    ratio = ratios[int(rng.choice(len(ratios), p=probs))]
    return (
        (image_size, round(image_size / ratio))
        if ratio >= 1
        else (round(image_size * ratio), image_size)
    )


def sample_view(
    rng: np.random.Generator,
    scene_size: tuple[int, int],
    image_size: int,
    mode: str,
    center: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Draw a camera of a VIEW_RANGES mode. -> (canvas -> view H, view size (w, h))."""
    if mode not in VIEW_RANGES:
        raise ValueError(f"unknown view mode {mode!r}; expected one of {sorted(VIEW_RANGES)}")
    r = VIEW_RANGES[mode]
    view_size = sample_view_size(rng, image_size)
    if center is None:
        center = np.asarray(scene_size) * (0.5 + rng.uniform(-r.center, r.center, 2))
    scale = float(np.exp(rng.uniform(*np.log(r.scale))))
    yaw, pitch, roll = rng.uniform(-1, 1, 3) * (r.yaw, r.pitch, r.roll)
    return view_homography(scene_size, view_size, center, scale, yaw, pitch, roll), view_size


def make_clutter_pool(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Random non-landmark textures (buildings, trees, cars) for backgrounds and occluders."""
    names = list(TEXTURES)
    return [
        TEXTURES[names[rng.integers(len(names))]](rng, size, size, random_palette(rng))
        for _ in range(n)
    ]


def _pool_crop(rng: np.random.Generator, pool: list[np.ndarray], w: int, h: int) -> np.ndarray:
    """Random (h, w) crop of a random pool texture, randomly flipped."""
    tex = pool[int(rng.integers(len(pool)))]
    y, x = int(rng.integers(0, tex.shape[0] - h + 1)), int(rng.integers(0, tex.shape[1] - w + 1))
    crop = tex[y : y + h, x : x + w]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def render_background(
    rng: np.random.Generator, pool: list[np.ndarray], w: int, h: int
) -> np.ndarray:
    """A sky gradient with a few unrelated buildings on the bottom edge. -> (h, w, 3) uint8."""
    sky = np.asarray(SKIES[int(rng.integers(len(SKIES)))], np.float32) + rng.normal(0, 15, 3)
    ramp = np.linspace(0.75, 1.15, h, dtype=np.float32)[:, None, None]
    img = np.clip(np.broadcast_to(sky * ramp, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        bw, bh = int(w * rng.uniform(0.15, 0.5)), int(h * rng.uniform(0.2, 0.8))
        x = int(rng.integers(0, w - bw + 1))
        img[h - bh :, x : x + bw] = _pool_crop(rng, pool, bw, bh)
    return img


def add_occluders(
    rng: np.random.Generator, img: np.ndarray, pool: list[np.ndarray], n_max: int = 3
) -> None:
    """Paint 0..n_max textured blobs or boxes (trees, people, cars) in place, 2-8% of the image."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, n_max + 1))):
        mask = np.zeros((h, w), np.uint8)
        side = np.sqrt(rng.uniform(0.02, 0.08) * h * w)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        ax = (int(side * rng.uniform(0.4, 0.8)), int(side * rng.uniform(0.4, 0.8)))
        if rng.random() < 0.5:
            cv2.ellipse(mask, (cx, cy), ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            cv2.rectangle(mask, (cx - ax[0], cy - ax[1]), (cx + ax[0], cy + ax[1]), 1, -1)
        img[mask > 0] = _pool_crop(rng, pool, w, h)[mask > 0]


def photometric(rng: np.random.Generator, img: np.ndarray, severe: bool) -> np.ndarray:
    """Exposure, white balance, gamma, blur, noise; `severe` adds night, heavy blur or sunset."""
    gains = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.75, 1.25)
    gamma, sigma = rng.uniform(0.8, 1.25), rng.choice([0.0, rng.uniform(0.3, 1.0)])
    if severe:
        multipliers, gamma_factor, blur = SEVERE_CHANGES[int(rng.integers(len(SEVERE_CHANGES)))]
        gains, gamma, sigma = gains * multipliers, gamma * gamma_factor, max(sigma, blur)
    curve = ((np.arange(256) / 255.0) ** gamma * 255).astype(np.float32)  # gamma as a lookup table
    out = curve[img] * gains.astype(np.float32)
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out += rng.standard_normal(out.shape, dtype=np.float32) * 3.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def scene_pyramid(scene: np.ndarray, levels: int = 4) -> list[np.ndarray]:
    """Gaussian pyramid of the canvas, so zoomed-out views are rendered without aliasing."""
    pyramid = [scene]
    for _ in range(levels - 1):
        pyramid.append(cv2.pyrDown(pyramid[-1]))
    return pyramid


def warp_scene(
    pyramid: list[np.ndarray], H: np.ndarray, view_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the canvas from the pyramid level matching the zoom. -> (image, alpha (h, w, 1))."""
    h, w = pyramid[0].shape[:2]
    zoom = np.sqrt(abs(np.linalg.det(homography_jacobian(H, np.array([w / 2, h / 2])))))
    level = int(np.clip(np.floor(np.log2(1 / zoom)), 0, len(pyramid) - 1))
    h_level = H @ np.diag(
        [2.0**level, 2.0**level, 1.0]
    )  # level pixel i sits at canvas pixel 2^level * i
    src = pyramid[level]
    image = cv2.warpPerspective(src, h_level, view_size, flags=cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(
        np.ones(src.shape[:2], np.float32), h_level, view_size, flags=cv2.INTER_LINEAR
    )
    return image, alpha[..., None]


def render_view(
    pyramid: list[np.ndarray] | None,
    H: np.ndarray | None,
    view_size: tuple[int, int],
    rng: np.random.Generator,
    pool: list[np.ndarray],
    severe: bool,
) -> np.ndarray:
    """Render a photo: background, warped landmark (none if pyramid is None), occluders, jitter."""
    w, h = view_size
    img = render_background(rng, pool, w, h)
    if pyramid is not None:
        scene, alpha = warp_scene(pyramid, H, view_size)
        img = (scene * alpha + img * (1 - alpha) + 0.5).astype(np.uint8)
    add_occluders(rng, img, pool)
    return photometric(rng, img, severe)
