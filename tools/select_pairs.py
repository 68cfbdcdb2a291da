"""Select overlapped positives and hard-negative pools for CVNet-Rerank training (CVNet supp. S1).

  python tools/select_pairs.py --config C [KEY VALUE ...]

Reads TRAIN.CSV / TRAIN.IMAGE_DIR (GLDv2 format). Global descriptors come from a trained global
model (MODEL.WEIGHTS of cvnet_global or senet; with a cvnet_rerank config, the encoder of
MODEL.RERANK.GLOBAL_WEIGHTS) at TEST.SCALES, cached in OUTPUT_DIR. Local features and RANSAC
follow TEST.GV_* (geometric.py); pairs are kept with >= RERANK_TRAIN.MIN_INLIERS inliers. Writes
RERANK_TRAIN.PAIRS_CSV (with the box of each query's inliers, for RERANK_TRAIN.QUERY_CROP) and
RERANK_TRAIN.HARD_NEG_CSV (relative to DATA.ROOT); an interrupted run continues where it stopped
(progress in <PAIRS_CSV>.progress/; progress of other settings or of a version without the boxes is
refused: run with --restart).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from cvnet.pair_selection import PairVerifier, SelectionSettings, select_pairs  # noqa: E402
from retrieval.checkpoint import load_model_weights  # noqa: E402
from retrieval.cli import config_parser, parse_config, run_cli  # noqa: E402
from retrieval.data.gldv2 import image_path, read_train_csv  # noqa: E402
from retrieval.data.image_io import read_image  # noqa: E402
from retrieval.data.revisitop import ImageListDataset  # noqa: E402
from retrieval.engine.distributed import resolve_device  # noqa: E402
from retrieval.engine.rerank_task import build_rerank_model  # noqa: E402
from retrieval.evaluation.extract import (  # noqa: E402
    ExtractSettings,
    config_hash,
    extract_features,
    file_fingerprint,
    list_hash,
    state_fingerprint,
)
from retrieval.evaluation.geometric import build_gv_estimator, build_gv_local_features  # noqa: E402
from retrieval.modeling.registry import build_model  # noqa: E402


def selection_settings(cfg) -> SelectionSettings:
    """SelectionSettings from RERANK_TRAIN.*."""
    r = cfg.RERANK_TRAIN
    return SelectionSettings(
        r.NUM_NEIGHBORS,
        r.MIN_INLIERS,
        r.MIN_CLASS_IMAGES,
        r.HARD_NEG_POOL,
        r.CHUNK_CLASSES,
        r.RANSAC_WORKERS,
    )


def load_global_model(cfg, device):
    """(global model in eval mode on ``device``, weights fingerprint).

    MODEL.ARCH senet / cvnet_global: that model with MODEL.WEIGHTS; cvnet_rerank (a re-rank config):
    its encoder, the global model of MODEL.RERANK.GLOBAL_WEIGHTS.
    """
    if cfg.MODEL.ARCH == "cvnet_rerank":
        model = build_rerank_model(cfg).encoder
        weights = cfg.MODEL.RERANK.GLOBAL_WEIGHTS or cfg.MODEL.WEIGHTS
    else:
        model, weights = build_model(cfg), cfg.MODEL.WEIGHTS
        if weights:
            load_model_weights(model, weights, cfg.MODEL.ARCH)
    fingerprint = file_fingerprint(weights) if weights else state_fingerprint(model)
    return model.to(device).eval(), fingerprint


def gv_key(cfg, fingerprint: str, list_sha1: str) -> dict:
    """What the stored inlier counts depend on (checked on resume)."""
    return {
        "train_list": list_sha1,
        "model": config_hash(cfg),
        "weights": fingerprint,
        "gv": {k: v for k, v in cfg.TEST.items() if k.startswith("GV_") and k != "GV_MIN_INLIERS"},
        "scales": list(cfg.TEST.SCALES),
        "input_format": cfg.MODEL.INPUT_FORMAT,
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse --config and overrides, extract global descriptors, select pairs, print the summary."""
    parser = config_parser(__doc__)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the progress of a selection with other inputs (e.g. a retrained model)",
    )
    args, cfg = parse_config(parser, argv)
    root, device, tic = Path(cfg.DATA.ROOT), resolve_device(cfg.DEVICE), time.perf_counter()
    train_list = read_train_csv(root / cfg.TRAIN.CSV)
    paths = [image_path(root / cfg.TRAIN.IMAGE_DIR, i) for i in train_list.image_ids]
    model, fingerprint = load_global_model(cfg, device)
    settings = ExtractSettings.from_cfg(cfg)
    dataset = ImageListDataset(
        paths,
        scales=settings.scales,
        input_format=settings.input_format,
        min_side=settings.min_side,
    )
    key = {
        "model": config_hash(cfg),
        "weights": fingerprint,
        "list": list_hash(paths),
        **settings.key(),
    }
    descriptors = extract_features(
        model,
        dataset,
        device,
        settings,
        Path(cfg.OUTPUT_DIR) / "train_descriptors",
        key,
        reuse=cfg.TEST.CACHE_FEATURES,
        desc="train descriptors",
    ).features
    verifier = PairVerifier(
        build_gv_local_features(cfg, model, device),
        lambda i: read_image(paths[i]),
        build_gv_estimator(cfg),
        cfg.RERANK_TRAIN.RANSAC_WORKERS,
        device,
    )
    summary = select_pairs(
        descriptors,
        train_list.labels,
        train_list.image_ids,
        train_list.classes,
        verifier,
        selection_settings(cfg),
        root / cfg.RERANK_TRAIN.PAIRS_CSV,
        root / cfg.RERANK_TRAIN.HARD_NEG_CSV,
        gv_key(cfg, fingerprint, train_list.csv_sha1),
        device,
        args.restart,
    )
    summary["seconds"] = round(time.perf_counter() - tic, 1)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    run_cli(main)
