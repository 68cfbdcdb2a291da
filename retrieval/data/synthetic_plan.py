"""Planning of the synthetic benchmark: the scenes and cameras of each split, and its ground truth.

A plan is pure data (scene specs, homographies, render seeds, names); synthetic.py renders and
writes it. Every scene and view draws from its own (seed, split, purpose, index) generator, so
changing one count never changes the other scenes or views.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from retrieval.data.synthetic_geometry import (
    Size,
    clip_polygon,
    label_view,
    polygon_area,
    rect_polygon,
)
from retrieval.data.synthetic_render import (
    SEVERE_PROBABILITY,
    sample_view,
    sample_view_size,
    warp_points,
)
from retrieval.data.synthetic_scene import SceneSpec, lookalike_scene, random_scene

# training landmark ids are sparse ints in GLDv2's id range, like the real list
GLDV2_NUM_LABELS = 203094
# canvas long side / image long side: zoomed-in views stay at about 1 canvas px per image px
SCENE_SCALE = 1.5
DISTRACTOR_VIEWS = 4  # views per distractor scene
CLUTTER_ONLY_FRACTION = 0.05  # distractor images without any scene
MIN_QUERY_AREA = 0.15  # the query box covers at least this fraction of the query image
# camera kinds (synthetic_render.VIEW_RANGES) of database and training views, with probabilities
DB_MODES = {"mild": 0.35, "strong": 0.45, "partial": 0.2}


@dataclass(frozen=True)
class SyntheticSettings:
    """Every knob that changes the generated files (all recorded in manifest.json)."""

    seed: int = field(default=0, metadata={"help": "master seed"})
    n_train_landmarks: int = field(default=200, metadata={"help": "training landmarks (classes)"})
    views_per_landmark: int = field(default=8, metadata={"help": "training images per landmark"})
    image_size: int = field(default=256, metadata={"help": "long side of every image (px)"})
    n_test_landmarks: int = field(default=10, metadata={"help": "query landmarks per test set"})
    n_test_queries: int = field(default=20, metadata={"help": "queries per test set"})
    n_test_db: int = field(default=500, metadata={"help": "database images per test set"})
    test_views_per_landmark: int = field(
        default=16, metadata={"help": "database views per query landmark"}
    )
    lookalike_fraction: float = field(
        default=0.15, metadata={"help": "training landmarks that mimic another"}
    )
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality of every image"})
    test_sets: tuple[str, ...] = field(
        default=("synth_oxf", "synth_par"), metadata={"help": "test set names"}
    )

    def __post_init__(self) -> None:
        """Reject values the generator cannot honour, naming the setting."""
        for f in fields(self):
            value, minimum = getattr(self, f.name), 0 if f.name == "seed" else 1
            if isinstance(value, int) and value < minimum:
                raise ValueError(
                    f"synthetic setting {f.name}={value}: expected an int >= {minimum}"
                )
        if not 0 <= self.lookalike_fraction <= 1:
            raise ValueError(f"lookalike_fraction={self.lookalike_fraction}: expected 0..1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: expected 1..100")
        names = list(self.test_sets)
        valid = all(n.isidentifier() and n != "train" for n in names)
        if len(set(names)) != len(names) or not valid:
            raise ValueError(f"synthetic setting test_sets={names}: expected distinct identifiers")


@dataclass(frozen=True)
class View:
    """One image to render: its scene (None = clutter only), canvas -> view H, size (w, h), seed."""

    name: str
    scene: str | None
    H: np.ndarray | None
    size: Size
    seed: int
    severe: bool


@dataclass
class SplitPlan:
    """Scenes and images of one split, before rendering (no queries or boxes for training)."""

    scenes: dict[str, SceneSpec]
    info: dict[str, dict[str, Any]]
    views: list[View]
    queries: list[View] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)


def stream_rng(seed: int, split: str, *keys: int) -> np.random.Generator:
    """Independent generator per (seed, split, purpose, index): counts never shift other streams."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), *keys])


def _draw_view(
    rng: np.random.Generator,
    name: str,
    scene: str,
    spec: SceneSpec,
    s: SyntheticSettings,
    mode: str,
    center: np.ndarray | None = None,
) -> View:
    """Draw a camera, a severe-change flag and a render seed for one view of a scene."""
    H, size = sample_view(rng, spec.size, s.image_size, mode, center)
    return View(
        name, scene, H, size, int(rng.integers(2**63)), bool(rng.random() < SEVERE_PROBABILITY)
    )


def _db_mode(rng: np.random.Generator) -> str:
    """Camera kind of a database or training view, drawn with the DB_MODES probabilities."""
    return str(rng.choice(list(DB_MODES), p=list(DB_MODES.values())))


def plan_train(s: SyntheticSettings) -> SplitPlan:
    """Training landmarks (some mimic earlier ones), GLDv2-like sparse labels and hex image ids."""
    ids = np.sort(
        stream_rng(s.seed, "train", 0).choice(GLDV2_NUM_LABELS, s.n_train_landmarks, replace=False)
    )
    plan, long_side = SplitPlan({}, {}, []), round(SCENE_SCALE * s.image_size)
    for k, landmark_id in enumerate(ids.tolist()):
        rng, key = stream_rng(s.seed, "train", 1, k), str(landmark_id)
        of = str(ids[rng.integers(k)]) if k > 0 and rng.random() < s.lookalike_fraction else None
        plan.scenes[key] = (
            lookalike_scene(plan.scenes[of], rng) if of else random_scene(rng, long_side)
        )
        plan.info[key] = {
            "kind": "lookalike" if of else "landmark",
            "lookalike_of": of,
            "landmark_id": landmark_id,
        }
        for v in range(s.views_per_landmark):
            vrng = stream_rng(s.seed, "train", 2, k, v)
            plan.views.append(
                _draw_view(vrng, vrng.bytes(8).hex(), key, plan.scenes[key], s, _db_mode(vrng))
            )
    if len({v.name for v in plan.views}) != len(plan.views):
        raise RuntimeError(f"image id collision for seed {s.seed}; pick another seed")
    return plan


def _query_box(
    rng: np.random.Generator, H: np.ndarray, size: Size, scene_size: Size
) -> tuple[list[float], np.ndarray]:
    """Box around a random landmark part seen by the query. -> ([x1, y1, x2, y2], part centre)."""
    sw, sh = scene_size
    for _ in range(100):
        fw, fh = rng.uniform(0.45, 1.0, 2)
        x0, y0 = rng.uniform(0, 1 - fw) * sw, rng.uniform(0, 1 - fh) * sh
        part = rect_polygon(x0, y0, x0 + fw * sw, y0 + fh * sh)
        seen = clip_polygon(warp_points(H, part), rect_polygon(0, 0, *size))
        if polygon_area(seen) >= MIN_QUERY_AREA * size[0] * size[1]:
            lo, hi = np.floor(seen.min(0) * 10) / 10, np.ceil(seen.max(0) * 10) / 10
            box = [
                max(lo[0], 0.0),
                max(lo[1], 0.0),
                min(hi[0], float(size[0])),
                min(hi[1], float(size[1])),
            ]
            return [float(b) for b in box], part.mean(0)
    raise RuntimeError(f"no query box covers {MIN_QUERY_AREA} of a {size} query image")


def _plan_queries(s: SyntheticSettings, name: str, plan: SplitPlan, keys: list[str]) -> list[View]:
    """Queries (landmarks in turn) with boxes, plus one mild database companion per query."""
    companions = []
    for q in range(s.n_test_queries):
        rng, key = stream_rng(s.seed, name, 3, q), keys[q % len(keys)]
        plan.queries.append(_draw_view(rng, "", key, plan.scenes[key], s, "query"))
        box, part_center = _query_box(
            rng, plan.queries[-1].H, plan.queries[-1].size, plan.scenes[key].size
        )
        plan.boxes.append(box)
        companions.append(_draw_view(rng, "", key, plan.scenes[key], s, "mild", part_center))
    return companions


def _plan_distractors(
    s: SyntheticSettings, name: str, plan: SplitPlan, keys: list[str], n: int
) -> list[View]:
    """n distractor images: look-alikes of the query landmarks, unrelated scenes, pure clutter."""
    n_clutter = round(CLUTTER_ONLY_FRACTION * n)
    rngs = [stream_rng(s.seed, name, 6, i) for i in range(n_clutter)]
    views = [
        View("", None, None, sample_view_size(r, s.image_size), int(r.integers(2**63)), False)
        for r in rngs
    ]
    for j in range((n - n_clutter + DISTRACTOR_VIEWS - 1) // DISTRACTOR_VIEWS):
        rng = stream_rng(s.seed, name, 5, j)
        key = f"lookalike{j:03d}" if j < len(keys) else f"general{j:03d}"
        of = keys[j] if j < len(keys) else None
        plan.scenes[key] = (
            lookalike_scene(plan.scenes[of], rng)
            if of
            else random_scene(rng, round(SCENE_SCALE * s.image_size))
        )
        plan.info[key] = {
            "kind": "lookalike" if of else "distractor",
            "lookalike_of": of,
            "landmark_id": None,
        }
        count = min(DISTRACTOR_VIEWS, n - len(views))
        views += [
            _draw_view(rng, "", key, plan.scenes[key], s, _db_mode(rng)) for _ in range(count)
        ]
    return views


def _name_images(rng: np.random.Generator, plan: SplitPlan) -> None:
    """Shuffle the database; name images <landmark>_<number> or general_<number> like revisitop."""
    order = rng.permutation(len(plan.views))
    plan.views = [plan.views[i] for i in order]
    numbers = rng.permutation(len(plan.views) + len(plan.queries))
    prefix = {
        key: key if info["kind"] == "landmark" else "general" for key, info in plan.info.items()
    }
    rename = [
        replace(v, name=f"{prefix.get(v.scene, 'general')}_{n:06d}")
        for v, n in zip(plan.views + plan.queries, numbers, strict=True)
    ]
    plan.views, plan.queries = rename[: len(plan.views)], rename[len(plan.views) :]


def plan_test(s: SyntheticSettings, name: str) -> SplitPlan:
    """A revisitop-style test set: query landmarks, their database views, and distractors."""
    keys = [f"lm{k:02d}" for k in range(s.n_test_landmarks)]
    plan = SplitPlan({}, {}, [])
    for k, key in enumerate(keys):
        plan.scenes[key] = random_scene(
            stream_rng(s.seed, name, 1, k), round(SCENE_SCALE * s.image_size)
        )
        plan.info[key] = {"kind": "landmark", "lookalike_of": None, "landmark_id": None}
    plan.views = _plan_queries(s, name, plan, keys)
    for k, key in enumerate(keys):
        n_more = s.test_views_per_landmark - sum(v.scene == key for v in plan.views)
        rngs = [stream_rng(s.seed, name, 4, k, v) for v in range(max(n_more, 0))]
        plan.views += [_draw_view(r, "", key, plan.scenes[key], s, _db_mode(r)) for r in rngs]
    n_distractors = s.n_test_db - len(plan.views)
    if n_distractors < 0:
        raise ValueError(
            f"n_test_db={s.n_test_db} < {len(plan.views)} landmark views "
            f"(n_test_landmarks x test_views_per_landmark, at least one per query)"
        )
    plan.views += _plan_distractors(s, name, plan, keys, n_distractors)
    _name_images(stream_rng(s.seed, name, 7), plan)
    return plan


def ground_truth(plan: SplitPlan) -> list[dict[str, Any]]:
    """revisitop gnd entries (bbx, easy, hard, junk) from the exact geometry of query/db pairs."""
    gnd = []
    for query, box in zip(plan.queries, plan.boxes, strict=True):
        labels: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        scene_size = plan.scenes[query.scene].size
        for i, v in enumerate(plan.views):
            if v.scene == query.scene:
                labels[
                    label_view(query.H, query.size, box, v.H, v.size, scene_size, v.severe)
                ].append(i)
        if not labels["easy"] + labels["hard"]:
            raise RuntimeError(
                f"query {query.name} has no positive; change the seed or the view settings"
            )
        gnd.append({"bbx": list(box), **labels})
    return gnd
