"""Extract global descriptors of one split (features for one dataset and split).

``python tools/extract.py --config C --weights W --dataset D --split S [KEY VALUE ...]``.

Splits: revisitop sets query|db, revisitop1m db (sharded, resumable), gldv2 test|index. Features go
to <OUTPUT_DIR>/features/<dataset>_<split>.npy + .json (reused when the metadata matches,
TEST.CACHE_FEATURES).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.cli import run_cli  # noqa: E402
from retrieval.evaluation.evaluator import extract_split  # noqa: E402
from tools.eval import eval_parser, load_models  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Parse, build, load, extract; prints and returns the feature file path."""
    parser = eval_parser(__doc__)
    parser.add_argument(
        "--dataset", required=True, help="roxford5k, rparis6k, revisitop1m, gldv2, ..."
    )
    parser.add_argument(
        "--split", required=True, help="query|db (revisitop), db (revisitop1m), test|index (gldv2)"
    )
    args = parser.parse_args(argv)
    cfg, model, _ = load_models(args.config, args.weights, args.opts, with_rerank=False)
    features = extract_split(cfg, model, args.dataset, args.split)
    path = Path(cfg.OUTPUT_DIR) / "features" / f"{args.dataset}_{args.split}.npy"
    print(
        f"{path}: {features.features.shape}, unreadable skipped {len(features.skipped)}, "
        f"min-side upscaled {len(features.upscaled)}"
    )
    return path


if __name__ == "__main__":
    run_cli(main)
