"""GLDv2 training data: CSV parsing and errors, unreadable images, augmentation, sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gldv2_fixtures import write_gldv2
from torch.utils.data import DataLoader

from retrieval.data.augment import TrainAugment, color_jitter, random_crop_box
from retrieval.data.gldv2 import GLDv2FormatError, GLDv2Train, image_path, read_train_csv
from retrieval.data.image_io import ImageReadError, read_image
from retrieval.data.samplers import TrainSampler, class_groups
from retrieval.data.transforms import to_tensor


def _dataset(tmp_path, skip=False, landmarks=(17, 5, 100), per_class=3):
    """A GLDv2Train over freshly written images with the training augmentation."""
    ids = write_gldv2(tmp_path, list(landmarks), per_class)
    train_list = read_train_csv(tmp_path / "train.csv")
    return GLDv2Train(
        train_list, tmp_path / "train", TrainAugment(32), seed=3, skip_unreadable=skip
    ), ids


def test_csv_contiguous_classes_and_layout(tmp_path):
    ids = write_gldv2(tmp_path, [17, 5, 100], per_class=2)
    train_list = read_train_csv(tmp_path / "train.csv")
    assert train_list.classes == ["5", "17", "100"]  # numeric order, not file or string order
    assert train_list.image_ids == ids[5] + ids[17] + ids[100]
    assert train_list.labels == [0, 0, 1, 1, 2, 2]
    assert image_path("x", "abcdef").as_posix() == "x/a/b/c/abcdef.jpg"


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("id,images\n1,a b\n", ":1:", "header"),
        ("landmark_id,images\n1,abc def\n2\n", ":3:", "expected"),
        ("landmark_id,images\n1,abc\n2,\n", ":3:", "empty class"),
        ("landmark_id,images\n1,abc\n1,def\n", ":3:", "twice"),
        ("landmark_id,images\n", "train.csv:", "no landmark rows"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, text, where, what):
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(GLDv2FormatError, match=what) as err:
        read_train_csv(tmp_path / "train.csv")
    assert where in str(err.value) and str(tmp_path / "train.csv") in str(err.value)


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="TRAIN.CSV"):
        read_train_csv(tmp_path / "nope.csv")


def test_item_is_deterministic_per_epoch_and_index(tmp_path):
    dataset, _ = _dataset(tmp_path)
    item = dataset[4]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1 and item["unreadable"] == 0
    assert torch.equal(
        dataset[4]["image"], item["image"]
    )  # same (seed, epoch, index): same augmentation
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["image"], item["image"])


def test_unreadable_image_skipped_within_class(tmp_path):
    dataset, ids = _dataset(tmp_path, skip=True)
    image_path(tmp_path / "train", ids[17][0]).write_bytes(b"not a jpeg")
    item = dataset[3]  # sample 3 = first image of landmark 17 (class 1)
    assert item["unreadable"] == 1 and item["label"] == 1
    # replaced by the next image of the class; the augmentation still follows (seed, epoch, 3)
    expected = dataset.transform(
        read_image(image_path(tmp_path / "train", ids[17][1])), np.random.default_rng([3, 0, 3])
    )
    assert torch.equal(item["image"], expected)
    for image_id in ids[17]:
        image_path(tmp_path / "train", image_id).unlink()
    with pytest.raises(ImageReadError, match="no readable image in class '17'"):
        dataset[3]


def test_unreadable_image_raises_without_skip(tmp_path):
    dataset, ids = _dataset(tmp_path, skip=False)
    bad = image_path(tmp_path / "train", ids[5][1])
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError, match=str(bad.name)):
        dataset[1]


def test_random_crop_box_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(48, 64, (0.2, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.2 * 48 * 64 * 0.8 <= h * w <= 48 * 64
    # impossible request (tall crop of a wide strip): the centred fallback stays inside the image
    top, left, h, w = random_crop_box(10, 100, (0.9, 1.0), (0.5, 0.5), rng)
    assert (top, h) == (0, 10) and w == 5 and left == (100 - 5) // 2


def test_color_jitter_zero_is_identity_and_flip():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert np.array_equal(color_jitter(image, 0.0, rng), image)
    augment = TrainAugment(
        40, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.0, hflip=1.0
    )
    expected = to_tensor(np.ascontiguousarray(image[:, ::-1]), "BGR")
    assert torch.allclose(augment(image, rng), expected)


def test_sampler_shards_equal_single_process_batches():
    labels = np.arange(20) % 5
    single = TrainSampler(labels, global_batch=4, seed=7)
    ranks = [TrainSampler(labels, global_batch=4, world_size=2, rank=r, seed=7) for r in range(2)]
    for sampler in [single, *ranks]:
        sampler.set_epoch(2)
    full = np.array(list(single)).reshape(-1, 4)
    shards = [np.array(list(s)).reshape(-1, 2) for s in ranks]
    assert np.array_equal(np.concatenate(shards, axis=1), full)
    assert sorted(full.ravel()) == list(range(20))
    single.set_epoch(3)
    assert not np.array_equal(np.array(list(single)).reshape(-1, 4), full)


def test_sampler_resume_offset():
    sampler = TrainSampler(np.zeros(24, int), global_batch=6, world_size=3, rank=1, seed=0)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.set_epoch(1, start_batch=2)
    assert list(sampler) == whole[2 * 2 :] and len(sampler) == len(whole) - 4


def test_class_aware_sampler_groups():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 1 + [3] * 4)
    sampler = TrainSampler(labels, global_batch=4, samples_per_class=2, seed=1)
    groups = class_groups(labels, 2, np.random.default_rng(0))
    assert len(groups) == 14 and set(groups.tolist()) == set(
        range(12)
    )  # classes padded to pairs: 3+1+1+2
    order = sampler.epoch_order(0)
    assert len(order) == 12 and sampler.batches_per_epoch == 3  # cut to whole global batches
    pairs = labels[order].reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all()  # every pair is one class
    with pytest.raises(ValueError, match="SAMPLES_PER_CLASS=3"):
        TrainSampler(labels, global_batch=4, samples_per_class=3)
    with pytest.raises(ValueError, match="divisible by the world size"):
        TrainSampler(labels, global_batch=5, world_size=2)


def test_epoch_reaches_dataloader_workers(tmp_path):
    dataset, _ = _dataset(tmp_path)
    dataset.set_epoch(2)  # the trainer sets the epoch before creating each epoch's iterator
    loader = DataLoader(dataset, batch_size=2, sampler=[4, 1], num_workers=1)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][0], dataset[4]["image"]) and batch["label"].tolist() == [1, 0]
