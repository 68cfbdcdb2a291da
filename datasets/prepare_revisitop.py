"""Check a local copy of the revisitop test sets (ROxf/RPar): ground truth, counts, missing images.

  python datasets/prepare_revisitop.py [--root datasets/data] [--datasets roxford5k rparis6k]
                                       [--decode] [--md5]

Never downloads (see datasets/README.md for where each file goes). Exit status 1 when a file is
missing, unreadable or a count differs from the official one. ``--decode`` also decodes every image
and checks each query box against its image; ``--md5`` prints the gnd checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from retrieval.data.image_io import ImageReadError, read_image  # noqa: E402
from retrieval.data.revisitop import GroundTruthError, crop_bbx, load_revisitop  # noqa: E402

# Official sizes (spec/eval_protocol.md §1): database images, queries.
EXPECTED = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
# md5 of the gnd copies measured in spec/eval_protocol.md (official downloads may differ byte-wise).
KNOWN_MD5_PREFIX = {"roxford5k": "f2b67579", "rparis6k": "2feae0a8"}


def md5sum(path: Path) -> str:
    """md5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_files(paths: Iterable[Path], desc: str) -> list[Path]:
    """The paths that are not files (progress bar over the list)."""
    return [path for path in tqdm(list(paths), desc=desc, leave=False) if not path.is_file()]


def unreadable_images(paths: Iterable[Path], desc: str) -> list[str]:
    """Error messages of the images that cannot be decoded."""
    problems = []
    for path in tqdm(list(paths), desc=desc, leave=False):
        try:
            read_image(path)
        except ImageReadError as err:
            problems.append(str(err))
    return problems


def report(problems: list, what: str, shown: int = 10) -> bool:
    """Print a count and the first problems; True when there is none."""
    if problems:
        print(f"  {len(problems)} {what}; first: " + ", ".join(str(p) for p in problems[:shown]))
    return not problems


def check_queries(data) -> list[str]:
    """Every query box inside its decoded image (GroundTruthError / ImageReadError messages)."""
    problems = []
    for path, box in zip(data.query_paths(), data.query_boxes()):
        try:
            crop_bbx(read_image(path), box, "truncate", str(path))
        except (GroundTruthError, ImageReadError) as err:
            problems.append(str(err))
    return problems


def check_dataset(root: Path, name: str, decode: bool, md5: bool) -> bool:
    """All checks of one test set; prints a summary, returns True when everything is in place."""
    try:
        data = load_revisitop(root, name)
    except GroundTruthError as err:
        print(f"{name}: {err}")
        return False
    print(f"{name}: {data.n} database images, {data.nq} queries")
    ok = EXPECTED.get(name, (data.n, data.nq)) == (data.n, data.nq)
    if not ok:
        print(f"  counts differ from the official {EXPECTED[name]}")
    if md5:
        digest = md5sum(root / name / f"gnd_{name}.pkl")
        print(f"  gnd md5 {digest} (measured copy: {KNOWN_MD5_PREFIX.get(name, '?')}...)")
    paths = data.db_paths() + data.query_paths()
    ok &= report(missing_files(paths, name), "missing images")
    if decode:
        ok &= report(unreadable_images(paths, f"{name} decode"), "unreadable images")
        ok &= report(check_queries(data), "bad query boxes")
    return ok


def main(argv: list[str] | None = None) -> int:
    """Check every requested test set; exit status 0 only when all pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/data"), help="DATA.ROOT")
    parser.add_argument("--datasets", nargs="+", default=["roxford5k", "rparis6k"])
    parser.add_argument("--decode", action="store_true", help="decode every image, check boxes")
    parser.add_argument("--md5", action="store_true", help="print the gnd md5 checksums")
    args = parser.parse_args(argv)
    results = [check_dataset(args.root, name, args.decode, args.md5) for name in args.datasets]
    print("OK" if all(results) else "PROBLEMS FOUND (see above)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
