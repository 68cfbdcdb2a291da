"""GLDv2 retrieval test set (index/test images, v2.1 solution) for mAP@100 (eval_protocol §7).

Layout under ``<root>/gldv2/``: ``index.csv`` and ``test.csv`` (column ``id``),
``retrieval_solution_v2.1.csv`` (columns id, images, Usage; ``images`` is space-separated index ids
or "None" for ignored queries), and the images ``index/<a>/<b>/<c>/<id>.jpg`` and
``test/<a>/<b>/<c>/<id>.jpg`` (a, b, c = first three characters of the id). Only queries with ground
truth are kept: 'None' rows are excluded, as in the official metric.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

GLDV2_DIR = "gldv2"
SOLUTION_FILE = "retrieval_solution_v2.1.csv"
SPLITS = ("Public", "Private")


class GLDv2FormatError(ValueError):
    """A GLDv2 csv is missing or malformed; the message names the file and the row."""


def _read_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a csv with the required columns (error naming the file otherwise)."""
    if not path.is_file():
        raise GLDv2FormatError(f"{str(path)!r} does not exist (see datasets/README.md)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise GLDv2FormatError(
                f"{str(path)!r}: missing columns {missing}; found {reader.fieldnames}"
            )
        return list(reader)


def image_path(folder: Path, image_id: str) -> Path:
    """GLDv2 nested path <folder>/<a>/<b>/<c>/<id>.jpg."""
    return folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


@dataclass(frozen=True)
class GLDv2Retrieval:
    """Index ids, query ids (with ground truth), solution and Public/Private usage of each query."""

    root: Path
    index_ids: list[str]
    query_ids: list[str]
    solution: dict[str, set[str]]
    usage: dict[str, str]

    def index_paths(self) -> list[Path]:
        """Index image paths, in index.csv order."""
        return [image_path(self.root / GLDV2_DIR / "index", i) for i in self.index_ids]

    def query_paths(self) -> list[Path]:
        """Query image paths, in query_ids order."""
        return [image_path(self.root / GLDV2_DIR / "test", i) for i in self.query_ids]

    def split_solution(self, split: str) -> dict[str, set[str]]:
        """The solution restricted to one Usage split ('Public' or 'Private')."""
        return {q: truth for q, truth in self.solution.items() if self.usage[q] == split}


def _parse_solution(
    rows: list[dict], source: str, index: set[str], tests: set[str]
) -> tuple[dict, dict]:
    """(solution, usage) of the non-'None' rows; ids checked against index and test lists."""
    solution, usage = {}, {}
    for line, row in enumerate(rows, start=2):
        images = row["images"].split()
        if images == ["None"] or not images:
            continue
        if row["Usage"] not in SPLITS or row["id"] not in tests:
            raise GLDv2FormatError(
                f"{source}:{line}: id {row['id']!r} / Usage {row['Usage']!r} invalid"
            )
        unknown = [i for i in images if i not in index]
        if unknown:
            raise GLDv2FormatError(f"{source}:{line}: index ids {unknown[:3]} not in index.csv")
        solution[row["id"]], usage[row["id"]] = set(images), row["Usage"]
    return solution, usage


def load_gldv2_retrieval(root: str | os.PathLike) -> GLDv2Retrieval:
    """Read index.csv, test.csv and the v2.1 solution under <root>/gldv2."""
    root = Path(root)
    folder = root / GLDV2_DIR
    index_ids = [row["id"] for row in _read_rows(folder / "index.csv", ("id",))]
    test_ids = {row["id"] for row in _read_rows(folder / "test.csv", ("id",))}
    rows = _read_rows(folder / SOLUTION_FILE, ("id", "images", "Usage"))
    solution, usage = _parse_solution(rows, str(folder / SOLUTION_FILE), set(index_ids), test_ids)
    if not solution:
        raise GLDv2FormatError(f"{str(folder / SOLUTION_FILE)!r} holds no query with ground truth")
    return GLDv2Retrieval(root, index_ids, sorted(solution), solution, usage)
