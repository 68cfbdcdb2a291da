"""Tests of re-rank shortlists (official / label-free), fusion, slot re-sorting, score reuse."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.metrics import PROTOCOLS, evaluate_revisitop
from retrieval.evaluation.rerank import (
    LABEL_FREE_KEY,
    evaluate_reranked,
    label_free_shortlists,
    official_shortlists,
    rerank,
    rerank_top_k,
)

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def roxford() -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Real ROxf gnd, random global similarities (n_db, nq) and their ranking (labels boosted)."""
    with open(DATA_DIR / "gnd_roxford5k.pkl", "rb") as f:
        gnd = pickle.load(f)["gnd"]
    rng = np.random.default_rng(0)
    sims = rng.random((4993, len(gnd)))
    for i, g in enumerate(gnd):
        sims[g["easy"] + g["hard"] + g["junk"], i] += (
            0.5  # labelled items crowd the top, as in real rankings
        )
    return gnd, sims, np.argsort(-sims, axis=0)


def _walk(column: np.ndarray, g: dict, k: int) -> dict[str, list[int]]:
    """The official walk as a loop: skip junk, per-protocol counters, stop when all reach k."""
    accepted = {p: [] for p in PROTOCOLS}
    junk, easy, hard = set(g["junk"]), set(g["easy"]), set(g["hard"])
    for position, item in enumerate(column.tolist()):
        if all(len(v) == k for v in accepted.values()):
            break
        if item in junk:
            continue
        counts_for = (
            ("easy", "medium")
            if item in easy
            else ("medium", "hard")
            if item in hard
            else PROTOCOLS
        )
        for protocol in counts_for:
            if len(accepted[protocol]) < k:
                accepted[protocol].append(position)
    return accepted


class CountingReranker:
    """Fake reranker: a fixed random score per (query, db id), recording every call."""

    def __init__(self, n_db: int, nq: int):
        self.table = np.random.default_rng(1).random((n_db, nq))
        self.calls: list[tuple[int, np.ndarray]] = []

    def score(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        self.calls.append((query_index, db_indices))
        return self.table[db_indices, query_index]


def test_official_shortlists_follow_the_walk_and_skip_junk(roxford):
    gnd, _, ranks = roxford
    shortlists = official_shortlists(ranks, gnd, k=100)
    for i, (g, shortlist) in enumerate(zip(gnd, shortlists)):
        expected = _walk(ranks[:, i], g, 100)
        for protocol in PROTOCOLS:
            positions, ids = shortlist.slots[protocol]
            assert positions.tolist() == expected[protocol] and len(ids) == 100
            np.testing.assert_array_equal(ids, ranks[positions, i])
            assert not set(ids) & set(g["junk"])
        assert not set(shortlist.slots["easy"][1]) & set(g["hard"])
        assert not set(shortlist.slots["hard"][1]) & set(g["easy"])
        union = set().union(*(set(ids) for _, ids in shortlist.slots.values()))
        assert shortlist.union.tolist() == sorted(union)


def test_official_equals_label_free_without_labels(roxford):
    _, _, ranks = roxford
    empty = [{"easy": [], "hard": [], "junk": []}] * ranks.shape[1]
    for official, free in zip(
        official_shortlists(ranks, empty, 30), label_free_shortlists(ranks, 30)
    ):
        for protocol in PROTOCOLS:
            for got, want in zip(official.slots[protocol], free.slots[LABEL_FREE_KEY]):
                np.testing.assert_array_equal(got, want)


def test_fusion_resorts_inside_the_same_slots(roxford):
    gnd, sims, ranks = roxford
    shortlists = official_shortlists(ranks, gnd, k=20)
    reranker = CountingReranker(*sims.shape)
    tables = [(s.union, reranker.score(i, s.union)) for i, s in enumerate(shortlists)]
    reranked = rerank(ranks, sims, shortlists, tables, weight=0.5)
    for i, shortlist in enumerate(shortlists):
        for protocol, (positions, ids) in shortlist.slots.items():
            column = reranked[protocol][:, i]
            fused = sims[column[positions], i] + 0.5 * reranker.table[column[positions], i]
            assert np.all(np.diff(fused) <= 0)  # sorted by s_global + 0.5 s_rerank
            assert sorted(column[positions]) == sorted(ids)  # same items in the same slots
            others = np.setdiff1d(np.arange(len(column)), positions)
            np.testing.assert_array_equal(column[others], ranks[others, i])


def test_missing_rerank_scores_raise(roxford):
    gnd, sims, ranks = roxford
    shortlists = label_free_shortlists(ranks, 5)
    tables = [(s.union[1:], np.zeros(4)) for s in shortlists]
    with pytest.raises(ValueError, match="query 0"):
        rerank(ranks, sims, shortlists, tables)


def test_rerank_top_k_scores_each_pair_once_and_reuses_scores(roxford):
    gnd, sims, ranks = roxford
    reranker = CountingReranker(*sims.shape)
    results = rerank_top_k(ranks, sims, reranker, [10, 50], gnd=gnd)
    assert [q for q, _ in reranker.calls] == list(range(len(gnd)))  # one call per query
    big = official_shortlists(ranks, gnd, 50)
    for (_, ids), shortlist in zip(reranker.calls, big):
        np.testing.assert_array_equal(ids, shortlist.union)  # K=10 lists are inside the K=50 union
    for k in (10, 50):
        shortlists = official_shortlists(ranks, gnd, k)
        tables = [(s.union, reranker.table[s.union, i]) for i, s in enumerate(shortlists)]
        alone = rerank(ranks, sims, shortlists, tables)
        for protocol in PROTOCOLS:
            np.testing.assert_array_equal(results[k][protocol], alone[protocol])


def test_label_free_ranking_is_evaluated_under_every_protocol(roxford):
    gnd, sims, ranks = roxford
    reranker = CountingReranker(*sims.shape)
    reranked = rerank_top_k(ranks, sims, reranker, [40], shortlist="label_free")[40]
    assert list(reranked) == [LABEL_FREE_KEY]
    evaluated = evaluate_reranked(reranked, gnd)
    direct = evaluate_revisitop(reranked[LABEL_FREE_KEY], gnd)
    assert {p: evaluated[p]["map"] for p in PROTOCOLS} == {p: direct[p]["map"] for p in PROTOCOLS}


def test_official_rankings_are_evaluated_under_their_own_protocol(roxford):
    gnd, sims, ranks = roxford
    reranked = rerank_top_k(ranks, sims, CountingReranker(*sims.shape), [100], gnd=gnd)[100]
    evaluated = evaluate_reranked(reranked, gnd)
    for protocol in PROTOCOLS:
        assert (
            evaluated[protocol]["map"]
            == evaluate_revisitop(reranked[protocol], gnd)[protocol]["map"]
        )
    with pytest.raises(ValueError, match="needs the revisitop gnd"):
        rerank_top_k(ranks, sims, CountingReranker(*sims.shape), [10])
    with pytest.raises(ValueError, match="unknown shortlist"):
        rerank_top_k(ranks, sims, CountingReranker(*sims.shape), [10], shortlist="top")
