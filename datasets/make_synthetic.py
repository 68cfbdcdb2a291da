"""Generate the embedded synthetic landmark-retrieval benchmark (no downloads, deterministic).

  python datasets/make_synthetic.py          # default size, into datasets/data/synthetic
  python datasets/make_synthetic.py --out /tmp/synth --n-train-landmarks 20 --n-test-db 100

Writes a GLDv2-clean style training split (train/train_clean.csv) and revisitop style test sets
(<name>/gnd_<name>.pkl, <name>/jpg/), with every homography in <split>/homographies.json and the
settings in manifest.json. Re-running with the same settings is a no-op; see
retrieval/data/synthetic.py for the format details.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.cli import run_cli  # noqa: E402
from retrieval.data.synthetic import SyntheticSettings, make_synthetic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """One flag per SyntheticSettings field (--n-train-landmarks ...) plus --out, --overwrite."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "datasets" / "data" / "synthetic", help="output root"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for f in fields(SyntheticSettings):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag, helptext = (
            "--" + f.name.replace("_", "-"),
            f"{f.metadata['help']} (default: %(default)s)",
        )
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=list(default), help=helptext)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=helptext)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Generate (or reuse) the dataset and print its counts."""
    args = parse_args(argv)
    settings = {f.name: getattr(args, f.name) for f in fields(SyntheticSettings)}
    settings["test_sets"] = tuple(settings["test_sets"])
    manifest = make_synthetic(
        args.out, overwrite=args.overwrite, progress=not args.quiet, **settings
    )
    print(f"synthetic benchmark at {args.out}: {json.dumps(manifest['counts'])}")
    return manifest


if __name__ == "__main__":
    run_cli(main)
