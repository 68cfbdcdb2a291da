"""Check a local copy of the revisitop 1M distractors: the list file and missing images.

  python datasets/prepare_r1m.py [--root datasets/data] [--decode] [--missing-out missing.txt]

Never downloads. The list revisitop1m.txt can name files that are absent from the extracted
tarballs (SOLAR #8); evaluation then needs DATA.SKIP_UNREADABLE True, which counts them in the
report (their descriptors are zero rows). Exit status 1 when an image is missing or unreadable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_revisitop import missing_files, report, unreadable_images  # noqa: E402

from retrieval.data.revisitop import r1m_paths  # noqa: E402

# About one million names (spec/eval_protocol.md §4); fewer hints at a truncated copy.
EXPECTED_MIN = 1_000_000


def main(argv: list[str] | None = None) -> int:
    """Count the list, find missing (and with --decode unreadable) images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/data"), help="DATA.ROOT")
    parser.add_argument("--decode", action="store_true", help="decode every image (slow)")
    parser.add_argument("--missing-out", type=Path, help="write the missing paths to this file")
    args = parser.parse_args(argv)
    try:
        paths = r1m_paths(args.root)
    except FileNotFoundError as err:
        print(err)
        return 1
    print(f"revisitop1m: {len(paths)} names in the list")
    if len(paths) < EXPECTED_MIN:
        print(f"  fewer than {EXPECTED_MIN} names: a truncated list?")
    missing = missing_files(paths, "revisitop1m")
    if args.missing_out:
        args.missing_out.write_text("".join(f"{p}\n" for p in missing))
    ok = report(missing, "missing images")
    if args.decode:
        present = sorted(set(paths) - set(missing))
        ok &= report(unreadable_images(present, "revisitop1m decode"), "unreadable images")
    print("OK" if ok else "PROBLEMS FOUND (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
