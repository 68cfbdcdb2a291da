"""Result tables: markdown (one table per test set, mAP and mP@k x 100) and JSON, atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

PROTOCOL_COLUMNS = (("easy", "E"), ("medium", "M"), ("hard", "H"))


def _pct(value: float) -> str:
    """A fraction as a percentage with 2 decimals ('-' for NaN: every query skipped)."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _revisitop_table(rows: dict) -> list[str]:
    """Rows method | E/M/H mAP | E/M/H mP@k."""
    kappas = list(next(iter(rows.values()))["easy"]["mp@k"])
    k_text = "/".join(str(k) for k in kappas)
    lines = [
        "| method | "
        + " | ".join(f"{c} mAP" for _, c in PROTOCOL_COLUMNS)
        + " | "
        + " | ".join(f"{c} mP@{k_text}" for _, c in PROTOCOL_COLUMNS)
        + " |",
        "|---" * (1 + 2 * len(PROTOCOL_COLUMNS)) + "|",
    ]
    for label, result in rows.items():
        maps = [_pct(result[p]["map"]) for p, _ in PROTOCOL_COLUMNS]
        mps = [" / ".join(_pct(v) for v in result[p]["mp@k"].values()) for p, _ in PROTOCOL_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(maps + mps) + " |")
    return lines


def _gldv2_table(rows: dict) -> list[str]:
    """Rows method | mAP@100 per split."""
    splits = list(next(iter(rows.values()))["map@100"])
    lines = [
        "| method | " + " | ".join(f"mAP@100 {s}" for s in splits) + " |",
        "|---" * (1 + len(splits)) + "|",
    ]
    for label, result in rows.items():
        lines.append(
            f"| {label} | " + " | ".join(_pct(result["map@100"][s]) for s in splits) + " |"
        )
    return lines


def _dataset_header(name: str, entry: dict) -> str:
    """One line naming the set, its sizes, the ranking depth and the unreadable/upscaled counts."""
    extra = (
        f", +R1M {entry['r1m']} distractors ({entry['r1m_skipped']} unreadable)"
        if "r1m" in entry
        else ""
    )
    return (
        f"### {name}: {entry['n_query']} queries, {entry['n_db']} database images{extra}; "
        f"ranking: {entry['ranking']}; unreadable skipped: {entry['skipped']}; "
        f"min-side upscaled: {entry['upscaled']}"
    )


def format_markdown(results: dict) -> str:
    """The whole report as markdown: settings line, then one table per test set."""
    settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
    parts = [f"Settings: {settings}", ""]
    for name, entry in results["datasets"].items():
        table = (
            _gldv2_table(entry["rows"])
            if "map@100" in next(iter(entry["rows"].values()))
            else _revisitop_table(entry["rows"])
        )
        parts += [_dataset_header(name, entry), "", *table, ""]
    return "\n".join(parts)


def _atomic_text(path: Path, text: str) -> None:
    """Write text through a temporary file, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write results.json and results.md into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    _atomic_text(json_path, json.dumps(results, indent=1, default=float))
    _atomic_text(md_path, format_markdown(results))
    return json_path, md_path
