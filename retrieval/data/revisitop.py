"""revisitop test sets (ROxf/RPar and any ``gnd_<name>.pkl`` folder) and the R1M distractors.

Layout (datasets/README.md): ``<root>/<name>/gnd_<name>.pkl`` and ``<root>/<name>/jpg/<image>.jpg``;
R1M: ``<root>/revisitop1m/revisitop1m.txt`` (one relative file name per line, extension included, as
the official loader) and ``<root>/revisitop1m/jpg/``. Distractors are appended after the database
(indices >= n), so the gnd needs no change (spec/eval_protocol.md §4).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from retrieval.data.image_io import ImageReadError, ensure_min_side, read_image, resize_scale
from retrieval.data.transforms import to_tensor

CROP_MODES = ("truncate", "round", "none")
R1M_NAME = "revisitop1m"
_LABEL_KEYS = ("easy", "hard", "junk")


class GroundTruthError(ValueError):
    """A gnd file is malformed; the message names the file, the query and what was expected."""


def _check_query(entry: object, i: int, n: int, source: str) -> None:
    """Validate gnd[i]: a bbx of 4 numbers and disjoint easy/hard/junk index lists inside [0, n)."""
    if not isinstance(entry, dict) or "bbx" not in entry:
        raise GroundTruthError(
            f"{source}: gnd[{i}] must be a dict with keys 'bbx', 'easy', 'hard', 'junk'"
        )
    if len(np.ravel(entry["bbx"])) != 4:
        raise GroundTruthError(
            f"{source}: gnd[{i}]['bbx'] = {entry['bbx']!r}, expected [x1, y1, x2, y2]"
        )
    seen: set[int] = set()
    for key in _LABEL_KEYS:
        if key not in entry:
            raise GroundTruthError(f"{source}: gnd[{i}] has no key {key!r}")
        ids = np.asarray(entry[key], dtype=np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise GroundTruthError(
                f"{source}: gnd[{i}]['{key}'] holds {bad[:5].tolist()} outside [0, {n})"
            )
        if seen & set(ids.tolist()):
            raise GroundTruthError(f"{source}: gnd[{i}]['{key}'] overlaps another label list")
        seen |= set(ids.tolist())


def validate_gnd(obj: object, source: str) -> None:
    """Raise GroundTruthError unless ``obj`` has the revisitop structure (imlist, qimlist, gnd)."""
    if not isinstance(obj, dict):
        raise GroundTruthError(
            f"{source}: expected a dict with keys imlist, qimlist, gnd; got {type(obj).__name__}"
        )
    for key in ("imlist", "qimlist", "gnd"):
        if key not in obj:
            raise GroundTruthError(f"{source}: missing key {key!r} (expected imlist, qimlist, gnd)")
    if len(obj["gnd"]) != len(obj["qimlist"]):
        raise GroundTruthError(
            f"{source}: {len(obj['gnd'])} gnd entries for {len(obj['qimlist'])} queries"
        )
    for i, entry in enumerate(obj["gnd"]):
        _check_query(entry, i, len(obj["imlist"]), source)


def load_gnd(path: str | os.PathLike) -> dict:
    """Read and validate a revisitop ``gnd_<name>.pkl``."""
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(
            f"ground truth {str(path)!r} does not exist (see datasets/README.md)"
        )
    try:
        with open(path, "rb") as handle:
            obj = pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise GroundTruthError(
            f"{str(path)!r} is not a readable pickle ({type(err).__name__}: {err})"
        ) from None
    validate_gnd(obj, str(path))
    return obj


@dataclass(frozen=True)
class Revisitop:
    """One revisitop test set: names, ground truth and image paths."""

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    @property
    def n(self) -> int:
        """Database size (distractors excluded)."""
        return len(self.imlist)

    @property
    def nq(self) -> int:
        """Number of queries."""
        return len(self.qimlist)

    def image_path(self, image: str) -> Path:
        """Path of an image name: <root>/<name>/jpg/<image>.jpg."""
        return self.root / self.name / "jpg" / f"{image}.jpg"

    def db_paths(self) -> list[Path]:
        """Database image paths, in gnd index order."""
        return [self.image_path(image) for image in self.imlist]

    def query_paths(self) -> list[Path]:
        """Query image paths (crop them with ``query_boxes``)."""
        return [self.image_path(image) for image in self.qimlist]

    def query_boxes(self) -> list[list[float]]:
        """Query bounding boxes [x1, y1, x2, y2] as stored (floats in ROxf, ints in RPar)."""
        return [list(np.ravel(entry["bbx"])) for entry in self.gnd]


def load_revisitop(root: str | os.PathLike, name: str) -> Revisitop:
    """Load <root>/<name>/gnd_<name>.pkl."""
    root = Path(root)
    gnd = load_gnd(root / name / f"gnd_{name}.pkl")
    return Revisitop(name, root, list(gnd["imlist"]), list(gnd["qimlist"]), list(gnd["gnd"]))


def r1m_paths(root: str | os.PathLike) -> list[Path]:
    """Distractor paths from <root>/revisitop1m/revisitop1m.txt (names carry their extension)."""
    listing = Path(root) / R1M_NAME / f"{R1M_NAME}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"R1M list {str(listing)!r} does not exist (see datasets/README.md)"
        )
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [Path(root) / R1M_NAME / "jpg" / name for name in names]


def _box_pixels(bbx: Sequence[float], mode: str) -> list[int]:
    """Pixel box of a float bbx: int() truncation (official), round, or rejects an unknown mode."""
    if mode == "truncate":
        return [int(v) for v in bbx]
    if mode == "round":
        return [int(round(v)) for v in bbx]
    raise ValueError(f"crop mode {mode!r} is not allowed; expected one of {CROP_MODES}")


def crop_bbx(
    image: np.ndarray, bbx: Sequence[float], mode: str, source: str = "image"
) -> np.ndarray:
    """Crop (H, W, 3) to bbx [x1, y1, x2, y2] as ``img[y1:y2, x1:x2]``; 'none' keeps it."""
    if mode == "none":
        return image
    x1, y1, x2, y2 = _box_pixels(bbx, mode)
    height, width = image.shape[:2]
    if x1 < 0 or y1 < 0 or x2 > width + 1 or y2 > height + 1 or x2 <= x1 or y2 <= y1:
        raise GroundTruthError(
            f"{source}: bbx {list(bbx)} is outside the {width}x{height} image or empty"
        )
    return image[y1:y2, x1:x2]


class ExtractItem(NamedTuple):
    """One item: per-scale tensors or the raw BGR image (None if skipped), index, upscale flag."""

    images: list[torch.Tensor] | np.ndarray | None
    index: int
    upscaled: bool


class ImageListDataset(Dataset):
    """Images for extraction: read (BGR), bbx crop, min-side guard, per-scale tensors or raw."""

    def __init__(
        self,
        paths: Sequence[Path],
        boxes: Sequence | None = None,
        crop_mode: str = "truncate",
        scales: Sequence[float] | None = (1.0,),
        input_format: str = "BGR",
        min_side: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        if crop_mode not in CROP_MODES:
            raise ValueError(
                f"crop mode {crop_mode!r} is not allowed; expected one of {CROP_MODES}"
            )
        self.paths, self.boxes, self.crop_mode = list(paths), boxes, crop_mode
        self.scales = None if scales is None else [float(s) for s in scales]
        self.input_format, self.min_side, self.skip_unreadable = (
            input_format,
            min_side,
            skip_unreadable,
        )

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, bool]:
        """Read, crop and guard one image: ((H, W, 3) BGR uint8, upscaled)."""
        image = read_image(self.paths[index])
        if self.boxes is not None:
            image = crop_bbx(image, self.boxes[index], self.crop_mode, str(self.paths[index]))
        return ensure_min_side(image, self.min_side)

    def __getitem__(self, index: int) -> ExtractItem:
        """Per-scale (3, H_s, W_s) tensors (raw image if scales is None); None if skipped."""
        try:
            image, upscaled = self.load(index)
        except ImageReadError:
            if not self.skip_unreadable:
                raise
            return ExtractItem(None, index, False)
        if self.scales is None:
            return ExtractItem(image, index, upscaled)
        tensors = [to_tensor(resize_scale(image, s), self.input_format) for s in self.scales]
        return ExtractItem(tensors, index, upscaled)


def collate_items(batch: list[ExtractItem]) -> list[ExtractItem]:
    """Keep items as a list: scales give different sizes and skipped items carry None."""
    return batch
