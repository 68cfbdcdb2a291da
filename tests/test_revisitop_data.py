"""revisitop / R1M / GLDv2 test-set loading: gnd validation, crops, datasets, unreadable images."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from retrieval.data.gldv2_retrieval import GLDv2FormatError, load_gldv2_retrieval
from retrieval.data.image_io import ImageReadError
from retrieval.data.revisitop import (
    GroundTruthError,
    ImageListDataset,
    crop_bbx,
    load_gnd,
    load_revisitop,
    r1m_paths,
    validate_gnd,
)

DATA_DIR = Path(__file__).parent / "data"


def make_tiny_revisitop(
    root: Path,
    name: str = "roxford5k",
    n_queries: int = 3,
    per_label: int = 2,
    n_negatives: int = 3,
    size: tuple[int, int] = (36, 48),
    seed: int = 0,
) -> dict:
    """A few-image copy of the real gnd (names, labels, float bbx) with random JPEGs."""
    real = pickle.loads((DATA_DIR / f"gnd_{name}.pkl").read_bytes())
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for entry in real["gnd"][:n_queries]:
        for key in ("easy", "hard", "junk"):
            picked += [i for i in entry[key][:per_label] if i not in picked]
    labelled = {i for entry in real["gnd"] for key in ("easy", "hard", "junk") for i in entry[key]}
    picked += [i for i in range(len(real["imlist"])) if i not in labelled][:n_negatives]
    remap = {old: new for new, old in enumerate(picked)}
    gnd = [
        {
            "bbx": [5.7, 4.2, size[1] - 6.6, size[0] - 3.5],
            **{
                key: [remap[i] for i in entry[key] if i in remap]
                for key in ("easy", "hard", "junk")
            },
        }
        for entry in real["gnd"][:n_queries]
    ]
    obj = {
        "imlist": [real["imlist"][i] for i in picked],
        "qimlist": real["qimlist"][:n_queries],
        "gnd": gnd,
    }
    (root / name / "jpg").mkdir(parents=True, exist_ok=True)
    (root / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(obj))
    for image in obj["imlist"] + obj["qimlist"]:
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        cv2.imwrite(str(root / name / "jpg" / f"{image}.jpg"), pixels)
    return obj


@pytest.mark.parametrize(("name", "n", "no_easy"), [("roxford5k", 4993, 2), ("rparis6k", 6322, 0)])
def test_real_gnd_loads(name: str, n: int, no_easy: int) -> None:
    gnd = load_gnd(DATA_DIR / f"gnd_{name}.pkl")
    assert len(gnd["imlist"]) == n and len(gnd["qimlist"]) == 70
    assert sum(not entry["easy"] for entry in gnd["gnd"]) == no_easy


def _good() -> dict:
    return {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0], "hard": [1], "junk": []}],
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: g.pop("qimlist"), "missing key 'qimlist'"),
        (lambda g: g["gnd"][0].pop("junk"), "no key 'junk'"),
        (lambda g: g["gnd"][0].update(hard=[3]), r"\[3\] outside \[0, 3\)"),
        (lambda g: g["gnd"][0].update(hard=[0]), "overlaps"),
        (lambda g: g["gnd"][0].update(bbx=[1, 2, 3]), "expected"),
        (lambda g: g["qimlist"].append("q2"), "1 gnd entries for 2 queries"),
    ],
)
def test_malformed_gnd_errors(tmp_path, mutate, message: str) -> None:
    validate_gnd(_good(), "ok")
    bad = _good()
    mutate(bad)
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(GroundTruthError, match=message) as info:
        load_gnd(path)
    assert "gnd_bad.pkl" in str(info.value)


def test_unreadable_gnd_names_path(tmp_path) -> None:
    (tmp_path / "gnd_x.pkl").write_bytes(b"garbage")
    with pytest.raises(GroundTruthError, match="gnd_x.pkl"):
        load_gnd(tmp_path / "gnd_x.pkl")
    with pytest.raises(GroundTruthError, match="does not exist"):
        load_revisitop(tmp_path, "missing")


def test_crop_modes() -> None:
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    bbx = [1.9, 2.7, 5.2, 7.99]
    np.testing.assert_array_equal(crop_bbx(image, bbx, "truncate"), image[2:7, 1:5])
    np.testing.assert_array_equal(crop_bbx(image, bbx, "round"), image[3:8, 2:5])
    assert crop_bbx(image, bbx, "none") is image
    with pytest.raises(GroundTruthError, match="outside"):
        crop_bbx(image, [0, 0, 40, 5], "truncate", "q.jpg")


def test_query_dataset_crops_and_scales(tmp_path) -> None:
    make_tiny_revisitop(tmp_path)
    data = load_revisitop(tmp_path, "roxford5k")
    assert data.nq == 3 and data.n == len(data.imlist)
    dataset = ImageListDataset(
        data.query_paths(), data.query_boxes(), "truncate", (0.5, 1.0), "BGR"
    )
    tensors, index, upscaled = dataset[1]
    assert index == 1 and not upscaled
    assert [tuple(t.shape) for t in tensors] == [
        (3, 14, 18),
        (3, 28, 36),
    ]  # crop rows 4:32, cols 5:41
    raw = ImageListDataset(data.db_paths(), scales=None)[0].images
    assert raw.shape == (36, 48, 3) and raw.dtype == np.uint8


def test_unreadable_image_stops_or_is_skipped(tmp_path) -> None:
    obj = make_tiny_revisitop(tmp_path)
    victim = tmp_path / "roxford5k" / "jpg" / f"{obj['imlist'][2]}.jpg"
    victim.unlink()
    data = load_revisitop(tmp_path, "roxford5k")
    with pytest.raises(ImageReadError, match=victim.name):
        ImageListDataset(data.db_paths())[2]
    item = ImageListDataset(data.db_paths(), skip_unreadable=True)[2]
    assert item.images is None and item.index == 2


def test_r1m_paths(tmp_path) -> None:
    folder = tmp_path / "revisitop1m"
    folder.mkdir()
    (folder / "revisitop1m.txt").write_text("a/b1.jpg\n\nc/d2.jpg\n")
    assert r1m_paths(tmp_path) == [folder / "jpg" / "a/b1.jpg", folder / "jpg" / "c/d2.jpg"]
    with pytest.raises(FileNotFoundError, match="revisitop1m.txt"):
        r1m_paths(tmp_path / "elsewhere")


def _write_gldv2(root: Path, solution_rows: list[str]) -> None:
    folder = root / "gldv2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.csv").write_text("id\nabc1\nabd2\nxyz3\n")
    (folder / "test.csv").write_text("id\nq001\nq002\nq003\n")
    (folder / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\n" + "\n".join(solution_rows) + "\n"
    )


def test_gldv2_retrieval(tmp_path) -> None:
    _write_gldv2(tmp_path, ["q001,abc1 xyz3,Public", "q002,None,Ignored", "q003,abd2,Private"])
    data = load_gldv2_retrieval(tmp_path)
    assert data.query_ids == ["q001", "q003"]
    assert data.split_solution("Public") == {"q001": {"abc1", "xyz3"}}
    assert data.index_paths()[0] == tmp_path / "gldv2" / "index" / "a" / "b" / "c" / "abc1.jpg"
    _write_gldv2(tmp_path, ["q001,abc1 nope,Public"])
    with pytest.raises(GLDv2FormatError, match="nope"):
        load_gldv2_retrieval(tmp_path)
