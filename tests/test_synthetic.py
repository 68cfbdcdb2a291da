"""Tests of the synthetic benchmark: determinism, formats, ground truth, geometry, atomicity."""

from __future__ import annotations

import csv
import importlib.util
import json
import pickle
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from retrieval.data import synthetic
from retrieval.data.synthetic import make_synthetic, read_geometry, read_manifest
from retrieval.data.synthetic_geometry import (
    ViewGeometry,
    clip_polygon,
    label_view,
    overlap_fraction,
    polygon_area,
    relative_homography,
    true_overlapping_pairs,
    viewpoint_change,
    visible_region,
)
from retrieval.data.synthetic_plan import SyntheticSettings, plan_train
from retrieval.data.synthetic_render import (
    VIEW_RANGES,
    sample_view,
    scene_pyramid,
    warp_points,
    warp_scene,
)
from retrieval.data.synthetic_scene import render_scene

TINY = dict(
    seed=3, n_train_landmarks=4, views_per_landmark=3, image_size=96, n_test_landmarks=2,
    n_test_queries=3, n_test_db=30, test_views_per_landmark=8, test_sets=("synth_oxf", "synth_par"),
)  # fmt: skip
TEST_SETS = TINY["test_sets"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny generated dataset shared by the read-only tests."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, progress=False, **TINY)
    return root


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _similarity(scale: float, degrees: float, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    c, s = scale * np.cos(np.radians(degrees)), scale * np.sin(np.radians(degrees))
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]], np.float64)


def test_same_seed_same_bytes_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path / "again", progress=False, **TINY)
    assert _files(tmp_path / "again") == _files(tiny)
    make_synthetic(tmp_path / "other", progress=False, **{**TINY, "seed": 4})
    other = _files(tmp_path / "other")
    for name in ("train/train_clean.csv", "synth_oxf/gnd_synth_oxf.pkl"):
        assert other[name] != _files(tiny)[name]


def test_train_split_is_gldv2_clean_format(tiny: Path) -> None:
    lines = (tiny / "train" / "train_clean.csv").read_text().splitlines()
    assert lines[0] == "landmark_id,images"
    rows = list(csv.DictReader(lines))
    labels = [int(r["landmark_id"]) for r in rows]
    assert labels == sorted(set(labels)) and len(labels) == TINY["n_train_landmarks"]
    ids = [i for r in rows for i in r["images"].split(" ")]
    assert len(ids) == len(set(ids)) == TINY["n_train_landmarks"] * TINY["views_per_landmark"]
    for image_id in ids:
        assert re.fullmatch(r"[0-9a-f]{16}", image_id)
        img = cv2.imread(
            str(tiny / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
        )
        assert img is not None and max(img.shape[:2]) == TINY["image_size"]
    views, _ = read_geometry(tiny / "train")
    label_of = {i: int(r["landmark_id"]) for r in rows for i in r["images"].split()}
    record = json.loads((tiny / "train" / "homographies.json").read_text())
    assert {i: record["images"][i]["landmark_id"] for i in ids} == label_of and set(views) == set(
        ids
    )


@pytest.mark.parametrize("name", TEST_SETS)
def test_gnd_has_revisitop_keys_and_types(tiny: Path, name: str) -> None:
    with open(tiny / name / f"gnd_{name}.pkl", "rb") as f:
        gnd = pickle.load(f)
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    assert len(gnd["imlist"]) == TINY["n_test_db"] and len(gnd["qimlist"]) == TINY["n_test_queries"]
    assert all(type(n) is str for n in gnd["imlist"] + gnd["qimlist"])
    assert not set(gnd["qimlist"]) & set(gnd["imlist"])  # queries are not in the database
    assert isinstance(gnd["gnd"], list) and len(gnd["gnd"]) == len(gnd["qimlist"])
    for g in gnd["gnd"]:
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        assert (
            type(g["bbx"]) is list
            and len(g["bbx"]) == 4
            and all(type(v) is float for v in g["bbx"])
        )
        for key in ("easy", "hard", "junk"):
            assert (
                type(g[key]) is list
                and all(type(i) is int for i in g[key])
                and g[key] == sorted(g[key])
            )
    for image in gnd["imlist"] + gnd["qimlist"]:
        assert (tiny / name / "jpg" / f"{image}.jpg").is_file()


@pytest.mark.parametrize("name", TEST_SETS)
def test_gnd_is_consistent_with_the_geometry(tiny: Path, name: str) -> None:
    with open(tiny / name / f"gnd_{name}.pkl", "rb") as f:
        gnd = pickle.load(f)
    images = json.loads((tiny / name / "homographies.json").read_text())["images"]
    for qname, g in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        easy, hard, junk = set(g["easy"]), set(g["hard"]), set(g["junk"])
        assert not (easy & hard or easy & junk or hard & junk)
        assert easy | hard, f"{qname} has no positive"
        h, w = cv2.imread(str(tiny / name / "jpg" / f"{qname}.jpg")).shape[:2]
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert images[qname]["bbx"] == g["bbx"] and images[qname]["size"] == [w, h]
        same_scene = {
            i for i, n in enumerate(gnd["imlist"]) if images[n]["scene"] == images[qname]["scene"]
        }
        assert (
            easy | hard | junk == same_scene
        )  # every view of the landmark is labelled, nothing else


def _correlation(saved: np.ndarray, pyramid: list[np.ndarray], H: np.ndarray) -> float:
    """Grey-level correlation of a saved view with the canvas warped by H, where the canvas is."""
    warped, alpha = warp_scene(pyramid, H, (saved.shape[1], saved.shape[0]))
    mask = alpha[..., 0] > 0.99
    a, b = (cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)[mask].astype(np.float64) for x in (saved, warped))
    return float(np.corrcoef(a, b)[0, 1])


def test_recorded_homographies_match_the_pixels(tiny: Path) -> None:
    """The saved view correlates with the canvas warped by its recorded H, less with a shifted H."""
    plan = plan_train(SyntheticSettings(**TINY))
    views, _ = read_geometry(tiny / "train")
    for image_id, view in list(views.items())[:6]:
        pyramid = scene_pyramid(render_scene(plan.scenes[view.scene]))
        path = tiny / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        saved = cv2.imread(str(path))
        exact = _correlation(saved, pyramid, view.H)
        assert exact > 0.5
        assert exact > _correlation(saved, pyramid, _translation(6, 0) @ view.H) + 0.1


@pytest.mark.parametrize("mode", sorted(VIEW_RANGES))
def test_warp_scene_sends_a_canvas_point_where_the_homography_says(mode: str) -> None:
    rng = np.random.default_rng(0)
    canvas_size, point = (300, 200), np.array([170.0, 80.0])
    canvas = np.zeros((200, 300, 3), np.uint8)
    cv2.circle(canvas, (170, 80), 6, (255, 255, 255), -1)
    for _ in range(3):
        H, size = sample_view(rng, canvas_size, 128, mode, center=point + rng.uniform(-30, 30, 2))
        image, _ = warp_scene(scene_pyramid(canvas), H, size)
        weights = image[..., 0].astype(np.float64)
        ys, xs = np.mgrid[: size[1], : size[0]]
        centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, warp_points(H, point[None])[0], atol=1.0)


def test_overlap_fraction_on_translated_views() -> None:
    scene, size = (100, 100), (100, 100)
    whole, right_half = np.eye(3), _translation(-50, 0)  # b shows canvas x in [50, 150]
    assert overlap_fraction(whole, whole, size, size, scene) == pytest.approx(1.0)
    assert overlap_fraction(whole, right_half, size, size, scene) == pytest.approx(0.5)
    assert overlap_fraction(right_half, whole, size, size, scene) == pytest.approx(1.0)
    assert overlap_fraction(whole, _translation(-120, 0), size, size, scene) == 0.0
    assert overlap_fraction(whole, right_half, size, size, scene, box_a=(0, 0, 40, 100)) == 0.0


def test_overlap_area_is_symmetric_for_random_views() -> None:
    rng, scene = np.random.default_rng(1), (240, 160)
    for _ in range(10):
        (Ha, sa), (Hb, sb) = (sample_view(rng, scene, 128, "strong") for _ in range(2))
        area_a = polygon_area(visible_region(Ha, sa, scene))
        area_b = polygon_area(visible_region(Hb, sb, scene))
        ab = overlap_fraction(Ha, Hb, sa, sb, scene) * area_a
        ba = overlap_fraction(Hb, Ha, sb, sa, scene) * area_b
        assert ab == pytest.approx(ba, rel=1e-6, abs=1e-6)


def test_clip_polygon_matches_opencv() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = (
            cv2.convexHull(rng.uniform(0, 100, (6, 2)).astype(np.float32))[:, 0] for _ in range(2)
        )
        expected, _ = cv2.intersectConvexConvex(a, b)
        assert polygon_area(clip_polygon(a, b)) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_relative_homography_and_viewpoint_change() -> None:
    Ha = _similarity(0.8, 10, 5, -3) @ np.array([[1, 0.1, 0], [0, 1, 0], [1e-3, 0, 1]])
    Hb = _similarity(2.0, 30, 40, 7) @ Ha  # b = a zoomed x2 and rotated by 30 degrees
    pts = np.array([[10.0, 20.0], [50.0, 5.0]])
    np.testing.assert_allclose(
        warp_points(relative_homography(Ha, Hb), warp_points(Ha, pts)), warp_points(Hb, pts)
    )
    change = viewpoint_change(Ha, Hb, np.array([12.0, 34.0]))
    assert (change.scale, change.rotation, change.anisotropy) == pytest.approx((2.0, 30.0, 1.0))
    assert viewpoint_change(Ha, Ha, np.zeros(2)).is_mild()


def test_label_view_cases() -> None:
    scene, size, box = (100, 100), (100, 100), (0.0, 0.0, 100.0, 100.0)
    query = np.eye(3)
    assert label_view(query, size, box, query, size, scene) == "easy"
    assert label_view(query, size, box, query, size, scene, severe=True) == "hard"
    rotated = _translation(50, 50) @ _similarity(1, 45) @ _translation(-50, -50)
    assert label_view(query, size, box, rotated, size, scene) == "hard"
    assert label_view(query, size, box, _translation(-90, 0), size, scene) == "junk"  # 10% seen
    assert label_view(query, size, box, _translation(-200, 0), size, scene) == "junk"  # none seen


def test_true_overlapping_pairs() -> None:
    size, scenes = (100, 100), {"s": (300, 100), "t": (300, 100)}  # views see a third of a canvas
    views = {
        "a": ViewGeometry("s", np.eye(3), size),
        "b": ViewGeometry("s", _translation(-30, 0), size),  # shares 70%
        "c": ViewGeometry("s", _translation(-95, 0), size),  # shares 5% with a
        "d": ViewGeometry("t", np.eye(3), size),  # other scene
    }
    pairs = {
        (a, b): round(o, 6) for a, b, o in true_overlapping_pairs(views, scenes, threshold=0.5)
    }
    assert pairs == {("a", "b"): 0.7}


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write(path: Path, img: np.ndarray, quality: int) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    monkeypatch.setattr(synthetic, "_write_jpeg", failing_write)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic(tmp_path / "data", progress=False, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".data.partial-{dead.pid}"
    (stale / "train").mkdir(parents=True)
    make_synthetic(tmp_path / "data", progress=False, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "bad",
    [
        {"n_test_queries": 0},
        {"lookalike_fraction": 1.5},
        {"test_sets": ("a", "a")},
        {"n_test_db": 10},  # fewer than the landmark views
    ],
)
def test_bad_settings_are_named(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_synthetic(tmp_path / "data", progress=False, **{**TINY, **bad})
    assert list(tmp_path.iterdir()) == []


def test_rerun_is_a_noop_and_other_settings_need_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    make_synthetic(root, progress=False, **TINY)
    monkeypatch.setattr(synthetic, "_write_jpeg", lambda *a: pytest.fail("re-rendered"))
    assert make_synthetic(root, progress=False, **TINY) == read_manifest(root)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic(root, progress=False, **{**TINY, "seed": 5})
    monkeypatch.undo()
    manifest = make_synthetic(root, progress=False, overwrite=True, **{**TINY, "seed": 5})
    assert manifest["settings"]["seed"] == 5 == read_manifest(root)["settings"]["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with pytest.raises(TypeError, match="n_test_dbs"):
        make_synthetic(tmp_path / "x", n_test_dbs=3)


def test_cli_writes_the_requested_sizes(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "datasets" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sizes = {k: v for k, v in TINY.items() if k != "test_sets"}
    args = [a for k, v in sizes.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    manifest = cli.main(["--out", str(tmp_path / "cli"), "--quiet", "--test-sets", "only", *args])
    assert manifest["counts"]["only"]["db"] == TINY["n_test_db"]
    assert manifest["counts"]["train"]["images"] == 12
    assert (tmp_path / "cli" / "only" / "gnd_only.pkl").is_file()
