"""Embedded synthetic landmark-retrieval benchmark, written in the real dataset formats.

`make_synthetic(root, seed=...)` draws planar "landmarks" (synthetic_scene), photographs them
with known homographies (synthetic_render), plans splits and labels (synthetic_plan) and writes,
atomically, under root:

* train/train_clean.csv (GLDv2-clean: `landmark_id,images`) and train/<a>/<b>/<c>/<id>.jpg;
* <test set>/gnd_<test set>.pkl (revisitop: imlist, qimlist, gnd with bbx/easy/hard/junk) and
  <test set>/jpg/<name>.jpg, for every name in `test_sets` (landmarks disjoint from training);
* <split>/homographies.json (canvas -> view H, image size, scene of every image) and manifest.json.

Labels come from exact geometry (synthetic_geometry). Same seed and settings: identical bytes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from retrieval.data.synthetic_geometry import (
    Size,
    ViewGeometry,
    overlap_fraction,
    relative_homography,
    true_overlapping_pairs,
    viewpoint_change,
)
from retrieval.data.synthetic_plan import (
    SplitPlan,
    SyntheticSettings,
    View,
    ground_truth,
    plan_test,
    plan_train,
    stream_rng,
)
from retrieval.data.synthetic_render import make_clutter_pool, render_view, scene_pyramid
from retrieval.data.synthetic_scene import render_scene
from retrieval.data.synthetic_textures import sample_photos

# public API; the geometry helpers are re-exported for pair selection and verification tests
__all__ = [
    "SyntheticSettings",
    "ViewGeometry",
    "make_synthetic",
    "overlap_fraction",
    "read_geometry",
    "read_manifest",
    "relative_homography",
    "true_overlapping_pairs",
    "viewpoint_change",
]

# bump whenever the generated files change, so an old dataset is not silently reused
GENERATOR_VERSION = 1
POOL_SIZE = 24  # clutter textures per split


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    """Write one JPEG, creating folders; fail loudly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"cv2 could not write {path}")


def render_split(
    plan: SplitPlan, paths: dict[str, Path], s: SyntheticSettings, split: str, progress: bool
) -> None:
    """Render every view and query of a split (scene by scene) to paths[name]."""
    pool = make_clutter_pool(stream_rng(s.seed, split, 0), POOL_SIZE, s.image_size)
    groups: dict[str | None, list[View]] = {}
    for v in plan.views + plan.queries:
        groups.setdefault(v.scene, []).append(v)
    for key, views in tqdm(groups.items(), desc=f"render {split}", disable=not progress):
        pyramid = scene_pyramid(render_scene(plan.scenes[key])) if key is not None else None
        for v in views:
            img = render_view(pyramid, v.H, v.size, np.random.default_rng(v.seed), pool, v.severe)
            _write_jpeg(paths[v.name], img, s.jpeg_quality)


def _geometry_record(plan: SplitPlan) -> dict[str, Any]:
    """Content of homographies.json: scenes (size, kind, ...) and images (scene, H, size, ...)."""
    scenes = {key: {"size": list(spec.size), **plan.info[key]} for key, spec in plan.scenes.items()}
    images = {}
    for role, views in (("db", plan.views), ("query", plan.queries)):
        for v in views:
            images[v.name] = {
                "scene": v.scene,
                "H": None if v.H is None else v.H.tolist(),
                "size": list(v.size),
                "severe": v.severe,
                "role": role,
                "landmark_id": plan.info[v.scene]["landmark_id"] if v.scene else None,
            }
    for v, box in zip(plan.queries, plan.boxes, strict=True):
        images[v.name]["bbx"] = box
    return {"scenes": scenes, "images": images}


def _write_json(path: Path, obj: Any) -> None:
    """Deterministic, readable JSON."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def write_train(root: Path, s: SyntheticSettings, progress: bool) -> dict[str, int]:
    """GLDv2-clean style training split. -> counts."""
    plan, split_dir = plan_train(s), root / "train"
    paths = {
        v.name: split_dir / v.name[0] / v.name[1] / v.name[2] / f"{v.name}.jpg" for v in plan.views
    }
    render_split(plan, paths, s, "train", progress)
    rows = [
        f"{plan.info[key]['landmark_id']},{' '.join(v.name for v in plan.views if v.scene == key)}"
        for key in plan.scenes
    ]
    (split_dir / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(rows) + "\n")
    _write_json(split_dir / "homographies.json", _geometry_record(plan))
    return {"images": len(plan.views), "landmarks": len(plan.scenes)}


def write_test(root: Path, s: SyntheticSettings, name: str, progress: bool) -> dict[str, int]:
    """revisitop style test split `name`. -> counts."""
    plan, split_dir = plan_test(s, name), root / name
    gnd = {
        "gnd": ground_truth(plan),
        "imlist": [v.name for v in plan.views],
        "qimlist": [v.name for v in plan.queries],
    }
    paths = {v.name: split_dir / "jpg" / f"{v.name}.jpg" for v in plan.views + plan.queries}
    render_split(plan, paths, s, name, progress)
    with open(split_dir / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(gnd, f, protocol=3)  # the protocol of the official revisitop files
    _write_json(split_dir / "homographies.json", _geometry_record(plan))
    return {
        "db": len(plan.views),
        "queries": len(plan.queries),
        **{k: sum(len(g[k]) for g in gnd["gnd"]) for k in ("easy", "hard", "junk")},
    }


def _identity(s: SyntheticSettings) -> dict[str, Any]:
    """What must match for an existing dataset to be reused: version, settings, photo sources."""
    return {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "settings": json.loads(json.dumps(asdict(s))),
        "photo_sources": [name for name, _ in sample_photos()],
    }


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """manifest.json of a generated dataset, or None when there is none."""
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 only probes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scratch_dir(root: Path, kind: str) -> Path:
    """A fresh hidden sibling of root owned by this process; stale ones of dead runs are removed."""
    for stale in root.parent.glob(f".{root.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = root.parent / f".{root.name}.{kind}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def _publish(tmp: Path, root: Path) -> None:
    """Move a finished dataset into place, replacing an older one only after it is complete."""
    if root.exists():
        old = _scratch_dir(root, "old")
        root.rename(old / root.name)
        tmp.rename(root)
        shutil.rmtree(old)
    else:
        tmp.rename(root)


def make_synthetic(
    root: str | Path, *, overwrite: bool = False, progress: bool = True, **settings: Any
) -> dict:
    """Generate the benchmark under root (keywords: SyntheticSettings fields). -> manifest dict.

    A no-op when root holds a complete dataset with the same settings. Everything is written into
    a hidden sibling folder (.<root>.partial-<pid>) that replaces root only once complete: a failed
    or killed run leaves no half dataset, and the next run removes its leftovers.
    """
    known = {f.name for f in fields(SyntheticSettings)}
    if unknown := sorted(set(settings) - known):
        raise TypeError(
            f"make_synthetic: unknown setting(s) {unknown}; expected some of {sorted(known)}"
        )
    s, root = SyntheticSettings(**settings), Path(root)
    identity, existing = _identity(s), read_manifest(root)
    if existing is not None and all(existing.get(k) == v for k, v in identity.items()):
        return existing
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root} holds other data (manifest missing or settings differ); pass overwrite=True"
        )
    tmp = _scratch_dir(root, "partial")
    try:
        counts = {"train": write_train(tmp, s, progress)}
        counts.update({name: write_test(tmp, s, name, progress) for name in s.test_sets})
        manifest = {**identity, "counts": counts}
        _write_json(tmp / "manifest.json", manifest)
        _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_geometry(split_dir: str | Path) -> tuple[dict[str, ViewGeometry], dict[str, Size]]:
    """Load <split>/homographies.json. -> (image name -> ViewGeometry, scene key -> canvas size)."""
    record = json.loads((Path(split_dir) / "homographies.json").read_text())
    scenes = {key: tuple(info["size"]) for key, info in record["scenes"].items()}
    views = {
        name: ViewGeometry(im["scene"], np.array(im["H"]), tuple(im["size"]))
        for name, im in record["images"].items()
        if im["scene"] is not None
    }
    return views, scenes
