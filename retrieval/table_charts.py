"""PNG charts of a paper table: published (dashed / plain bars) against ours (solid / hatched bars).

Three kinds, picked from the rows: a sweep over a number in the row label (Fig. S3: the fusion
weight alpha), curves over the re-rank depth K when the table has several K (Tab. S1-S8), grouped
bars otherwise.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from retrieval.paper_tables import TableRow  # noqa: E402

# The four columns every chart shows (the +1M columns are absent at demo scale).
CHART_COLUMNS = (
    ("medium_roxf", "Medium ROxf"),
    ("medium_rpar", "Medium RPar"),
    ("hard_roxf", "Hard ROxf"),
    ("hard_rpar", "Hard RPar"),
)
SWEEP_LABEL = re.compile(r"^\S+=([0-9.]+)$")


def chart_kind(rows: list[TableRow]) -> str:
    """'sweep' (every label is 'symbol=number'), 'topk' (several depths K) or 'bars'."""
    unpublished = all(v is None for r in rows for v in r.published.values())
    if unpublished and all(SWEEP_LABEL.match(r.label) for r in rows):
        return "sweep"
    return "topk" if len({r.topk for r in rows if r.topk}) > 1 else "bars"


def _plot_sweep(ax, rows: list[TableRow], column: str) -> None:
    """Ours against the number in the label (published: none, the paper gives a curve only)."""
    points = sorted((float(SWEEP_LABEL.match(r.label).group(1)), r.ours.get(column)) for r in rows)
    xs = [x for x, y in points if y is not None]
    ax.plot(xs, [y for _, y in points if y is not None], "o-", label="ours")
    ax.set_xscale("log")
    ax.set_xlabel(rows[0].label.split("=")[0])


def _plot_topk(ax, rows: list[TableRow], column: str) -> None:
    """One colour per row label: published dashed, ours solid, over K."""
    labels = list(dict.fromkeys(r.label for r in rows if r.topk))
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r.label == label and r.topk), key=lambda r: r.topk)
        ks = [r.topk for r in mine]
        ax.plot(
            ks, [r.published[column] for r in mine], "--", color=f"C{i}", label=f"{label} (paper)"
        )
        ours = [(r.topk, r.ours.get(column)) for r in mine if r.ours.get(column) is not None]
        if ours:
            ax.plot(*zip(*ours), "o-", color=f"C{i}", label=f"{label} (ours)")
    ax.set_xscale("log", base=2)
    depths = sorted({r.topk for r in rows if r.topk})
    ax.set_xticks(depths, [str(k) for k in depths])
    ax.minorticks_off()
    ax.set_xlabel("re-rank depth K")


def _plot_bars(ax, rows: list[TableRow], column: str) -> None:
    """Published and ours side by side per row."""
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.published[column] or 0 for r in rows], 0.4, label="paper")
    ax.bar(
        [x + 0.2 for x in xs],
        [r.ours.get(column) or 0 for r in rows],
        0.4,
        hatch="//",
        label="ours",
    )
    ax.set_xticks(
        list(xs),
        [textwrap.fill(f"{r.label} {r.topk or ''}".strip(), 18) for r in rows],
        rotation=60,
        ha="right",
        fontsize=6,
    )


PLOTTERS = {"sweep": _plot_sweep, "topk": _plot_topk, "bars": _plot_bars}


def plot_table(table: str, rows: list[TableRow], path: Path, note: str) -> str:
    """Write the chart of a table to ``path`` (PNG); returns the chart kind."""
    kind = chart_kind(rows)
    fig, axes = plt.subplots(1, len(CHART_COLUMNS), figsize=(4.2 * len(CHART_COLUMNS), 4.2))
    for ax, (column, title) in zip(axes, CHART_COLUMNS):
        PLOTTERS[kind](ax, rows, column)
        ax.set_title(title)
        ax.set_ylabel("mAP (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{table}: {note}", fontsize=8, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return kind
