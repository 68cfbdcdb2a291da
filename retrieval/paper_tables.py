"""Paper tables: published numbers (docs/papers/published/<table>.csv), our results, rendering.

A table has one published CSV and one config per row under configs/tables/<table>/. A row config
names its row (TABLE.ROW); a config with TEST.RERANK_TOPK [K1, K2, ...] provides the rows (ROW, K)
for every K. Our numbers of a config stem are read from <results>/<stem>/results.json
(tools/eval.py) and, for the +1M columns, from <results>/<stem>_r1m/results.json. Several configs
may fill one row (e.g. alpha-QE tuned per benchmark).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.config import load_cfg

PUBLISHED_DIR = Path("docs/papers/published")
TABLE_CONFIG_DIR = Path("configs/tables")
# Metric columns in the papers' order: Medium (ROxf, +1M, RPar, +1M) then Hard.
COLUMNS = (
    "medium_roxf",
    "medium_roxf1m",
    "medium_rpar",
    "medium_rpar1m",
    "hard_roxf",
    "hard_roxf1m",
    "hard_rpar",
    "hard_rpar1m",
)
COLUMN_TITLES = ("M ROxf", "M +1M", "M RPar", "M +1M", "H ROxf", "H +1M", "H RPar", "H +1M")
# Benchmark of each column family -> the test-set names that fill it (real, synthetic stand-in).
BENCHMARK_SETS = {"roxf": ("roxford5k", "synth_oxf"), "rpar": ("rparis6k", "synth_par")}
R1M_SUFFIX = "_r1m"

RowKey = tuple[str, int | None]  # (row label as printed, re-rank depth or None)


@dataclass
class TableRow:
    """One printed row: label, re-rank depth, published and our value per column (None: absent)."""

    label: str
    topk: int | None
    published: dict[str, float | None]
    ours: dict[str, float | None] = field(default_factory=dict)

    @property
    def key(self) -> RowKey:
        """(label, topk): unique inside a table."""
        return self.label, self.topk


def _topk(text: str) -> int | None:
    """CSV topk cell -> depth; '' and '0' (no re-ranking) -> None."""
    return int(text) if text.strip() not in ("", "0") else None


def read_published(table: str, root: Path = Path(".")) -> list[TableRow]:
    """The rows of docs/papers/published/<table>.csv in printed order."""
    path = root / PUBLISHED_DIR / f"{table}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no published numbers for table {table!r}: {path} does not exist")
    with path.open(newline="") as f:
        rows = [
            TableRow(
                r["row"],
                _topk(r["topk"]),
                {c: float(r[c]) if r[c].strip() else None for c in COLUMNS},
            )
            for r in csv.DictReader(f)
        ]
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: duplicate (row, topk) pairs")
    return rows


def row_configs(table: str, root: Path = Path(".")) -> list[Path]:
    """Every row config of a table, sorted by file name."""
    paths = sorted((root / TABLE_CONFIG_DIR / table).glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no row configs under {root / TABLE_CONFIG_DIR / table}")
    return paths


def result_keys(cfg) -> dict[RowKey, str]:
    """(ROW, topk) -> the row key of tools/eval.py's results.json that this config provides."""
    prefix = ("+aDBA+aQE" if cfg.TEST.DBA_N > 0 else "+aQE") if cfg.TEST.QE_N > 0 else ""
    if len(cfg.TEST.RERANK_TOPK):
        return {(cfg.TABLE.ROW, int(k)): f"{prefix}+rerank {int(k)}" for k in cfg.TEST.RERANK_TOPK}
    return {(cfg.TABLE.ROW, None): prefix or "global"}


def _load_json(path: Path) -> dict | None:
    """A results.json, or None when the run has not produced it."""
    return json.loads(path.read_text()) if path.is_file() else None


def _dataset_columns(results: dict, row_key: str, plus_1m: bool) -> dict[str, float]:
    """Column -> mAP x 100 for the benchmarks present in one results.json."""
    values = {}
    for bench, names in BENCHMARK_SETS.items():
        entry = next((results["datasets"][n] for n in names if n in results["datasets"]), None)
        if entry is None or row_key not in entry["rows"]:
            continue
        for protocol in ("medium", "hard"):
            value = entry["rows"][row_key][protocol]["map"]
            if value is not None and not math.isnan(value):
                values[f"{protocol}_{bench}{'1m' if plus_1m else ''}"] = 100.0 * value
    return values


def collect_ours(table: str, results_dir: Path, root: Path = Path(".")) -> dict[RowKey, dict]:
    """(ROW, topk) -> {column: our mAP} merged over every row config with results."""
    ours: dict[RowKey, dict] = {}
    for path in row_configs(table, root):
        cfg = load_cfg(path)
        for suffix, plus_1m in (("", False), (R1M_SUFFIX, True)):
            results = _load_json(results_dir / f"{path.stem}{suffix}" / "results.json")
            if results is None:
                continue
            for key, row_key in result_keys(cfg).items():
                ours.setdefault(key, {}).update(_dataset_columns(results, row_key, plus_1m))
    return ours


def build_table(table: str, results_dir: Path, root: Path = Path(".")) -> list[TableRow]:
    """Published rows with our numbers attached."""
    rows = read_published(table, root)
    ours = collect_ours(table, results_dir, root)
    for row in rows:
        row.ours = {c: ours.get(row.key, {}).get(c) for c in COLUMNS}
    return rows


def _fmt(value: float | None) -> str:
    """One number with one decimal as printed in the papers ('-' when absent)."""
    return "-" if value is None else f"{value:.1f}"


def _cell(published: float | None, ours: float | None) -> str:
    """'published / ours (difference)'."""
    diff = "" if published is None or ours is None else f" ({ours - published:+.1f})"
    return f"{_fmt(published)} / {_fmt(ours)}{diff}"


def scale_note(scale: str) -> str:
    """Header line saying what 'ours' is at this scale."""
    if scale == "demo":
        return (
            "Demo scale: 'ours' is measured on the synthetic benchmark (synth_oxf in the ROxf "
            "columns, "
            "synth_par in the RPar columns; no +1M) with a ResNet-18 trained for minutes on a CPU. "
            "It checks the pipeline, not the paper's numbers: the differences are not comparable."
        )
    return "Full scale: 'ours' on ROxford5k / RParis6k (+1M when the R1M distractors are present)."


def render_markdown(table: str, rows: list[TableRow], scale: str) -> str:
    """The table in the paper's layout; every cell is 'published / ours (ours - published)'."""
    lines = [
        f"## {table}",
        "",
        scale_note(scale),
        "",
        "| row | K | " + " | ".join(COLUMN_TITLES) + " |",
        "|---" * (2 + len(COLUMNS)) + "|",
    ]
    for row in rows:
        cells = [_cell(row.published[c], row.ours.get(c)) for c in COLUMNS]
        lines.append(f"| {row.label} | {row.topk or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[TableRow], path: Path) -> None:
    """Long format: row, topk, column, published, ours, difference."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["row", "topk", "column", "published", "ours", "difference"])
        for row in rows:
            for c in COLUMNS:
                pub, ours = row.published[c], row.ours.get(c)
                diff = None if pub is None or ours is None else round(ours - pub, 2)
                writer.writerow(
                    [
                        row.label,
                        row.topk or "",
                        c,
                        "" if pub is None else pub,
                        "" if ours is None else round(ours, 2),
                        "" if diff is None else diff,
                    ]
                )


def make_table(table: str, results_dir: Path, scale: str, out_dir: Path) -> Path:
    """Write <out_dir>/<table>.{md,csv,png}; returns the markdown path."""
    from retrieval.table_charts import plot_table  # noqa: PLC0415 (matplotlib only when rendering)

    rows = build_table(table, results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / f"{table}.md"
    markdown.write_text(render_markdown(table, rows, scale))
    write_csv(rows, out_dir / f"{table}.csv")
    plot_table(table, rows, out_dir / f"{table}.png", scale_note(scale))
    return markdown
