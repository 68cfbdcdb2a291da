"""Re-ranker registry of the evaluation engine: TEST.RERANKER -> factory(cfg, model, context).

``cvnet``: cvnet/reranker.py (CVNetReranker with the cvnet/cache.py pyramid cache); ``gv``:
geometric verification of retrieval/evaluation/geometric.py (``build_gv_reranker``). Modules are
imported lazily; a missing one gives an error naming it and the config key.

``shared_pass_tap`` (TEST.RERANK_SHARED_PASS) fills the CVNet pyramid cache during the global
extraction of the database, so the re-ranker runs no backbone pass of its own on database images.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from retrieval.data.revisitop import ImageListDataset
from retrieval.evaluation.extract import DenseTap, ExtractSettings
from retrieval.evaluation.rerank import Reranker
from retrieval.precision import AMP_DTYPES, native_bf16_cpu

logger = logging.getLogger(__name__)


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
    # CVNet pyramid cache already filled by the shared extraction pass (shared_pass_tap), or None
    pyramids: object | None = None

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
    for key, least in (
        ("RERANK_STREAMS", 1),
        ("RERANK_PAD_MULTIPLE", 1),
        ("RERANK_BATCH", 1),
        ("RERANK_MEMORY_MB", 0),
    ):
        if cfg.TEST[key] < least:
            raise ValueError(f"TEST.{key}={cfg.TEST[key]}; expected an integer >= {least}")
    reranker_module = import_reranker_module(cfg, "cvnet.reranker")
    queries, database = context.images((1.0,))
    cache = context.pyramids
    if cache is None:
        cache = _pyramid_cache(cfg, rerank_model, context)
    # TEST.AMP: CUDA autocast; on the CPU only bf16 (fp16 has no fast CPU kernels), and only for
    # the scoring: global extraction stays fp32 on the CPU.
    amp = AMP_DTYPES[context.settings.amp]
    amp = amp if context.device.type == "cuda" or amp == torch.bfloat16 else None
    if amp == torch.bfloat16 and context.device.type == "cpu" and not native_bf16_cpu():
        logger.warning(
            "TEST.AMP bf16 on a CPU without native bf16 (no AMX or AVX512-BF16 in /proc/cpuinfo): "
            "the re-rank scoring will be slower than in fp32 (measured 13x slower on an AVX2 "
            "host, docs/benchmarks/README.md); TEST.AMP off is faster here"
        )
    return reranker_module.CVNetReranker(
        rerank_model.to(context.device),
        lambda i: queries[i].images[0][None],  # (3, H, W) -> (1, 3, H, W)
        lambda j: database[j].images[0][None],
        cache,
        context.device,
        batch_size=cfg.TEST.RERANK_BATCH,
        amp_dtype=amp,
        memory_mb=reranker_module.memory_budget_mb(cfg.TEST.RERANK_MEMORY_MB, context.device),
        # both pay for cuDNN's host-side planning; on the CPU one thread and exact grids are faster
        streams=cfg.TEST.RERANK_STREAMS if context.device.type == "cuda" else 1,
        pad_multiple=cfg.TEST.RERANK_PAD_MULTIPLE if context.device.type == "cuda" else 1,
    )


def _pyramid_cache(cfg, rerank_model: nn.Module, context: RerankContext):
    """The PyramidCache of the database of ``context``: on disk with TEST.CACHE_FEATURES."""
    cache_module = import_reranker_module(cfg, "cvnet.cache")
    # One directory per storage dtype: table rows that only differ in TEST.RERANK_CACHE_DTYPE share
    # a model's feature folder. A cache left by another model is rebuilt with a warning, as stale
    # global features are re-extracted.
    dtype = cfg.TEST.RERANK_CACHE_DTYPE
    directory = context.cache_dir / f"pyramids_{context.name}_{dtype}"
    return cache_module.build_pyramid_cache(
        cfg,
        rerank_model,
        directory if cfg.TEST.CACHE_FEATURES else None,
        context.name,
        rebuild=True,
    )


def _shared_pass_obstacle(cfg, rerank_model: nn.Module, context: RerankContext) -> str:
    """Why the database pyramids cannot come from the global extraction pass ("" when they can)."""
    if not cfg.TEST.RERANK_SHARED_PASS:
        return "TEST.RERANK_SHARED_PASS is off"
    if not cfg.TEST.CACHE_FEATURES:
        return "TEST.CACHE_FEATURES is off (pyramids of every database image would stay in memory)"
    if 1.0 not in context.settings.scales:
        return f"TEST.SCALES {list(context.settings.scales)} has no scale 1.0"
    if context.device.type == "cuda" and context.settings.amp != "off":
        return f"extraction runs in TEST.AMP {context.settings.amp} (pyramids are built in fp32)"
    backbone = getattr(context.model, "backbone", None)
    if backbone is None or not same_weights(backbone, rerank_model.encoder.backbone):
        return "the global model's backbone differs from the re-ranker's"
    return ""


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """True when both modules hold equal state dicts (names, shapes, dtypes and values)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        x.shape == state_b[name].shape
        and x.dtype == state_b[name].dtype
        and torch.equal(x, state_b[name].to(x.device))
        for name, x in state_a.items()
    )


def shared_pass_tap(
    cfg, rerank_model: nn.Module | None, context: RerankContext
) -> tuple[DenseTap, RerankContext] | None:
    """(tap for the database extraction, context holding the cache it fills), or None (the reason
    is logged when the re-ranker is CVNet-Rerank)."""
    if cfg.TEST.RERANKER != "cvnet" or rerank_model is None:
        return None
    obstacle = _shared_pass_obstacle(cfg, rerank_model, context)
    if obstacle:
        logger.info("re-rank pyramids are built when first shortlisted: %s", obstacle)
        return None
    model = rerank_model.to(context.device).eval()
    cache = _pyramid_cache(cfg, model, context)

    def consume(index: int, maps: list[torch.Tensor]) -> None:
        if index not in cache:
            cache.put(index, model.build_pyramid([m.float() for m in maps]))

    scale_index = context.settings.scales.index(1.0)
    tap = DenseTap(context.model.backbone, model.feature_names, scale_index, consume)
    return tap, dataclasses.replace(context, pyramids=cache)


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

    def pairs_scored(self) -> int:
        """Distinct (query, database image) pairs scored so far."""
        return sum(len(known) for known in self.memo.values())
