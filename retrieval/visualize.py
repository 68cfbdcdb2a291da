"""Figures: training curves from metrics.jsonl and a query's top results with correct/incorrect
borders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Border colour of a retrieved image by its label for the query (revisitop Medium protocol).
BORDER = {"positive": (0, 170, 0), "negative": (220, 0, 0), "junk": (150, 150, 150)}


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.jsonl -> {metric: (iterations, values)}; a resumed iteration's last record wins."""
    by_iteration: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        by_iteration[int(record["iteration"])] = record
    curves: dict[str, list[tuple[int, float]]] = {}
    for iteration in sorted(by_iteration):
        for key, value in by_iteration[iteration].items():
            if key != "iteration" and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((iteration, float(value)))
    return {
        k: (np.array([i for i, _ in v]), np.array([x for _, x in v])) for k, v in curves.items()
    }


def plot_training_curves(
    runs: Mapping[str, str | Path], keys: Sequence[str], out: str | Path
) -> None:
    """One panel per run: the ``keys`` curves (losses) against the iteration."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, path) in zip(axes[0], runs.items()):
        curves = read_metrics(path)
        for key in keys:
            if key in curves:
                ax.plot(*curves[key], label=key)
        ax.set(title=name, xlabel="iteration", ylabel="loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def label_of(db_index: int, gnd_query: Mapping) -> str:
    """positive / junk / negative of a database image under the Medium protocol."""
    if db_index in gnd_query["easy"] or db_index in gnd_query["hard"]:
        return "positive"
    return "junk" if db_index in gnd_query["junk"] else "negative"


def bordered(image_bgr: np.ndarray, colour: tuple[int, int, int], size: int = 128) -> np.ndarray:
    """A square RGB thumbnail with a coloured border (image letter-boxed on white)."""
    h, w = image_bgr.shape[:2]
    scale = (size - 12) / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image_bgr, (sw, sh), interpolation=cv2.INTER_AREA)[..., ::-1]
    canvas = np.full((size, size, 3), 255, np.uint8)
    canvas[:6], canvas[-6:], canvas[:, :6], canvas[:, -6:] = colour, colour, colour, colour
    top, left = (size - sh) // 2, (size - sw) // 2
    canvas[top : top + sh, left : left + sw] = small
    return canvas


def plot_query_rows(
    query_bgr: np.ndarray,
    rows: Mapping[str, Sequence[tuple[np.ndarray, str]]],
    out: str | Path,
    title: str = "",
) -> None:
    """Query thumbnail, then for each named ranking its top images with label-coloured borders."""
    n_cols = 1 + max(len(items) for items in rows.values())
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.3 * n_cols, 1.5 * len(rows)), squeeze=False
    )
    for ax_row, (name, items) in zip(axes, rows.items()):
        ax_row[0].imshow(bordered(query_bgr, (40, 90, 220)))
        ax_row[0].set_title("query", fontsize=8)
        for ax, (image, label) in zip(ax_row[1:], items):
            ax.imshow(bordered(image, BORDER[label]))
        ax_row[1].set_title(name, fontsize=8, loc="left")
        for ax in ax_row:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
