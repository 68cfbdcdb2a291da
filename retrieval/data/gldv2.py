"""GLDv2-clean training set: the ``landmark_id,images`` CSV, contiguous class indices, images.

CSV format (GLDv2 ``train_clean.csv``): a header ``landmark_id,images`` then one line per landmark
whose second field holds space-separated image ids; image ``abc123`` lives at
``IMAGE_DIR/a/b/c/abc123.jpg``. Landmark ids are mapped to class indices 0..C-1 in ascending numeric
order (string order for non-numeric ids), so the mapping depends only on the CSV. The class list is
written to OUTPUT_DIR and stored in checkpoints.

Unreadable images: with ``skip_unreadable`` the sample is replaced by the next readable image of the
same class (deterministic, the label is kept), the path is logged and the sample carries
``unreadable`` (images skipped) so the trainer can count failures and stop above
DATA.MAX_UNREADABLE_FRACTION. Without it the first one raises.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from retrieval.data.image_io import ImageReadError, read_image

logger = logging.getLogger(__name__)
HEADER = ["landmark_id", "images"]
# Augmentation signature: (BGR uint8 image, rng) -> (3, S, S) tensor.
Transform = Callable[[np.ndarray, np.random.Generator], torch.Tensor]


class GLDv2FormatError(ValueError):
    """The training CSV is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TrainList:
    """Parsed training list: image ids, their class indices and the landmark id of every class."""

    image_ids: list[str]
    labels: list[int]
    classes: list[str]
    csv_sha1: str


def _class_order(landmark_ids: list[str]) -> list[str]:
    """Landmark ids sorted numerically when all are integers, else as strings."""
    numeric = all(lid.lstrip("-").isdigit() for lid in landmark_ids)
    return sorted(landmark_ids, key=int) if numeric else sorted(landmark_ids)


def _parse_rows(path: Path) -> dict[str, list[str]]:
    """landmark id -> image ids, with errors naming the file and line for any malformed row."""
    rows: dict[str, list[str]] = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if [h.strip() for h in header or []] != HEADER:
            raise GLDv2FormatError(f"{path}:1: header {header!r}, expected {','.join(HEADER)}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2 or not row[0].strip():
                raise GLDv2FormatError(f"{path}:{line}: expected 'landmark_id,images', got {row!r}")
            landmark, ids = row[0].strip(), row[1].split()
            if not ids:
                raise GLDv2FormatError(
                    f"{path}:{line}: landmark {landmark!r} has no images (empty class)"
                )
            if landmark in rows:
                raise GLDv2FormatError(f"{path}:{line}: landmark {landmark!r} appears twice")
            rows[landmark] = ids
    if not rows:
        raise GLDv2FormatError(f"{path}: no landmark rows after the header")
    return rows


def read_train_csv(path: str | os.PathLike) -> TrainList:
    """Parse a GLDv2 training CSV into image ids with contiguous class indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training CSV {str(path)!r} (TRAIN.CSV) does not exist")
    rows = _parse_rows(path)
    classes = _class_order(list(rows))
    image_ids, labels = [], []
    for index, landmark in enumerate(classes):
        image_ids.extend(rows[landmark])
        labels.extend([index] * len(rows[landmark]))
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    return TrainList(image_ids, labels, classes, sha1)


def image_path(image_dir: str | os.PathLike, image_id: str) -> Path:
    """GLDv2 layout: <dir>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg."""
    return Path(image_dir, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def write_class_list(train_list: TrainList, csv_path: str, path: str | os.PathLike) -> None:
    """Write class index -> landmark id and the split's identity (CSV path, hash, size) as JSON."""
    info = {
        "csv": str(csv_path),
        "csv_sha1": train_list.csv_sha1,
        "num_images": len(train_list.image_ids),
        "num_classes": len(train_list.classes),
        "classes": train_list.classes,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


class GLDv2Train(Dataset):
    """Training images with labels; sample i of epoch e is augmented with an rng of (seed, e, i)."""

    def __init__(
        self,
        train_list: TrainList,
        image_dir: str | os.PathLike,
        transform: Transform,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        # numpy arrays, not lists of Python objects: DataLoader workers would copy those on read
        self.image_ids = np.asarray(train_list.image_ids, dtype=str)
        self.labels = np.asarray(train_list.labels, dtype=np.int64)
        self.classes = train_list.classes
        self.image_dir, self.transform = Path(image_dir), transform
        self.seed, self.epoch, self.skip_unreadable = seed, 0, skip_unreadable
        order = np.argsort(self.labels, kind="stable")  # ascending indices within each class
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.classes) + 1))
        self.members = [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating a DataLoader)."""
        self.epoch = epoch

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        """(image, #failed): image ``index`` or, skipping, the next readable one of its class."""
        label = int(self.labels[index])
        members = self.members[label]
        start = int(np.searchsorted(members, index))
        for attempt in range(len(members)):
            candidate = members[(start + attempt) % len(members)]
            try:
                return read_image(
                    image_path(self.image_dir, str(self.image_ids[candidate]))
                ), attempt
            except ImageReadError as err:
                if not self.skip_unreadable:
                    raise ImageReadError(f"{err} (set DATA.SKIP_UNREADABLE True to skip)") from None
                logger.warning("skipping unreadable training image: %s", err)
        raise ImageReadError(
            f"no readable image in class {self.classes[label]!r} ({len(members)} images)"
        )

    def __getitem__(self, index: int) -> dict:
        """{"image": (3, S, S), "label": int, "index": int, "unreadable": images skipped}."""
        image, failed = self._read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return {
            "image": self.transform(image, rng),
            "label": int(self.labels[index]),
            "index": index,
            "unreadable": failed,
        }
