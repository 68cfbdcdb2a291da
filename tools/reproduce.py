"""Reproduce paper tables: train each distinct model once, evaluate every row, render the tables.

  python tools/reproduce.py --table senet_S4 --scale demo           # synthetic data, CPU
  python tools/reproduce.py --table cvnet_S1 --scale full --nproc 8  # published recipe, torchrun
  python tools/reproduce.py --table senet_S4 --dry-run               # print the plan only

Outputs: <out>/<scale>/models/ (checkpoints, shared by all tables),
<out>/<scale>/results/<table>/<row>/ (results.json, results.md), <out>/<scale>/logs/,
<out>/<scale>/timings.json and the rendered tables in docs/results/<scale>/<table>.{md,csv,png}.
See docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.cli import run_cli  # noqa: E402
from retrieval.paper_tables import make_table  # noqa: E402
from retrieval.reproduce import Options, Planner, compose, run_jobs  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--table (repeatable), --scale, --nproc, --out, --r1m, --dry-run, --keep-going, --opts."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--table", action="append", required=True, help="table id, e.g. senet_S4 (repeatable)"
    )
    parser.add_argument("--scale", choices=("demo", "full"), default="demo")
    parser.add_argument(
        "--nproc",
        type=int,
        default=int(os.environ.get("REPRO_NPROC", "1")),
        help="training processes (GPUs) at full scale; default $REPRO_NPROC or 1",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("output/reproduce"), help="models, results, logs"
    )
    parser.add_argument(
        "--tables-out", type=Path, default=None, help="default docs/results/<scale>"
    )
    parser.add_argument(
        "--r1m", choices=("auto", "on", "off"), default="auto", help="+1M evaluation (full)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, run nothing")
    parser.add_argument("--keep-going", action="store_true", help="continue after a failed job")
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="overrides for every training and evaluation config (e.g. DATA.ROOT /tmp/synth)",
    )
    return parser.parse_args(argv)


def ensure_synthetic(scale: str, opts: list[str]) -> None:
    """At demo scale, generate the synthetic benchmark when it is missing (about a minute)."""
    root = Path(compose([], scale, opts).DATA.ROOT) if scale == "demo" else None
    if root is not None and not (root / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "datasets/make_synthetic.py", "--out", str(root), "--quiet"],
            check=True,
        )


def main(argv: list[str] | None = None) -> list[dict]:
    """Plan, run, render."""
    args = parse_args(argv)
    os.chdir(ROOT)  # configs and outputs are relative to the checkout
    r1m = {"auto": None, "on": True, "off": False}[args.r1m]
    options = Options(
        args.scale,
        args.out,
        args.nproc,
        sys.executable,
        r1m,
        args.dry_run,
        args.keep_going,
        tuple(args.opts),
    )
    planner = Planner(options)
    for table in args.table:
        planner.add_table(table)
    if args.dry_run:
        for job in planner.plan.jobs:
            print(job.kind, job.name, " ".join(job.argv))
        return []
    ensure_synthetic(args.scale, args.opts)
    base = args.out / args.scale
    records = run_jobs(planner.plan.jobs, base / "logs", args.keep_going)
    _append_timings(base / "timings.json", records)
    tables_out = args.tables_out or Path("docs/results") / args.scale
    for table in args.table:
        print(
            "[reproduce] table:",
            make_table(table, base / "results" / table, args.scale, tables_out),
        )
    return records


def _append_timings(path: Path, records: list[dict]) -> None:
    """Keep every job's wall time across runs (docs quote them)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + records, indent=1))


if __name__ == "__main__":
    run_cli(main)
