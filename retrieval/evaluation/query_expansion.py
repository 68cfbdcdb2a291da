"""alpha-weighted query expansion (alphaQE) and database-side augmentation (alphaDBA).

alphaQE, CVNet supplementary Eq. (S1) (Radenovic et al., TPAMI 2018):
    d'_q = (d_q + sum_{i=1..n} w_i d_i) / (1 + sum_{i=1..n} w_i),  w_i = max(d_q . d_i, 0)^alpha,
then L2-normalized. A negative similarity is clamped to 0 before the power (a fractional power of a
negative number is undefined; such a neighbour is dissimilar and gets no weight). With alpha = 0
every neighbour gets weight 1 (torch defines 0^0 = 1), i.e. average query expansion.
alphaDBA applies the same weighted mean to every database vector with its top-n database neighbours
(itself excluded: it already enters with weight 1). CVNet's tuned setting is n = 5, alpha = 2.0
(supplementary S2.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from retrieval.evaluation.search import DEFAULT_CHUNK_BYTES, knn


def _expand(anchors: Tensor, neighbours: Tensor, alpha: float) -> Tensor:
    """Eq. (S1): anchors (m, d), their neighbours (m, n, d) -> normalized weighted means (m, d)."""
    weights = torch.einsum("md,mnd->mn", anchors, neighbours).clamp_min(0).pow(alpha)  # (m, n)
    summed = anchors + torch.einsum("mn,mnd->md", weights, neighbours)  # (m, d)
    return F.normalize(summed / (1 + weights.sum(dim=1, keepdim=True)), dim=1)


@torch.no_grad()
def alpha_query_expansion(
    queries: Tensor, database: Tensor, neighbours: Tensor, n: int, alpha: float
) -> Tensor:
    """alphaQE of queries (nq, d) with their top-n db neighbours (nq, >= n), best first -> (nq, d).

    ``neighbours`` is the index output of a search (e.g. ``knn``); from a revisitop rank matrix
    (n_db, nq) pass
    ``torch.as_tensor(ranks[:n].T)``.
    """
    if not 0 <= n <= neighbours.shape[1]:
        raise ValueError(
            f"alphaQE n={n} must be in [0, {neighbours.shape[1]}] (neighbours given per query)"
        )
    top = neighbours[:, :n].to(database.device)
    return _expand(queries, database[top].to(queries), alpha)  # (nq, n, d) neighbour vectors


def _drop_self(indices: Tensor, own: Tensor, n: int) -> Tensor:
    """First n neighbours (b, n) per row of indices (b, n + 1) other than the row's own id (b,)."""
    is_self = indices == own[:, None]
    order = torch.argsort(
        is_self.to(torch.int8), dim=1, stable=True
    )  # self moved to the end, others keep order
    return indices.gather(1, order[:, :n])


@torch.no_grad()
def alpha_database_augmentation(
    database: Tensor,
    n: int,
    alpha: float,
    *,
    batch_size: int = 4096,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    device: torch.device | str | None = None,
) -> Tensor:
    """alphaDBA: each db vector (n_db, d) replaced by Eq. (S1) over its top-n other vectors."""
    if not 0 <= n < database.shape[0]:
        raise ValueError(
            f"alphaDBA n={n} must be in [0, database size - 1 = {database.shape[0] - 1}]"
        )
    if n == 0:
        return F.normalize(database, dim=1)
    out = torch.empty_like(database)
    for start in tqdm(range(0, database.shape[0], batch_size), desc="alphaDBA", leave=False):
        block = database[start : start + batch_size]  # (b, d)
        _, indices = knn(block, database, n + 1, max_chunk_bytes=max_chunk_bytes, device=device)
        own = torch.arange(start, start + len(block), device=indices.device)
        top = _drop_self(indices, own, n).to(database.device)  # (b, n)
        out[start : start + len(block)] = _expand(block, database[top], alpha)
    return out
