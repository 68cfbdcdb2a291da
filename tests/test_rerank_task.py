"""CVNet-Rerank training: tuple curriculum, Hide-and-Seek, frozen encoder, symmetrised loss."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cvnet.tuples import (
    HideAndSeek,
    TupleSampler,
    linear_schedule,
    read_pairs,
)
from retrieval.checkpoint import load_checkpoint, save_checkpoint
from retrieval.config import load_cfg
from retrieval.data.augment import NativeAugment
from retrieval.data.transforms import to_tensor
from retrieval.engine.rerank_task import (
    RerankTrainModule,
    build_task,
    expand_box,
    symmetric_match_loss,
)
from retrieval.engine.task import to_device
from retrieval.engine.trainer import train
from retrieval.modeling.registry import build_model

TINY = [
    "MODEL.ARCH",
    "cvnet_rerank",
    "MODEL.DEPTH",
    18,
    "MODEL.REDUCTION_DIM",
    16,
    "MODEL.RERANK.COMPRESS_DIM",
    8,
]


def toy_sampler(ratio=(0.2, 1.0), epochs=5, seed=0) -> TupleSampler:
    """4 classes x 3 images; images 0, 1 of a class are overlapped positives; other-class pools."""
    labels = [i // 3 for i in range(12)]
    positives = {3 * c: [3 * c + 1] for c in range(4)} | {3 * c + 1: [3 * c] for c in range(4)}
    pools = {q: [(q + 3) % 12, (q + 6) % 12] for q in positives}
    return TupleSampler(labels, positives, pools, ratio, pool_size=2, epochs=epochs, seed=seed)


def test_linear_schedules_of_hard_ratio_and_hide_probability():
    sampler = toy_sampler()
    assert [sampler.hard_negative_ratio(e) for e in range(5)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0]
    )
    hide = HideAndSeek(4, (0.0, 0.2), epochs=3)
    assert [hide.probability(e) for e in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    assert linear_schedule(0.3, 0.9, 0, 1) == 0.3 and linear_schedule(
        0.3, 0.9, 99, 4
    ) == pytest.approx(0.9)


def test_tuples_are_valid_and_follow_the_hard_ratio():
    labels = np.arange(12) // 3
    always, never = toy_sampler((1.0, 1.0)), toy_sampler((0.0, 0.0))
    for epoch in range(20):
        for hard_tuple, random_tuple in zip(always.epoch_tuples(epoch), never.epoch_tuples(epoch)):
            for t in (hard_tuple, random_tuple):
                assert (
                    t.positive in always.positives[t.query]
                    and labels[t.negative] != labels[t.query]
                )
            assert hard_tuple.hard and hard_tuple.negative in always.hard_pools[hard_tuple.query]
            assert not random_tuple.hard
    half = toy_sampler((0.5, 0.5))
    fraction = np.mean([t.hard for e in range(200) for t in half.epoch_tuples(e)])
    assert 0.43 < fraction < 0.57
    assert (
        len(always) == 4 and len({labels[t.query] for t in always.epoch_tuples(0)}) == 4
    )  # one per class


def test_tuples_are_deterministic_in_seed_and_epoch():
    a, b = toy_sampler(seed=3), toy_sampler(seed=3)
    assert a.epoch_tuples(2) == b.epoch_tuples(2)
    assert any(a.epoch_tuples(e) != a.epoch_tuples(0) for e in range(1, 6))
    assert any(toy_sampler(seed=4).epoch_tuples(e) != a.epoch_tuples(e) for e in range(6))


def test_hide_and_seek_hides_whole_cells_with_the_scheduled_probability():
    image = torch.randn(3, 32, 48) + 5.0  # no zero pixels before hiding
    hide = HideAndSeek(4, (0.0, 1.0), epochs=3)
    rng = np.random.default_rng(0)
    assert torch.equal(hide(image, 0, rng), image)
    assert torch.count_nonzero(hide(image, 2, rng)) == 0
    hidden = []
    for _ in range(100):
        out = hide(image, 1, rng)  # p = 0.5
        cells = (
            (out == 0).reshape(3, 4, 8, 4, 12).permute(1, 3, 0, 2, 4).reshape(16, -1)
        )  # (cells, pixels)
        assert torch.all(
            cells.all(dim=1) | ~cells.any(dim=1)
        )  # a cell is hidden entirely or not at all
        hidden.append(cells.all(dim=1).float().mean())
    assert 0.44 < float(torch.stack(hidden).mean()) < 0.56


def tiny_batch(seed=0, size=64):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(2, 3, size, size, generator=gen) for k in ("query", "positive", "negative")
    }


def test_one_step_trains_compress_and_learner_but_not_the_frozen_encoder():
    torch.manual_seed(0)
    module = RerankTrainModule(build_model(load_cfg(None, TINY))).train()
    assert not module.model.encoder.training and module.model.cv_learner.training
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = [p for p in module.parameters() if p.requires_grad]
    assert all(p.requires_grad is False for p in module.model.encoder.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    module(tiny_batch())["loss_match"].backward()
    optimizer.step()
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.compress.") for k in changed)
    assert any(k.startswith("model.cv_learner.") for k in changed)
    assert not any(k.startswith("model.encoder.") for k in changed)  # weights and BN statistics


def test_symmetrised_loss_is_the_mean_of_both_input_orders():
    torch.manual_seed(1)
    module = RerankTrainModule(build_model(load_cfg(None, TINY))).eval()
    batch = tiny_batch(2)
    q, p, n = batch["query"], batch["positive"], batch["negative"]
    logits = (
        module.model.pair_logits
    )  # independent path: one pair at a time, no batching of the three images
    target = torch.tensor([1, 1, 0, 0])
    with torch.no_grad():
        order_qk = F.cross_entropy(torch.cat([logits(q, p), logits(q, n)]), target)
        order_kq = F.cross_entropy(torch.cat([logits(p, q), logits(n, q)]), target)
        loss = module(batch)["loss_match"]
    assert float(loss) == pytest.approx(0.5 * float(order_qk + order_kq), rel=1e-5)
    assert float(order_qk) != pytest.approx(float(order_kq), rel=1e-4)  # the orders really differ
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    assert symmetric_match_loss(a, a, target) == pytest.approx(float(F.cross_entropy(a, target)))
    assert symmetric_match_loss(a, b, target) == pytest.approx(
        float(symmetric_match_loss(b, a, target))
    )


def test_images_of_different_sizes_give_the_loss_of_pairs_scored_one_by_one():
    torch.manual_seed(3)
    module = RerankTrainModule(build_model(load_cfg(None, TINY))).eval()
    gen = torch.Generator().manual_seed(4)
    sizes = {  # two tuples share every shape, so both the encoder and the pair batches group
        "query": [(40, 56), (64, 48), (40, 56)],
        "positive": [(64, 64), (48, 64), (64, 64)],
        "negative": [(48, 64), (64, 64), (48, 64)],
    }
    batch = {r: [torch.randn(3, h, w, generator=gen) for h, w in sizes[r]] for r in sizes}
    q, p, n = batch["query"], batch["positive"], batch["negative"]
    logits = module.model.pair_logits  # one pair at a time
    ab = [logits(q[i][None], x[i][None]) for x in (p, n) for i in range(3)]
    ba = [logits(x[i][None], q[i][None]) for x in (p, n) for i in range(3)]
    target = torch.tensor([1, 1, 1, 0, 0, 0])
    with torch.no_grad():
        expected = symmetric_match_loss(torch.cat(ab), torch.cat(ba), target)
        loss = module(batch)["loss_match"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_expand_box_adds_the_margin_and_the_minimum_side_inside_the_image():
    assert expand_box((10, 20, 60, 70), 0.1, 100, 100) == (5, 15, 65, 75)
    assert expand_box((0, 0, 50, 50), 0.1, 100, 100) == (0, 0, 55, 55)  # clipped at the border
    assert expand_box((40, 40, 50, 45), 0.0, 100, 100) == (29, 26, 61, 59)  # grown to 32 x 32+
    assert expand_box((0, 0, 10, 10), 0.0, 20, 100) == (0, 0, 20, 32)  # as wide as the image


def test_native_augment_keeps_the_aspect_and_never_upscales():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)
    assert NativeAugment(64)(image, rng).shape == (3, 43, 64)
    assert NativeAugment(512)(image, rng).shape == (3, 80, 120)
    plain = NativeAugment(512, color_jitter=0.0)(image, rng)
    assert torch.equal(plain, to_tensor(image, "BGR"))


def write_tiny_gldv2(root, query_boxes: bool = False) -> None:
    """3 classes x 2 random images in GLDv2 layout, the pairs CSV and the hard-negative CSV."""
    rng = np.random.default_rng(0)
    ids = [[f"{c}{i}a{c}{i}" for i in range(2)] for c in range(3)]
    for image_id in sum(ids, []):
        path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    (root / "train.csv").write_text(
        "landmark_id,images\n" + "".join(f"{c},{' '.join(ids[c])}\n" for c in range(3))
    )
    box = ",10 20 60 70" if query_boxes else ""
    pairs = [f"{a},{b},{c},40{box}\n" for c in range(3) for a, b in (ids[c], ids[c][::-1])]
    header = "query_id,positive_id,landmark_id,inliers" + (",query_box" if query_boxes else "")
    (root / "pairs.csv").write_text(header + "\n" + "".join(pairs))
    negs = [
        f"{ids[c][i]},{ids[(c + 1) % 3][0]} {ids[(c + 2) % 3][1]}\n"
        for c in range(3)
        for i in range(2)
    ]
    (root / "negs.csv").write_text("query_id,negative_ids\n" + "".join(negs))


def test_engine_trains_from_a_global_checkpoint(tmp_path):
    write_tiny_gldv2(tmp_path)
    global_model, cfg = tiny_training(tmp_path)
    task = build_task(cfg)
    assert len(task.dataset) == 3 and task.dataset[0]["query"].shape == (3, 64, 64)
    metrics = train(cfg, task)
    assert np.isfinite(metrics["loss_match"])
    final = load_checkpoint(tmp_path / "out" / "model_final.pth")["model"]
    for key, value in global_model.state_dict().items():
        assert torch.equal(final[f"encoder.{key}"], value)  # the encoder is the frozen global model


def test_engine_trains_in_the_test_geometry_on_inlier_cropped_queries(tmp_path):
    write_tiny_gldv2(tmp_path, query_boxes=True)
    native = ["RERANK_TRAIN.GEOMETRY", "native", "RERANK_TRAIN.QUERY_CROP", "inliers"]
    _, cfg = tiny_training(tmp_path, native)
    task = build_task(cfg)
    item = task.dataset[0]
    # the query is its inlier box 10 20 60 70 with 10 % margins, the others keep their 80 x 96
    # aspect with the longer side at TRAIN.IMG_SIZE
    assert item["query"].shape == (3, 60, 60) and item["positive"].shape == (3, 53, 64)
    assert np.isfinite(train(cfg, task)["loss_match"])


def test_query_crop_needs_the_boxes_of_the_pairs_csv_and_a_valid_margin(tmp_path):
    write_tiny_gldv2(tmp_path)  # written without query_box
    _, cfg = tiny_training(tmp_path, ["RERANK_TRAIN.QUERY_CROP", "inliers"])
    with pytest.raises(ValueError, match="pairs.csv has no query_box column.*--restart"):
        build_task(cfg)
    _, cfg = tiny_training(tmp_path, ["RERANK_TRAIN.QUERY_CROP_MARGIN", -0.1])
    with pytest.raises(ValueError, match="RERANK_TRAIN.QUERY_CROP_MARGIN must be >= 0, got -0.1"):
        build_task(cfg)


def tiny_training(tmp_path, extra: list | None = None):
    """(random global model saved as global.pth, config training the re-ranker on it)."""
    global_cfg = load_cfg(
        None, ["MODEL.ARCH", "cvnet_global", "MODEL.DEPTH", 18, "MODEL.REDUCTION_DIM", 16]
    )
    torch.manual_seed(5)
    global_model = build_model(global_cfg)
    save_checkpoint(
        {"model": global_model.state_dict(), "config": global_cfg.dump()}, tmp_path / "global.pth"
    )
    cfg = load_cfg(
        None,
        TINY
        + [
            "MODEL.RERANK.GLOBAL_WEIGHTS",
            str(tmp_path / "global.pth"),
            "DATA.ROOT",
            str(tmp_path),
            "DATA.NUM_WORKERS",
            0,
            "TRAIN.CSV",
            "train.csv",
            "TRAIN.IMAGE_DIR",
            "train",
            "TRAIN.IMG_SIZE",
            64,
            "TRAIN.BATCH_SIZE",
            2,
            "TRAIN.EPOCHS",
            2,
            "TRAIN.LOG_PERIOD",
            1,
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "RERANK_TRAIN.PAIRS_CSV",
            "pairs.csv",
            "RERANK_TRAIN.HARD_NEG_CSV",
            "negs.csv",
            "DEVICE",
            "cpu",
        ]
        + (extra or []),
    )
    return global_model, cfg


def test_encoder_from_global_checkpoints(tmp_path):
    """A CVNet-Global checkpoint fills the whole encoder; a SENet one fills the backbone only."""
    from retrieval.engine.rerank_task import load_encoder_weights
    from retrieval.modeling.official_names import to_official

    rerank = build_model(
        load_cfg(
            None, ["MODEL.ARCH", "cvnet_rerank", "MODEL.DEPTH", "18", "MODEL.GEM_TRAINABLE", "True"]
        )
    )
    head_before = rerank.encoder.head.fc.weight.clone()
    senet = build_model(load_cfg(None, ["MODEL.ARCH", "senet", "MODEL.DEPTH", "18"]))
    for index, state in enumerate((senet.state_dict(), to_official(senet.state_dict(), "senet"))):
        path = save_checkpoint({"model": state}, tmp_path / f"senet{index}.pth")
        load_encoder_weights(rerank, str(path))
        assert torch.equal(
            rerank.encoder.backbone.layer3[1].conv2.weight, senet.backbone.layer3[1].conv2.weight
        )
        assert torch.equal(
            rerank.encoder.head.fc.weight, head_before
        )  # no SENet head in CVNet-Global

    cvnet = build_model(
        load_cfg(
            None, ["MODEL.ARCH", "cvnet_global", "MODEL.DEPTH", "18", "MODEL.GEM_TRAINABLE", "True"]
        )
    )
    path = save_checkpoint({"model": cvnet.state_dict()}, tmp_path / "cvnet.pth")
    load_encoder_weights(rerank, str(path))
    assert torch.equal(rerank.encoder.head.fc.weight, cvnet.head.fc.weight)


def test_pairs_csv_with_and_without_query_boxes(tmp_path):
    index_of = {"a": 0, "b": 1}
    path = tmp_path / "pairs.csv"
    path.write_text("query_id,positive_id,landmark_id,inliers,query_box\na,b,7,40,1 2 30 40\n")
    assert read_pairs(path, index_of) == ({0: [1]}, None)
    assert read_pairs(path, index_of, with_boxes=True) == ({0: [1]}, {(0, 1): (1, 2, 30, 40)})
    path.write_text("query_id,positive_id,landmark_id,inliers\na,b,7,40\n")  # an older file
    assert read_pairs(path, index_of) == ({0: [1]}, None)
    path.write_text("query_id,positive_id,landmark_id,inliers,query_box\na,b,7,40,30 2 1 40\n")
    with pytest.raises(ValueError, match=r"pairs.csv:2: query_box '30 2 1 40'"):
        read_pairs(path, index_of, with_boxes=True)


def test_to_device_moves_lists_of_images_of_different_sizes():
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 4, 6)]
    batch = {"query": images, "hard": torch.zeros(2), "name": ["a", "b"]}
    moved = to_device(batch, torch.device("meta"), channels_last=True)
    assert [x.device.type for x in moved["query"]] == ["meta", "meta"]
    assert moved["hard"].device.type == "meta" and moved["name"] == ["a", "b"]
