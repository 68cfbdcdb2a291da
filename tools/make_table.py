"""Render paper tables with the published number, ours and the difference (markdown, CSV, PNG).

  python tools/make_table.py --table senet_S4 --results output/reproduce/demo/results/senet_S4 \
      --scale demo --out docs/results/demo
  python tools/make_table.py --table all --results output/reproduce/full/results --scale full

--results is the folder of one table, or with --table all the parent of one folder per table.
Writes <out>/<table>.md, <out>/<table>.csv and <out>/<table>.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.cli import run_cli  # noqa: E402
from retrieval.paper_tables import PUBLISHED_DIR, make_table  # noqa: E402


def all_tables() -> list[str]:
    """Every table with a published CSV."""
    return sorted(p.stem for p in PUBLISHED_DIR.glob("*.csv"))


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse arguments and render the requested tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", required=True, help="table id (e.g. senet_S4) or 'all'")
    parser.add_argument("--results", type=Path, required=True, help="results folder (see above)")
    parser.add_argument("--scale", choices=("demo", "full"), default="full")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    if args.table == "all":
        return [make_table(t, args.results / t, args.scale, args.out) for t in all_tables()]
    return [make_table(args.table, args.results, args.scale, args.out)]


if __name__ == "__main__":
    run_cli(main)
