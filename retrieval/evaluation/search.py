"""Nearest-neighbour search over L2-normalized descriptors (cosine similarity = inner product).

Backends, all with the signature ``fn(queries (nq, d), database (n, d), k, **options) -> (scores,
indices)``, both (nq, k) torch tensors, best first:
* ``torch``: exact, chunked matmul over the database with a running top-k merge (memory bounded by
  ``max_chunk_bytes``); CPU or CUDA.
* ``torch_shortlist``: a low-precision matmul (bf16 on CPU, fp16 with fp32 output on CUDA) selects a
  shortlist of ``SHORTLIST_FACTOR * k`` items, fp32 re-scores it, and a rounding-error certificate
  proves per query that no item outside the shortlist can beat the k-th re-scored one
  (``_certified``); the queries whose certificate fails are searched again exactly, so the result
  equals the exact search (up to fp32 ties). Why no fixed margin is enough on its own: more than
  ``SHORTLIST_FACTOR * k`` items can tie within low-precision rounding (tested). Why 4k: the
  certificate needs the shortlist boundary about 2u|q||x| (u = 2^-8 for bf16) below the k-th exact
  score; on 2048-d random unit vectors (k = 100, 200k items) a 2k shortlist failed for every query,
  3k and 4k for none. Inputs are expected L2-normalized (fp16 overflows above 65504).
* ``faiss``: faiss flat inner-product brute force (GPU when CUDA and faiss-gpu are available).

The full ranking used by revisitop evaluation (``full_ranking``) reproduces the official
``argsort(-X @ Q.T, axis=0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 256 * 2**20
# shortlist = 4k items: the certificate passes on 2048-d descriptors (module docstring)
SHORTLIST_FACTOR = 4
_FP32_UNIT_ROUNDOFF = 2.0**-24
# re-score gathers stay below glibc's dynamic mmap threshold (32 MiB): freed blocks are then reused
# instead of being page-faulted in again, which measured 3-10x faster than one large gather on CPU
_GATHER_BLOCK_BYTES = 16 * 2**20

SearchFn = Callable[..., tuple[Tensor, Tensor]]


def _resolve_device(device: torch.device | str | None, reference: Tensor) -> torch.device:
    """The explicit device, else the device of the query tensor."""
    return torch.device(device) if device is not None else reference.device


def _check_inputs(queries: Tensor, database: Tensor, k: int) -> None:
    """Raise a clear error for mismatched dimensions or an impossible k."""
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"expected queries (nq, d) and database (n, d), got {tuple(queries.shape)} and "
            f"{tuple(database.shape)}"
        )
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k={k} must be in [1, database size={database.shape[0]}]")


def _rows_per_chunk(n_queries: int, dim: int, element_bytes: int, max_chunk_bytes: int) -> int:
    """Database rows per chunk such that the converted chunk plus its scores fit max_chunk_bytes."""
    return max(1, max_chunk_bytes // (dim * element_bytes + n_queries * 4))


def _chunked_topk(
    score_chunk: Callable[[Tensor], Tensor],
    database: Tensor,
    k: int,
    rows: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Top-k of score_chunk(database[a:b]) (nq, b - a) over all chunks, merged as it goes."""
    best_scores = best_indices = None
    for start in range(0, database.shape[0], rows):
        scores = score_chunk(database[start : start + rows])  # (nq, rows)
        top_scores, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
        top_indices = top_indices + start
        if best_scores is not None:
            top_scores = torch.cat([best_scores, top_scores], dim=1)  # (nq, <= 2k)
            top_indices = torch.cat([best_indices, top_indices], dim=1)
            top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)
            top_indices = top_indices.gather(1, order)
        best_scores, best_indices = top_scores, top_indices
    return best_scores, best_indices.to(device)


@torch.no_grad()
def knn(
    queries: Tensor,
    database: Tensor,
    k: int,
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products of queries (nq, d) vs database (n, d): scores, indices (nq, k)."""
    queries, database = torch.as_tensor(queries), torch.as_tensor(database)
    _check_inputs(queries, database, k)
    device = _resolve_device(device, queries)
    q = queries.to(device, dtype)
    rows = _rows_per_chunk(len(q), q.shape[1], q.element_size(), max_chunk_bytes)
    return _chunked_topk(lambda chunk: q @ chunk.to(device, dtype).T, database, k, rows, device)


def _low_precision_matmul(
    device: torch.device,
) -> tuple[torch.dtype, Callable[[Tensor, Tensor], Tensor], float]:
    """Low-precision dtype, (q, chunk) -> fp32 scores, and the unit roundoff of the output dtype."""
    if device.type == "cuda":  # fp32 accumulation and output: no rounding beyond gamma_d
        return torch.float16, lambda q, chunk: torch.mm(q, chunk.T, out_dtype=torch.float32), 0.0
    # CPU (oneDNN): fp32 accumulation, the result rounded once to bf16
    return (
        torch.bfloat16,
        lambda q, chunk: (q @ chunk.T).float(),
        torch.finfo(torch.bfloat16).eps / 2,
    )


def _gamma(dim: int, unit_roundoff: float) -> float:
    """Higham's gamma_d: relative error bound of a length-d floating-point sum."""
    return dim * unit_roundoff / (1.0 - dim * unit_roundoff)


def _rescore(queries: Tensor, database: Tensor, candidates: Tensor) -> Tensor:
    """Exact fp32 scores (nq, c) of queries (nq, d) against their candidate db rows (nq, c)."""
    nq, c = candidates.shape
    block = max(1, _GATHER_BLOCK_BYTES // max(1, c * queries.shape[1] * 4))
    parts = []
    for start in range(0, nq, block):
        ids = candidates[start : start + block].to(database.device)  # (b, c)
        rows = database.index_select(0, ids.flatten())  # (b * c, d), a row memcpy
        rows = rows.to(queries.device, torch.float32).view(*ids.shape, -1)  # (b, c, d)
        parts.append(torch.einsum("bd,bcd->bc", queries[start : start + block], rows))
    return torch.cat(parts)


@dataclass
class ShortlistResult:
    """shortlist_search output: top-k scores/indices (nq, k), exact fallbacks, shortlist size."""

    scores: Tensor
    indices: Tensor
    n_exact_fallback: int
    shortlist_size: int


def _certified(
    queries: Tensor,
    low: Tensor,
    exact_kth: Tensor,
    boundary: Tensor,
    max_norm: float,
    low_dtype: torch.dtype,
    out_roundoff: float,
) -> Tensor:
    """Per-query proof (nq,) that no item outside the shortlist can beat the k-th re-scored one.

    For x outside the shortlist its low-precision score is <= boundary b; its true score is then at
    most b + u_out|b| + gamma_d |q^||x^| + |q^||x - x^| + |q - q^||x|, with |x - x^| <= u |x| (round
    to nearest). The k re-scored items are all >= exact_kth - gamma_d |q||x| in true score.
    Certified when the second exceeds the first. |x| is bounded by the largest database norm,
    inflated by gamma_d for the rounding of its own computation.
    """
    dim = queries.shape[1]
    gamma = _gamma(dim, _FP32_UNIT_ROUNDOFF)
    max_norm *= 1 + gamma
    finfo = torch.finfo(low_dtype)
    unit = finfo.eps / 2
    # |x - x^| <= u |x| per element, plus absolute rounding of values below the normal range
    x_err = unit * max_norm + math.sqrt(dim) * finfo.smallest_normal * unit
    q_norm = queries.double().norm(dim=1)
    low_norm = low.double().norm(dim=1)
    residual = (queries.double() - low.double()).norm(dim=1)
    outside = (
        boundary.double()
        + out_roundoff * boundary.double().abs()
        + gamma * low_norm * (max_norm + x_err)
        + low_norm * x_err
        + residual * max_norm
    )
    inside = exact_kth.double() - gamma * q_norm * max_norm
    return inside > outside


@torch.no_grad()
def shortlist_search(
    queries: Tensor,
    database: Tensor,
    k: int,
    *,
    shortlist_factor: int = SHORTLIST_FACTOR,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    device: torch.device | str | None = None,
) -> ShortlistResult:
    """Low-precision shortlist, fp32 re-score, per-query certificate + exact fallback."""
    queries, database = torch.as_tensor(queries), torch.as_tensor(database)
    _check_inputs(queries, database, k)
    device = _resolve_device(device, queries)
    low_dtype, matmul, out_roundoff = _low_precision_matmul(device)
    q = queries.to(device, torch.float32)
    q_low = q.to(low_dtype)
    size = min(database.shape[0], shortlist_factor * k)
    rows = _rows_per_chunk(len(q), q.shape[1], 2, max_chunk_bytes)
    # one reused low-precision buffer: a fresh conversion per chunk page-faults (3x slower on CPU)
    buffer = torch.empty(rows, q.shape[1], dtype=low_dtype, device=device)

    def score_chunk(chunk: Tensor) -> Tensor:  # (rows, d) -> (nq, rows)
        return matmul(q_low, buffer[: len(chunk)].copy_(chunk))

    low_scores, candidates = _chunked_topk(score_chunk, database, size, rows, device)  # (nq, size)
    exact = _rescore(q, database, candidates)  # (nq, size)
    scores, order = exact.topk(k, dim=1)
    indices = candidates.gather(1, order)
    if size == database.shape[0]:  # the shortlist is the whole database: nothing to certify
        return ShortlistResult(scores, indices, 0, size)
    ok = _certified(
        q,
        q_low,
        scores[:, -1],
        low_scores[:, -1],
        _max_row_norm(database, rows),
        low_dtype,
        out_roundoff,
    )
    failed = (~ok).nonzero().flatten()
    if failed.numel():
        scores[failed], indices[failed] = knn(
            q[failed], database, k, max_chunk_bytes=max_chunk_bytes, device=device
        )
    return ShortlistResult(scores, indices, int(failed.numel()), size)


def _max_row_norm(database: Tensor, rows: int) -> float:
    """Largest L2 norm of a database row, computed chunk by chunk."""
    return max(
        float(torch.linalg.vector_norm(database[start : start + rows].float(), dim=1).max())
        for start in range(0, database.shape[0], rows)
    )


def knn_shortlist(queries: Tensor, database: Tensor, k: int, **options) -> tuple[Tensor, Tensor]:
    """Top-k by certified low-precision shortlist + fp32 re-score: scores, indices (nq, k)."""
    result = shortlist_search(queries, database, k, **options)
    return result.scores, result.indices


def _import_faiss():
    """Import faiss lazily with an actionable message."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "search backend 'faiss' needs the faiss package: pip install faiss-gpu "
            "(or faiss-cpu), or use backend 'torch'"
        ) from error
    return faiss


def _as_float32_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """Contiguous float32 numpy view/copy of a CPU or CUDA tensor or an array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def knn_faiss(
    queries: Tensor,
    database: Tensor,
    k: int,
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k by faiss flat inner-product brute force (IndexFlatIP's kernel, no database copy)."""
    faiss = _import_faiss()
    queries, database = torch.as_tensor(queries), torch.as_tensor(database)
    _check_inputs(queries, database, k)
    device = _resolve_device(device, queries)
    xq, xb = _as_float32_numpy(queries), _as_float32_numpy(database)
    if device.type == "cuda" and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        scores, indices = faiss.knn_gpu(
            resources,
            xq,
            xb,
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
            device=gpu,
            vectorsMemoryLimit=max_chunk_bytes,
        )
    else:
        scores, indices = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)


SEARCH_BACKENDS: dict[str, SearchFn] = {
    "torch": knn,
    "torch_shortlist": knn_shortlist,
    "faiss": knn_faiss,
}


def get_search_backend(name: str) -> SearchFn:
    """Resolve a backend name to its search function (raises with the allowed names)."""
    if name not in SEARCH_BACKENDS:
        raise ValueError(
            f"unknown search backend {name!r}; expected one of {sorted(SEARCH_BACKENDS)}"
        )
    return SEARCH_BACKENDS[name]


def search(
    queries: Tensor, database: Tensor, k: int, backend: str = "torch", **options
) -> tuple[Tensor, Tensor]:
    """Top-k search with the named backend ('torch', 'torch_shortlist' or 'faiss')."""
    return get_search_backend(backend)(queries, database, k, **options)


def similarity_matrix(queries: Tensor | np.ndarray, database: Tensor | np.ndarray) -> np.ndarray:
    """Global similarities X @ Q.T as float32 numpy (n, nq), the official layout."""
    return _as_float32_numpy(database) @ _as_float32_numpy(queries).T


def rank_by_similarity(similarity: np.ndarray) -> np.ndarray:
    """Rank matrix (n, nq) of db indices best first: the official ``np.argsort(-sim, axis=0)``."""
    return np.argsort(-similarity, axis=0)


def full_ranking(queries: Tensor | np.ndarray, database: Tensor | np.ndarray) -> np.ndarray:
    """Full ranking (n, nq) of the whole database for every query (revisitop evaluation input)."""
    return rank_by_similarity(similarity_matrix(queries, database))
