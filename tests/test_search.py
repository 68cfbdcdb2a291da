"""Tests of exact / certified-shortlist / faiss top-k search and the full revisitop ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.evaluation.search import (
    SEARCH_BACKENDS,
    full_ranking,
    knn,
    search,
    shortlist_search,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random L2-normalized rows."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _brute_force(
    queries: torch.Tensor, database: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy reference: scores and indices (nq, k), best first."""
    scores = queries.double().numpy() @ database.double().numpy().T
    indices = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, indices, axis=1), indices


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 50, 299, 300, 1000])
def test_knn_matches_brute_force_across_chunk_boundaries(rows_per_chunk, device):
    queries, database = _unit(5, 16, seed=1), _unit(300, 16, seed=2)
    chunk_bytes = rows_per_chunk * (16 * 4 + 5 * 4)  # what _rows_per_chunk charges per database row
    scores, indices = knn(queries, database, 20, max_chunk_bytes=chunk_bytes, device=device)
    ref_scores, ref_indices = _brute_force(queries, database, 20)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_indices)
    np.testing.assert_allclose(scores.cpu().numpy(), ref_scores, atol=1e-6)


def test_knn_returns_whole_database_when_k_equals_n(device):
    queries, database = _unit(3, 8, seed=3), _unit(10, 8, seed=4)
    _, indices = knn(queries, database, 10, max_chunk_bytes=64, device=device)
    np.testing.assert_array_equal(indices.cpu().numpy(), _brute_force(queries, database, 10)[1])


@pytest.mark.parametrize("backend", sorted(SEARCH_BACKENDS))
def test_every_backend_rejects_bad_k_and_shapes(backend):
    queries, database = _unit(2, 8), _unit(5, 8)
    with pytest.raises(ValueError, match="k=6"):
        search(queries, database, 6, backend=backend)
    with pytest.raises(ValueError, match="k=0"):
        search(queries, database, 0, backend=backend)
    with pytest.raises(ValueError, match="expected queries"):
        search(queries, _unit(5, 9), 1, backend=backend)


def test_unknown_backend_lists_the_allowed_names():
    with pytest.raises(ValueError, match="'faiss', 'torch', 'torch_shortlist'"):
        search(_unit(1, 4), _unit(3, 4), 1, backend="annoy")


@pytest.mark.parametrize("backend", sorted(SEARCH_BACKENDS))
def test_every_backend_agrees_with_brute_force(backend):
    queries, database = _unit(6, 64, seed=5), _unit(2000, 64, seed=6)
    scores, indices = search(queries, database, 25, backend=backend, max_chunk_bytes=64 * 1024)
    ref_scores, ref_indices = _brute_force(queries, database, 25)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)


def test_shortlist_is_certified_without_fallback_on_separated_scores(device):
    queries, database = _unit(8, 256, seed=7), _unit(5000, 256, seed=8)
    result = shortlist_search(queries, database, 10, max_chunk_bytes=256 * 1024, device=device)
    assert result.n_exact_fallback == 0 and result.shortlist_size == 40
    exact_scores, exact_indices = knn(queries, database, 10, device=device)
    np.testing.assert_array_equal(result.indices.cpu().numpy(), exact_indices.cpu().numpy())
    np.testing.assert_allclose(result.scores.cpu().numpy(), exact_scores.cpu().numpy(), atol=1e-6)


def _near_ties(n_close: int, n_far: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A query along e0, n_far lower items, then n_close items tied below bf16/fp16 resolution."""
    query = torch.zeros(1, dim, dtype=torch.float64)
    query[0, 0] = 1.0
    generator = torch.Generator().manual_seed(9)
    # distinct scores 1e-6 apart: resolved by fp32, all inside one bf16 / fp16 rounding interval
    # (~4e-3 / ~5e-4)
    cosines = 0.8 + 1e-6 * torch.randperm(n_close, generator=generator).double()
    other = F.normalize(
        torch.randn(n_close, dim - 1, generator=generator, dtype=torch.float64), dim=1
    )
    close = torch.cat([cosines[:, None], other * (1 - cosines[:, None] ** 2).sqrt()], dim=1)
    far = _unit(n_far, dim, seed=10).double() * 0.5  # scores well below 0.8 (norm 0.5)
    return query.float(), torch.cat([far, close]).float()


def test_shortlist_falls_back_to_exact_on_adversarial_near_ties(device):
    queries, database = _near_ties(n_close=400, n_far=600, dim=32)
    result = shortlist_search(queries, database, 10, device=device)
    assert (
        result.n_exact_fallback == 1
    )  # 400 items tie in low precision, far beyond the 40-item shortlist
    _, exact_indices = knn(queries, database, 10, device=device)
    np.testing.assert_array_equal(result.indices.cpu().numpy(), exact_indices.cpu().numpy())
    assert (result.indices >= 600).all()


def test_full_ranking_is_the_official_argsort():
    queries, database = _unit(4, 12, seed=11), _unit(50, 12, seed=12)
    ranks = full_ranking(queries, database)
    sim = database.numpy() @ queries.numpy().T
    assert ranks.shape == (50, 4)
    np.testing.assert_array_equal(ranks, np.argsort(-sim, axis=0))


@pytest.mark.gpu
def test_shortlist_on_cuda_matches_exact():
    queries, database = _unit(16, 512, seed=13), _unit(20000, 512, seed=14)
    result = shortlist_search(queries, database.to("cuda"), 50, device="cuda")
    _, exact_indices = knn(queries, database.to("cuda"), 50, device="cuda")
    assert result.n_exact_fallback == 0
    np.testing.assert_array_equal(result.indices.cpu().numpy(), exact_indices.cpu().numpy())
