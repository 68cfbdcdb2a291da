"""Descriptor extraction: official formula, cache reuse/invalidation, atomic saves, shard resume."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from test_revisitop_data import make_tiny_revisitop
from torch import nn

import retrieval.evaluation.extract as extract_module
from retrieval.config import load_cfg
from retrieval.data.revisitop import ImageListDataset, load_revisitop
from retrieval.data.transforms import to_tensor
from retrieval.evaluation.extract import (
    ExtractSettings,
    extract_descriptors,
    extract_features,
    file_fingerprint,
    load_features,
)
from retrieval.modeling.registry import build_model

SETTINGS = ExtractSettings(scales=(0.7071, 1.0, 1.4142), min_side=0)
ONE_SCALE = ExtractSettings(scales=(1.0,), min_side=0)


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = load_cfg(
        None, ["MODEL.ARCH", "cvnet_global", "MODEL.DEPTH", 18, "MODEL.REDUCTION_DIM", 32]
    )
    return build_model(cfg).eval()


@pytest.fixture
def tiny_set(tmp_path):
    make_tiny_revisitop(tmp_path, per_label=1, n_negatives=3)
    return load_revisitop(tmp_path, "roxford5k")


def test_multiscale_descriptor_is_l2_of_mean_of_l2(tiny_model, tiny_set) -> None:
    dataset = ImageListDataset(
        tiny_set.query_paths(), tiny_set.query_boxes(), "truncate", SETTINGS.scales
    )
    got = extract_descriptors(tiny_model, dataset, torch.device("cpu"), SETTINGS).features
    image = cv2.imread(str(tiny_set.query_paths()[0]))
    x1, y1, x2, y2 = (int(v) for v in tiny_set.query_boxes()[0])
    crop = image[y1:y2, x1:x2]
    per_scale = []
    for s, interp in ((0.7071, cv2.INTER_AREA), (1.0, None), (1.4142, cv2.INTER_LINEAR)):
        scaled = (
            crop if interp is None else cv2.resize(crop, (0, 0), fx=s, fy=s, interpolation=interp)
        )
        with torch.no_grad():
            d = tiny_model(to_tensor(scaled, "BGR")[None])[0].numpy().astype(np.float64)
        per_scale.append(d / np.linalg.norm(d))
    mean = np.mean(per_scale, axis=0)
    np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert got.shape == (tiny_set.nq, 32) and got.dtype == np.float32


def _db_features(model, data, stem, key, reuse=True, settings=ONE_SCALE, **kwargs):
    dataset = ImageListDataset(
        data.db_paths(), scales=settings.scales, skip_unreadable=settings.skip_unreadable
    )
    return extract_features(
        model, dataset, torch.device("cpu"), settings, stem, key, reuse=reuse, **kwargs
    )


def test_cache_reused_and_invalidated(tiny_model, tiny_set, tmp_path) -> None:
    model, stem = CountingModel(tiny_model), tmp_path / "feats" / "db"
    key = {"weights": "w1", **ONE_SCALE.key()}
    first = _db_features(model, tiny_set, stem, key)
    calls = model.calls
    assert calls == tiny_set.n
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["count"] == tiny_set.n and meta["key"]["scales"] == [1.0]
    second = _db_features(model, tiny_set, stem, key)
    assert model.calls == calls  # reused: the model was not called
    np.testing.assert_array_equal(first.features, second.features)
    _db_features(model, tiny_set, stem, {**key, "weights": "w2"})
    assert model.calls == 2 * calls  # changed metadata: extracted again
    _db_features(model, tiny_set, stem, {**key, "weights": "w2"}, reuse=False)
    assert model.calls == 3 * calls  # caching off


def test_killed_extraction_leaves_no_feature_file(
    tiny_model, tiny_set, tmp_path, monkeypatch
) -> None:
    real, calls = extract_module.multiscale_descriptor, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "multiscale_descriptor", dying)
    with pytest.raises(KeyboardInterrupt):
        _db_features(tiny_model, tiny_set, tmp_path / "db", {"k": 1})
    assert list(tmp_path.glob("db*")) == [] and list(tmp_path.glob(".db*")) == []
    assert load_features(tmp_path / "db", {"k": 1}) is None


def test_skipped_images_are_counted(tiny_model, tiny_set, tmp_path) -> None:
    tiny_set.db_paths()[1].unlink()
    settings = ExtractSettings(scales=(1.0,), min_side=0, skip_unreadable=True)
    result = _db_features(tiny_model, tiny_set, tmp_path / "db", {"k": 1}, settings=settings)
    assert result.skipped == [1]
    assert not result.features[1].any() and np.abs(np.linalg.norm(result.features[0]) - 1) < 1e-5
    assert json.loads((tmp_path / "db.json").read_text())["skipped"] == [1]


def test_sharded_extraction_resumes(tiny_model, tiny_set, tmp_path, monkeypatch) -> None:
    n = tiny_set.n
    full = _db_features(tiny_model, tiny_set, tmp_path / "ref", {"k": 1}).features
    real, calls = extract_module.multiscale_descriptor, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # dies inside the third shard of 2 images
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "multiscale_descriptor", dying)
    with pytest.raises(RuntimeError):
        _db_features(tiny_model, tiny_set, tmp_path / "r1m", {"k": 1}, shard_size=2)
    assert (
        len(list((tmp_path / "r1m.shards").glob("*.json"))) == 2
        and not (tmp_path / "r1m.npy").exists()
    )
    monkeypatch.setattr(extract_module, "multiscale_descriptor", real)
    model = CountingModel(tiny_model)
    resumed = _db_features(model, tiny_set, tmp_path / "r1m", {"k": 1}, shard_size=2)
    assert model.calls == n - 4  # the two finished shards were not recomputed
    np.testing.assert_allclose(resumed.features, full, atol=1e-6)


def test_file_fingerprint_changes_with_content(tmp_path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 10)
    first = file_fingerprint(path)
    assert file_fingerprint(path) == first
    path.write_bytes(b"b" * 11)
    assert file_fingerprint(path) != first


def _rank_worker(rank: int, world: int, port: int, model, dataset, out) -> None:
    """One torchrun-like rank: gloo group, strided extraction, gathered result saved by rank 0."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = extract_descriptors(model, dataset, torch.device("cpu"), ONE_SCALE)
        if rank == 0:
            np.save(out, result.features)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (about 10 s on an idle machine)
def test_two_ranks_gather_in_dataset_order(tiny_set, tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    dataset = ImageListDataset(tiny_set.db_paths(), scales=ONE_SCALE.scales)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "gathered.npy"
    mp.spawn(_rank_worker, args=(2, port, model, dataset, str(out)), nprocs=2, join=True)
    single = extract_descriptors(model, dataset, torch.device("cpu"), ONE_SCALE).features
    np.testing.assert_allclose(np.load(out), single, atol=1e-6)
