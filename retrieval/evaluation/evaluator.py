"""Evaluation engine: extract, search, alphaDBA/alphaQE, re-rank top K, metrics; per test set.

Rows, in the order of the papers' combined tables: ``global``, ``+aQE`` (``+aDBA+aQE`` with DBA),
``+rerank K`` and ``+aQE+rerank K`` for each K of TEST.RERANK_TOPK. revisitop sets are ranked in
full (official argsort) unless TEST.R1M appends the distractors; then the top TEST.R1M_TOPN of the
TEST.SEARCH backend are kept (recorded in the output; positives ranked deeper count as not
retrieved). 'gldv2' gives mAP@100 on the Public and Private splits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.data.gldv2_retrieval import SPLITS, load_gldv2_retrieval
from retrieval.data.revisitop import R1M_NAME, ImageListDataset, load_revisitop, r1m_paths
from retrieval.engine.distributed import is_main_process, resolve_device
from retrieval.evaluation.extract import (
    DenseTap,
    ExtractSettings,
    Features,
    config_hash,
    extract_features,
    file_fingerprint,
    list_hash,
    state_fingerprint,
)
from retrieval.evaluation.metrics import evaluate_revisitop, gldv2_map_at_k
from retrieval.evaluation.query_expansion import alpha_database_augmentation, alpha_query_expansion
from retrieval.evaluation.report import write_report
from retrieval.evaluation.rerank import Reranker, evaluate_reranked, rerank_top_k
from retrieval.evaluation.rerankers import (
    MemoReranker,
    RerankContext,
    build_reranker,
    shared_pass_tap,
)
from retrieval.evaluation.search import full_ranking, search
from retrieval.modeling.memory_format import to_channels_last

GLDV2_NAME = "gldv2"
GLDV2_K = 100
# Depth of the rank matrices saved beside the results (figures, error analysis).
SAVED_DEPTH = 100


class _PairSims:
    """Similarities as ``sims[db_ids, query]`` without the (n_db, nq) matrix (+R1M)."""

    def __init__(self, database: np.ndarray, queries: np.ndarray) -> None:
        self.database, self.queries = database, queries

    def __getitem__(self, key: tuple[np.ndarray, int]) -> np.ndarray:
        ids, query = key
        return self.database[ids] @ self.queries[query]  # (len(ids), D) @ (D,) -> (len(ids),)


def _extract(
    cfg,
    model: nn.Module,
    device: torch.device,
    split: tuple[str, str],
    paths: Sequence[Path],
    boxes: Sequence | None,
    out_dir: Path,
    shard_size: int = 0,
    tap: DenseTap | None = None,
) -> Features:
    """Cached multi-scale descriptors of one (dataset, split) image list."""
    settings = ExtractSettings.from_cfg(cfg)
    weights = file_fingerprint(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else state_fingerprint(model)
    key = {
        "model_config_sha1": config_hash(cfg),
        "weights": weights,
        "dataset": split[0],
        "split": split[1],
        "images_sha1": list_hash(paths),
        "count": len(paths),
        "cropped": boxes is not None,
        **settings.key(),
    }
    crop = settings.crop_mode if boxes is not None else "none"
    dataset = ImageListDataset(
        paths,
        boxes,
        crop,
        settings.scales,
        settings.input_format,
        settings.min_side,
        settings.skip_unreadable,
    )
    stem = out_dir / "features" / f"{split[0]}_{split[1]}"
    return extract_features(
        model,
        dataset,
        device,
        settings,
        stem,
        key,
        cfg.TEST.CACHE_FEATURES,
        shard_size,
        desc=f"{split[0]} {split[1]}",
        tap=tap,
    )


def _split_images(cfg, dataset: str, split: str) -> tuple[list[Path], list | None]:
    """(paths, boxes or None) of revisitop query|db, revisitop1m db or gldv2 test|index."""
    if dataset == R1M_NAME and split == "db":
        return r1m_paths(cfg.DATA.ROOT), None
    if dataset == GLDV2_NAME and split in ("test", "index"):
        data = load_gldv2_retrieval(cfg.DATA.ROOT)
        return (data.query_paths() if split == "test" else data.index_paths()), None
    if split not in ("query", "db"):
        raise ValueError(
            f"split {split!r} of {dataset!r}: expected query|db (revisitop), db (revisitop1m), "
            "test|index (gldv2)"
        )
    data = load_revisitop(cfg.DATA.ROOT, dataset)
    return (data.query_paths(), data.query_boxes()) if split == "query" else (data.db_paths(), None)


def extract_split(
    cfg, model: nn.Module, dataset: str, split: str, output_dir: str | Path | None = None
) -> Features:
    """Cached features of one split, saved as <output_dir>/features/<dataset>_<split>."""
    device = resolve_device(cfg.DEVICE)
    paths, boxes = _split_images(cfg, dataset, split)
    shard = int(cfg.TEST.R1M_SHARD_SIZE) if dataset == R1M_NAME else 0
    return _extract(
        cfg,
        model.to(device).eval(),
        device,
        (dataset, split),
        paths,
        boxes,
        Path(output_dir or cfg.OUTPUT_DIR),
        shard,
    )


def _rank(
    cfg, queries: np.ndarray, database: np.ndarray, topn: int | None, device: torch.device
) -> np.ndarray:
    """(n or topn, nq) rank matrix: official full argsort, or top-n of the TEST.SEARCH backend."""
    if topn is None:
        return full_ranking(queries, database)
    _, indices = search(
        torch.from_numpy(queries),
        torch.from_numpy(database),
        min(topn, len(database)),
        cfg.TEST.SEARCH,
        max_chunk_bytes=int(cfg.TEST.SEARCH_CHUNK_MB) << 20,
        device=device,
    )
    return indices.cpu().numpy().T


def _expand(
    cfg, queries: np.ndarray, database: np.ndarray, ranks: np.ndarray, device: torch.device
) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(label, queries, database) after alphaDBA and/or alphaQE, or None when both are off."""
    qe_n, dba_n, alpha = int(cfg.TEST.QE_N), int(cfg.TEST.DBA_N), float(cfg.TEST.QE_ALPHA)
    if qe_n <= 0 and dba_n <= 0:
        return None
    db = database
    if dba_n > 0:
        db = alpha_database_augmentation(torch.from_numpy(database), dba_n, alpha).numpy()
    if qe_n <= 0:
        return "+aDBA", queries, db
    if dba_n > 0:  # neighbours in the augmented database
        ranks = _rank(cfg, queries, db, qe_n, device)
    neighbours = torch.as_tensor(np.ascontiguousarray(ranks[:qe_n].T))  # (nq, qe_n)
    expanded = alpha_query_expansion(
        torch.from_numpy(queries), torch.from_numpy(db), neighbours, qe_n, alpha
    )
    return ("+aDBA+aQE" if dba_n > 0 else "+aQE"), expanded.numpy(), db


def _strip(results: dict) -> dict:
    """Metrics without the per-query arrays (JSON-friendly)."""
    return {protocol: {"map": r["map"], "mp@k": r["mp@k"]} for protocol, r in results.items()}


def _rerank_rows(cfg, reranker: Reranker, gnd: list, rankings: dict) -> tuple[dict, dict]:
    """'<label>+rerank K' rows and re-ranked rank matrices for every ranking of ``rankings``."""
    rows, ranked = {}, {}
    for label, (ranks, sims) in rankings.items():
        reranked = rerank_top_k(
            ranks,
            sims,
            reranker,
            list(cfg.TEST.RERANK_TOPK),
            gnd=gnd,
            shortlist=cfg.TEST.RERANK_MODE,
            weight=float(cfg.TEST.RERANK_WEIGHT),
        )
        prefix = "" if label == "global" else label
        for k, by_protocol in reranked.items():
            rows[f"{prefix}+rerank {k}"] = _strip(evaluate_reranked(by_protocol, gnd))
            for key, matrix in by_protocol.items():
                ranked[f"{prefix}+rerank {k}:{key}"] = matrix
    return rows, ranked


def save_rankings(path: Path, rankings: dict[str, np.ndarray], depth: int = SAVED_DEPTH) -> None:
    """The top ``depth`` of every rank matrix (label -> (n, nq)) as one .npz, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **{label: ranks[:depth] for label, ranks in rankings.items()})
    tmp.replace(path)


def _with_distractors(
    cfg, model: nn.Module, device: torch.device, x: Features, out_dir: Path
) -> tuple[np.ndarray, int | None, dict]:
    """(database features with R1M appended when TEST.R1M, ranking depth or None, R1M counts)."""
    if not cfg.TEST.R1M:
        return x.features, None, {}
    paths, shard = r1m_paths(cfg.DATA.ROOT), int(cfg.TEST.R1M_SHARD_SIZE)
    r1m = _extract(cfg, model, device, (R1M_NAME, "db"), paths, None, out_dir, shard)
    counts = {"r1m": len(paths), "r1m_skipped": len(r1m.skipped), "r1m_upscaled": len(r1m.upscaled)}
    return np.concatenate([x.features, r1m.features]), int(cfg.TEST.R1M_TOPN), counts


def _rankings(
    cfg, queries: np.ndarray, db: np.ndarray, topn: int | None, device: torch.device
) -> dict[str, tuple[np.ndarray, _PairSims]]:
    """label -> (rank matrix, similarities) for the global and (when on) the expanded search."""
    ranks = _rank(cfg, queries, db, topn, device)
    rankings = {"global": (ranks, _PairSims(db, queries))}
    expanded = _expand(cfg, queries, db, ranks, device)
    if expanded is not None:
        label, new_queries, new_db = expanded
        rankings[label] = (
            _rank(cfg, new_queries, new_db, topn, device),
            _PairSims(new_db, new_queries),
        )
    return rankings


@contextlib.contextmanager
def _timed(seconds: dict, phase: str) -> Iterator[None]:
    """Add the enclosed block's wall time to seconds[phase] (every phase ends in numpy arrays, so
    no device synchronisation is needed)."""
    start = time.perf_counter()
    yield
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def _timed_tap(tap: DenseTap, seconds: dict, phase: str) -> DenseTap:
    """``tap`` whose consumer's wall time goes to seconds[phase]: the host's part. A disk cache
    copies a GPU's pyramids to the host without waiting for the device, so their device time
    shows in the extraction's time, not here (compare with a global-only extraction)."""

    def consume(index: int, maps: list[torch.Tensor]) -> None:
        with _timed(seconds, phase):
            tap.consume(index, maps)

    return dataclasses.replace(tap, consume=consume)


def evaluate_revisitop_set(
    cfg,
    model: nn.Module,
    rerank_model: nn.Module | None,
    name: str,
    device: torch.device,
    out_dir: Path,
) -> dict:
    """All rows of one revisitop test set (optionally +R1M)."""
    data = load_revisitop(cfg.DATA.ROOT, name)
    seconds: dict[str, float] = {}
    with _timed(seconds, "extract_query"):
        q = _extract(
            cfg, model, device, (name, "query"), data.query_paths(), data.query_boxes(), out_dir
        )
    context, tap = None, None
    if len(cfg.TEST.RERANK_TOPK):
        db_paths = [*data.db_paths(), *(r1m_paths(cfg.DATA.ROOT) if cfg.TEST.R1M else [])]
        context = RerankContext(
            name,
            data.query_paths(),
            data.query_boxes(),
            db_paths,
            model,
            device,
            ExtractSettings.from_cfg(cfg),
            out_dir / "features",
        )
        # the revisitop database only: R1M pyramids are built for shortlisted distractors alone
        shared = shared_pass_tap(cfg, rerank_model, context)
        if shared is not None:
            tap, context = shared
            tap = _timed_tap(tap, seconds, "extract_db_rerank_pyramids")
    with _timed(seconds, "extract_db"):  # with the shared pass: the database pyramids too
        x = _extract(cfg, model, device, (name, "db"), data.db_paths(), None, out_dir, tap=tap)
        if tap is not None:
            with _timed(seconds, "extract_db_rerank_pyramids"):
                context.pyramids.flush()  # the last queued writes; a failed one raises here
        db, topn, extra = _with_distractors(cfg, model, device, x, out_dir)
    with _timed(seconds, "search"):
        rankings = _rankings(cfg, q.features, db, topn, device)
    rows = {label: _strip(evaluate_revisitop(r, data.gnd)) for label, (r, _) in rankings.items()}
    saved = {label: ranks for label, (ranks, _) in rankings.items()}
    if context is not None:
        with _timed(seconds, "rerank"):
            reranker = MemoReranker(build_reranker(cfg, rerank_model, context))
            rerank_rows, reranked = _rerank_rows(cfg, reranker, data.gnd, rankings)
        extra["rerank_pairs"] = reranker.pairs_scored()
        rows.update(rerank_rows)
        saved.update(reranked)
    if is_main_process():
        save_rankings(out_dir / f"rankings_{name}.npz", saved)
    ranking = "full" if topn is None else f"top {topn}"
    return {
        "rows": rows,
        "n_query": data.nq,
        "n_db": data.n,
        "ranking": ranking,
        "skipped": len(q.skipped) + len(x.skipped),
        "upscaled": len(q.upscaled) + len(x.upscaled),
        **extra,
        # wall seconds per phase: 'extract_db' includes 'extract_db_rerank_pyramids' (the shared
        # pass) and the R1M extraction; 'rerank' includes the pyramids of the lazy path
        "seconds": seconds,
    }


def evaluate_gldv2(cfg, model: nn.Module, device: torch.device, out_dir: Path) -> dict:
    """GLDv2 retrieval mAP@100 (Public, Private and both) of the global descriptor."""
    data = load_gldv2_retrieval(cfg.DATA.ROOT)
    q = _extract(cfg, model, device, (GLDV2_NAME, "test"), data.query_paths(), None, out_dir)
    x = _extract(cfg, model, device, (GLDV2_NAME, "index"), data.index_paths(), None, out_dir)
    ranks = _rank(cfg, q.features, x.features, GLDV2_K, device)  # (100, nq)
    predictions = {
        qid: [data.index_ids[i] for i in ranks[:, j]] for j, qid in enumerate(data.query_ids)
    }
    scores = {
        split.lower(): gldv2_map_at_k(predictions, data.split_solution(split), GLDV2_K)
        for split in SPLITS
        if data.split_solution(split)
    }
    scores["all"] = gldv2_map_at_k(predictions, data.solution, GLDV2_K)
    return {
        "rows": {"global": {"map@100": scores}},
        "n_query": len(data.query_ids),
        "n_db": len(data.index_ids),
        "ranking": f"top {GLDV2_K}",
        "skipped": len(q.skipped) + len(x.skipped),
        "upscaled": len(q.upscaled) + len(x.upscaled),
    }


def evaluate(
    cfg,
    model: nn.Module,
    reranker_model: nn.Module | None = None,
    output_dir: str | Path | None = None,
) -> dict:
    """Evaluate ``model`` on TEST.DATASETS; writes results.json/.md to output_dir (OUTPUT_DIR)."""
    out_dir = Path(output_dir or cfg.OUTPUT_DIR)
    device = resolve_device(cfg.DEVICE)
    model = model.to(device).eval()
    if cfg.TEST.CHANNELS_LAST and device.type == "cuda":
        model = to_channels_last(model)
    datasets = {}
    for name in cfg.TEST.DATASETS:
        if name == GLDV2_NAME:
            datasets[name] = evaluate_gldv2(cfg, model, device, out_dir)
        else:
            datasets[name] = evaluate_revisitop_set(
                cfg, model, reranker_model, name, device, out_dir
            )
    results = {"datasets": datasets, "settings": _settings(cfg)}
    if is_main_process():
        write_report(results, out_dir)
    return results


def _settings(cfg) -> dict:
    """The evaluation settings recorded beside the numbers: model identity and every TEST key."""
    model = {key.lower(): cfg.MODEL[key] for key in ("ARCH", "DEPTH", "WEIGHTS", "INPUT_FORMAT")}
    return {**model, **{key.lower(): value for key, value in cfg.TEST.items()}}
