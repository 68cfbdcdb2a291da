"""Tests of alphaQE (CVNet supplementary Eq. S1) and alphaDBA: hand computations, a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.evaluation.query_expansion import alpha_database_augmentation, alpha_query_expansion
from retrieval.evaluation.search import knn

QUERY = torch.tensor([[1.0, 0.0, 0.0]])
DATABASE = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_alpha_qe_hand_computation():
    expanded = alpha_query_expansion(QUERY, DATABASE, torch.tensor([[0, 1, 2]]), n=2, alpha=2.0)
    # weights 0.8^2 = 0.64 and 0.6^2 = 0.36: (q + 0.64 d0 + 0.36 d1) / 2
    numerator = torch.tensor([1 + 0.64 * 0.8 + 0.36 * 0.6, 0.64 * 0.6, 0.36 * 0.8]) / 2.0
    torch.testing.assert_close(expanded[0], numerator / numerator.norm())


def test_alpha_qe_gives_negative_neighbours_zero_weight():
    two = alpha_query_expansion(QUERY, DATABASE, torch.tensor([[0, 1, 2]]), n=2, alpha=2.0)
    three = alpha_query_expansion(QUERY, DATABASE, torch.tensor([[0, 1, 2]]), n=3, alpha=2.0)
    torch.testing.assert_close(two, three)  # d2 has cosine -1: clamped to 0, no contribution


def test_alpha_zero_is_average_qe_and_n_zero_keeps_the_query():
    averaged = alpha_query_expansion(QUERY, DATABASE, torch.tensor([[0, 3]]), n=2, alpha=0.0)
    mean = (QUERY[0] + DATABASE[0] + DATABASE[3]) / 3
    torch.testing.assert_close(averaged[0], mean / mean.norm())
    kept = alpha_query_expansion(QUERY * 2, DATABASE, torch.tensor([[0, 3]]), n=0, alpha=3.0)
    torch.testing.assert_close(kept, QUERY)
    with pytest.raises(ValueError, match="n=3"):
        alpha_query_expansion(QUERY, DATABASE, torch.tensor([[0, 3]]), n=3, alpha=3.0)


def _loop_expand(anchor: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. (S1) for one vector, written as a plain loop in float64."""
    total, weight_sum = anchor.copy(), 1.0
    for vector in neighbours:
        weight = max(float(anchor @ vector), 0.0) ** alpha
        total += weight * vector
        weight_sum += weight
    expanded = total / weight_sum
    return expanded / np.linalg.norm(expanded)


def test_alpha_qe_with_knn_neighbours_matches_loop():
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(4, 16, generator=generator), dim=1)
    database = F.normalize(torch.randn(40, 16, generator=generator), dim=1)
    _, neighbours = knn(queries, database, 7)
    expanded = alpha_query_expansion(queries, database, neighbours, n=5, alpha=3.0)
    for i in range(4):
        ref = _loop_expand(
            queries[i].double().numpy(), database[neighbours[i, :5]].double().numpy(), 3.0
        )
        np.testing.assert_allclose(expanded[i].numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 64])
def test_alpha_dba_matches_loop_with_self_excluded(batch_size):
    generator = torch.Generator().manual_seed(1)
    database = F.normalize(torch.randn(20, 8, generator=generator), dim=1)
    augmented = alpha_database_augmentation(database, n=3, alpha=2.0, batch_size=batch_size)
    x = database.double().numpy()
    for i in range(20):
        others = np.argsort(-(x @ x[i]))
        others = others[others != i][:3]
        np.testing.assert_allclose(
            augmented[i].numpy(), _loop_expand(x[i], x[others], 2.0), atol=1e-6
        )


def test_alpha_dba_excludes_self_but_keeps_a_duplicate():
    database = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    augmented = alpha_database_augmentation(database, n=2, alpha=1.0)
    # row 0: neighbours are its duplicate (weight 1) and [0.6, 0.8] (weight 0.6); keeping itself as
    # a neighbour would give the duplicate pair instead (a + a + a)
    expected = torch.tensor([1.0 + 1.0 + 0.36, 0.48])
    torch.testing.assert_close(augmented[0], expected / expected.norm())
    torch.testing.assert_close(augmented[1], expected / expected.norm())
