"""Tiny GLDv2-format training sets written into tmp_path and the tiny-model config of the tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retrieval.config import load_cfg
from retrieval.data.gldv2 import image_path


def write_gldv2(
    root: Path, landmarks: list[int], per_class: int, seed: int = 0
) -> dict[int, list[str]]:
    """Write 48x64 jpg textures (one pattern per class) and root/train.csv; landmark -> ids."""
    rng = np.random.default_rng(seed)
    rows, out = [], {}
    for c, landmark in enumerate(landmarks):
        base = cv2.resize(
            rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
            (64, 48),
            interpolation=cv2.INTER_NEAREST,
        )
        ids = [f"{c:x}{j:x}{rng.integers(16**12):012x}{c:02x}" for j in range(per_class)]
        for image_id in ids:
            noisy = np.clip(base.astype(int) + rng.integers(-25, 26, base.shape), 0, 255).astype(
                np.uint8
            )
            path = image_path(root / "train", image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), noisy)
        rows.append(f"{landmark},{' '.join(ids)}")
        out[landmark] = ids
    (root / "train.csv").write_text("landmark_id,images\n" + "\n".join(rows) + "\n")
    return out


def tiny_opts(root: Path, out: Path, *opts: str) -> list[str]:
    """KEY VALUE overrides of a tiny SENet/CVNet-Global run on the data written by write_gldv2."""
    base = [
        "DATA.ROOT",
        str(root),
        "TRAIN.CSV",
        "train.csv",
        "TRAIN.IMAGE_DIR",
        "train",
        "OUTPUT_DIR",
        str(out),
        "MODEL.DEPTH",
        "18",
        "MODEL.REDUCTION_DIM",
        "32",
        "MODEL.SSM.MID_DIM",
        "8",
        "MODEL.SSM.UNFOLD_SIZE",
        "3",
        "TRAIN.IMG_SIZE",
        "64",
        "TRAIN.BATCH_SIZE",
        "4",
        "TRAIN.EPOCHS",
        "2",
        "TRAIN.LOG_PERIOD",
        "1",
        "LOSS.QUEUE_SIZE",
        "6",
        "DATA.NUM_WORKERS",
        "0",
        "DEVICE",
        "cpu",
        "OPTIM.LR",
        "0.01",
    ]
    return base + list(opts)


def tiny_cfg(root: Path, out: Path, *opts: str):
    """Frozen config of tiny_opts."""
    return load_cfg(None, tiny_opts(root, out, *opts))


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, two spinning torch threads are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
