"""Check a local copy of GLDv2: the clean training list + images, and the retrieval index/test set.

  python datasets/prepare_gldv2.py [--root datasets/data] [--skip-train] [--skip-retrieval]
                                   [--decode]

Never downloads. Counts are compared with spec/eval_protocol.md §7 (GLDv2-clean: 1,580,470 images of
81,313 landmarks; index 761,757; test 117,577). Exit status 1 when a file is missing or unreadable.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_revisitop import missing_files, report, unreadable_images  # noqa: E402

from retrieval.data.gldv2_retrieval import (  # noqa: E402
    GLDV2_DIR,
    GLDv2FormatError,
    image_path,
    load_gldv2_retrieval,
)

EXPECTED_TRAIN = (1_580_470, 81_313)  # GLDv2-clean images, landmarks
EXPECTED_INDEX, EXPECTED_TEST = 761_757, 117_577


def train_paths(root: Path) -> tuple[list[Path], int]:
    """(image paths, landmark count) of <root>/gldv2/train_clean.csv (images under gldv2/train)."""
    csv_path = root / GLDV2_DIR / "train_clean.csv"
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder = root / GLDV2_DIR / "train"
    return [image_path(folder, i) for row in rows for i in row["images"].split()], len(rows)


def check_train(root: Path, decode: bool) -> bool:
    """GLDv2-clean list and training images."""
    if not (root / GLDV2_DIR / "train_clean.csv").is_file():
        print(f"{root / GLDV2_DIR / 'train_clean.csv'} does not exist")
        return False
    paths, landmarks = train_paths(root)
    print(f"train_clean: {len(paths)} images of {landmarks} landmarks (official {EXPECTED_TRAIN})")
    ok = report(missing_files(paths, "train"), "missing training images")
    return ok and (not decode or report(unreadable_images(paths, "train decode"), "unreadable"))


def check_retrieval(root: Path, decode: bool) -> bool:
    """index.csv, test.csv, the v2.1 solution and the index / query images."""
    try:
        data = load_gldv2_retrieval(root)
    except GLDv2FormatError as err:
        print(err)
        return False
    public = len(data.split_solution("Public"))
    print(
        f"retrieval: {len(data.index_ids)} index images (official {EXPECTED_INDEX}), "
        f"{len(data.query_ids)} queries with ground truth ({public} Public)"
    )
    paths = data.index_paths() + data.query_paths()
    ok = report(missing_files(paths, "retrieval"), "missing index/query images")
    return ok and (not decode or report(unreadable_images(paths, "decode"), "unreadable"))


def main(argv: list[str] | None = None) -> int:
    """Run the requested checks; exit status 0 only when all pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/data"), help="DATA.ROOT")
    parser.add_argument("--skip-train", action="store_true", help="do not check the training set")
    parser.add_argument("--skip-retrieval", action="store_true", help="do not check index/test")
    parser.add_argument("--decode", action="store_true", help="decode every image (slow)")
    args = parser.parse_args(argv)
    ok = True
    if not args.skip_train:
        ok &= check_train(args.root, args.decode)
    if not args.skip_retrieval:
        ok &= check_retrieval(args.root, args.decode)
    print("OK" if ok else "PROBLEMS FOUND (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
