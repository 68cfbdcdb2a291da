"""Tests of the revisitop E/M/H evaluator and GLDv2 mAP@k: hand values, independent reference."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.metrics import (
    PROTOCOLS,
    compute_map,
    evaluate_revisitop,
    gldv2_map_at_k,
    revisitop_protocols,
)

DATA_DIR = Path(__file__).parent / "data"


def reference_map(ranks: np.ndarray, gnd_protocol: list[dict], kappas=(1, 5, 10)):
    """Plain per-query loop from spec/eval_protocol.md section 3 (sets, no vectorization)."""
    aps, prs = [], []
    for i, g in enumerate(gnd_protocol):
        ok, junk = set(np.asarray(g["ok"]).tolist()), set(np.asarray(g["junk"]).tolist())
        if not ok:
            aps.append(np.nan)
            prs.append([np.nan] * len(kappas))
            continue
        positive_ranks, n_junk = [], 0
        for position, item in enumerate(ranks[:, i].tolist()):
            if item in junk:
                n_junk += 1
            elif item in ok:
                positive_ranks.append(position - n_junk)
        ap = 0.0
        for j, r in enumerate(positive_ranks):
            before = 1.0 if r == 0 else j / r
            ap += (before + (j + 1) / (r + 1)) / 2 / len(ok)
        aps.append(ap)
        one_based = [r + 1 for r in positive_ranks]
        row = []
        for k in kappas:
            cut = min(one_based[-1], k) if one_based else 0
            row.append(sum(r <= cut for r in one_based) / cut if cut else 0.0)
        prs.append(row)
    aps, prs = np.array(aps), np.array(prs)
    valid = ~np.isnan(aps)
    return aps[valid].mean(), aps, prs[valid].mean(axis=0), prs


@pytest.fixture(scope="module", params=["roxford5k", "rparis6k"])
def dataset(request) -> dict:
    """The real revisitop ground truth (bundled copy)."""
    with open(DATA_DIR / f"gnd_{request.param}.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def roxford() -> dict:
    """The real ROxf ground truth."""
    with open(DATA_DIR / "gnd_roxford5k.pkl", "rb") as f:
        return pickle.load(f)


def _ranking_with_first(first: list[np.ndarray], n_db: int) -> np.ndarray:
    """Rank matrix (n_db, nq) with first[i] on top of column i, then the other ids ascending."""
    columns = []
    for head in first:
        rest = np.setdiff1d(np.arange(n_db), head)
        columns.append(np.concatenate([head, rest]))
    return np.stack(columns, axis=1)


def test_protocols_follow_definition(roxford):
    gnd = roxford["gnd"]
    protocols = revisitop_protocols(gnd)
    for g, e, m, h in zip(gnd, protocols["easy"], protocols["medium"], protocols["hard"]):
        assert set(e["ok"]) == set(g["easy"]) and set(e["junk"]) == set(g["junk"]) | set(g["hard"])
        assert set(m["ok"]) == set(g["easy"]) | set(g["hard"]) and set(m["junk"]) == set(g["junk"])
        assert set(h["ok"]) == set(g["hard"]) and set(h["junk"]) == set(g["junk"]) | set(g["easy"])
    no_easy = [roxford["qimlist"][i] for i, e in enumerate(protocols["easy"]) if e["ok"].size == 0]
    assert sorted(no_easy) == ["balliol_000187", "hertford_000082"]


def test_perfect_ranking_scores_one_and_easy_skips_two_queries(roxford):
    gnd, n_db = roxford["gnd"], len(roxford["imlist"])
    # easy ids first, then hard: perfect for Easy and Medium, and for Hard once the easy ones
    # (junk there) are removed
    ranks = _ranking_with_first([np.array(g["easy"] + g["hard"], dtype=int) for g in gnd], n_db)
    results = evaluate_revisitop(ranks, gnd)
    for protocol in PROTOCOLS:
        assert results[protocol]["map"] == pytest.approx(1.0)
        assert all(v == pytest.approx(1.0) for v in results[protocol]["mp@k"].values())
    assert np.isnan(results["easy"]["aps"]).sum() == 2  # skipped, not counted as 0 (else 68/70)
    assert not np.isnan(results["hard"]["aps"]).any()


def test_hand_built_ap_and_precision():
    gnd = [{"ok": [10, 11, 12], "junk": [20, 21]}]
    plain = np.array(
        [[10, 0, 11, 1, 2, 3]]
    ).T  # positives at 0-based ranks 0 and 2, one never retrieved
    with_junk = np.array([[20, 10, 0, 21, 11, 1, 2, 3]]).T  # same after removing junk
    expected_ap = (1 / 3) * ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2)  # = 19/36
    for ranks in (plain, with_junk):
        mean_ap, aps, mpr, prs = compute_map(ranks, gnd)
        assert mean_ap == pytest.approx(expected_ap) and aps[0] == pytest.approx(19 / 36)
        np.testing.assert_allclose(
            mpr, [1.0, 2 / 3, 2 / 3]
        )  # k capped by the last positive (rank 3)


def test_precision_cap_by_last_positive():
    gnd = [{"ok": [5, 6], "junk": []}]
    _, _, mpr, _ = compute_map(np.array([[5, 6, 0, 1, 2, 3, 4, 7, 8, 9, 10]]).T, gnd)
    np.testing.assert_allclose(mpr, [1.0, 1.0, 1.0])  # 2 positives at ranks 1-2 score 1.0 at k=10


def test_truncated_ranking_drops_unretrieved_positives():
    gnd = [{"ok": [7, 8], "junk": []}]
    full = np.array([[7, 0, 1, 2, 3, 8]]).T
    assert compute_map(full, gnd)[0] == pytest.approx(0.5 + (1 / 5 + 2 / 6) / 4)
    assert compute_map(full[:3], gnd)[0] == pytest.approx(0.5)
    mean_ap, _, mpr, _ = compute_map(full[1:5], gnd)  # no positive retrieved at all
    assert mean_ap == 0.0 and np.all(mpr == 0.0)


def test_order_among_tied_positives_is_irrelevant_but_demoting_one_costs():
    gnd = [{"ok": [3, 4], "junk": [9]}]
    base = compute_map(np.array([[3, 9, 4, 0, 1]]).T, gnd)[0]
    assert compute_map(np.array([[4, 9, 3, 0, 1]]).T, gnd)[0] == base
    assert compute_map(np.array([[3, 9, 0, 4, 1]]).T, gnd)[0] < base


def _random_rankings(gnd: list[dict], n_db: int, n_extra: int, seed: int) -> np.ndarray:
    """Column i: permutation of n_db + n_extra ids (extras = +1M distractors), positives boosted."""
    rng = np.random.default_rng(seed)
    columns = []
    for g in gnd:
        scores = rng.random(n_db + n_extra)
        scores[np.array(g["easy"] + g["hard"], dtype=int)] += rng.random() * 0.5
        columns.append(np.argsort(-scores))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("n_rows", [None, 300])
def test_matches_reference_loop_on_random_rankings(dataset, n_rows):
    gnd, n_db = dataset["gnd"], len(dataset["imlist"])
    ranks = _random_rankings(gnd, n_db, n_extra=500, seed=0)[:n_rows]
    evaluated = evaluate_revisitop(ranks, gnd)
    for protocol, gnd_protocol in revisitop_protocols(gnd).items():
        ours, ref = compute_map(ranks, gnd_protocol), reference_map(ranks, gnd_protocol)
        assert ours[0] == pytest.approx(ref[0], abs=1e-12)
        np.testing.assert_allclose(ours[1], ref[1], atol=1e-12)
        np.testing.assert_allclose(ours[2], ref[2], atol=1e-12)
        np.testing.assert_allclose(ours[3], ref[3], atol=1e-12)
        assert evaluated[protocol]["map"] == pytest.approx(ref[0], abs=1e-12)
        np.testing.assert_allclose(list(evaluated[protocol]["mp@k"].values()), ref[2], atol=1e-12)


def test_negative_ids_are_rejected():
    with pytest.raises(ValueError, match="negative db id"):
        compute_map(np.array([[-1, 0, 1]]).T, [{"ok": [1], "junk": []}])


def test_gldv2_hand_examples_with_duplicates():
    solution = {"q1": {"a", "c"}, "q2": {"x"}, "q3": {"z"}}
    predictions = {"q1": ["a", "b", "a", "c"], "q2": ["y", "x", "x"], "ignored": ["z"]}
    q1 = (1 / 1 + 2 / 4) / 2  # the duplicate "a" is skipped but keeps rank 3
    q2 = 1 / 2
    assert gldv2_map_at_k(predictions, solution) == pytest.approx((q1 + q2 + 0.0) / 3)
    assert gldv2_map_at_k(predictions, solution, k=2) == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_gldv2_normalizes_by_min_of_truth_and_k_and_accepts_lists():
    truth = {0: set(range(150))}
    assert gldv2_map_at_k([list(range(100))], truth) == pytest.approx(1.0)
    assert gldv2_map_at_k([list(range(100))], {0: set(range(50))}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no ground truth"):
        gldv2_map_at_k({0: [1]}, {0: set()})
