"""Re-ranker registry of the evaluation engine: TEST.RERANKER -> factory(cfg, model, context).

``cvnet``: cvnet/reranker.py (CVNetReranker with the cvnet/cache.py pyramid cache); ``gv``:
geometric verification of retrieval/evaluation/geometric.py (``build_gv_reranker``). Modules are
imported lazily; a missing one gives an error naming it and the config key.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from retrieval.data.revisitop import ImageListDataset
from retrieval.evaluation.extract import AMP_DTYPES, ExtractSettings
from retrieval.evaluation.rerank import Reranker


@dataclass(frozen=True)
class RerankContext:
    """What a re-ranker factory needs besides the config: images, global model, device, cache."""

    name: str
    query_paths: list[Path]
    query_boxes: list | None
    db_paths: list[Path]
    model: nn.Module | None
    device: torch.device
    settings: ExtractSettings
    cache_dir: Path

    def images(self, scales: tuple[float, ...] | None) -> tuple[ImageListDataset, ImageListDataset]:
        """(queries cropped, database full) image sets at ``scales`` (None: raw BGR images)."""
        s = self.settings
        queries = ImageListDataset(
            self.query_paths, self.query_boxes, s.crop_mode, scales, s.input_format, s.min_side
        )
        database = ImageListDataset(self.db_paths, None, "none", scales, s.input_format, s.min_side)
        return queries, database


def import_reranker_module(cfg, module_name: str) -> ModuleType:
    """Import the module a re-ranker needs; the error names it and TEST.RERANKER."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"TEST.RERANKER={cfg.TEST.RERANKER!r} needs module {module_name} ({err})"
        ) from None


def _cvnet_reranker(cfg, rerank_model: nn.Module | None, context: RerankContext) -> Reranker:
    """CVNetReranker: query cropped at scale 1, database full, pyramids cached (MODEL.RERANK)."""
    if rerank_model is None:
        raise ValueError(
            "TEST.RERANKER='cvnet' needs a CVNet-Rerank model: set TEST.RERANK_WEIGHTS or "
            "evaluate a MODEL.ARCH=cvnet_rerank checkpoint"
        )
    cache_module = import_reranker_module(cfg, "cvnet.cache")
    reranker_module = import_reranker_module(cfg, "cvnet.reranker")
    queries, database = context.images((1.0,))
    # One directory per storage dtype: table rows that only differ in TEST.RERANK_CACHE_DTYPE share
    # a model's feature folder. A cache left by another model is rebuilt with a warning, as stale
    # global features are re-extracted.
    dtype = cfg.TEST.RERANK_CACHE_DTYPE
    directory = context.cache_dir / f"pyramids_{context.name}_{dtype}"
    cache = cache_module.build_pyramid_cache(
        cfg,
        rerank_model,
        directory if cfg.TEST.CACHE_FEATURES else None,
        context.name,
        rebuild=True,
    )
    # TEST.AMP: CUDA autocast; on the CPU only bf16 (fast there, fp16 is not), and only for the
    # scoring: global extraction stays fp32 on the CPU.
    amp = AMP_DTYPES[context.settings.amp]
    amp = amp if context.device.type == "cuda" or amp == torch.bfloat16 else None
    return reranker_module.CVNetReranker(
        rerank_model.to(context.device),
        lambda i: queries[i].images[0][None],  # (3, H, W) -> (1, 3, H, W)
        lambda j: database[j].images[0][None],
        cache,
        context.device,
        amp_dtype=amp,
    )


def _gv_reranker(cfg, rerank_model: nn.Module | None, context: RerankContext) -> Reranker:
    """Geometric verification on raw images with the backbone of the re-rank or global model."""
    geometric = import_reranker_module(cfg, "retrieval.evaluation.geometric")
    queries, database = context.images(None)
    model = rerank_model if rerank_model is not None else context.model
    return geometric.build_gv_reranker(cfg, model, queries, database, context.device)


# TEST.RERANKER -> factory(cfg, rerank model or None, RerankContext) -> Reranker
RERANKERS: dict[str, Callable[..., Reranker]] = {"cvnet": _cvnet_reranker, "gv": _gv_reranker}


def build_reranker(cfg, rerank_model: nn.Module | None, context: RerankContext) -> Reranker:
    """The re-ranker named by TEST.RERANKER (registry RERANKERS)."""
    if cfg.TEST.RERANKER not in RERANKERS:
        raise ValueError(
            f"TEST.RERANKER={cfg.TEST.RERANKER!r}; expected one of {sorted(RERANKERS)}"
        )
    return RERANKERS[cfg.TEST.RERANKER](cfg, rerank_model, context)


class MemoReranker:
    """Scores each (query, db id) pair once across the global and the expanded rankings."""

    def __init__(self, reranker: Reranker) -> None:
        self.reranker, self.memo = reranker, {}

    def score(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        """Cached re-rank scores of db_indices for one query."""
        known = self.memo.setdefault(query_index, {})
        todo = np.array([i for i in db_indices if int(i) not in known], dtype=np.int64)
        if todo.size:
            scores = np.asarray(self.reranker.score(query_index, todo)).tolist()
            known.update(zip(todo.tolist(), scores))
        return np.array([known[int(i)] for i in db_indices], dtype=np.float64)
