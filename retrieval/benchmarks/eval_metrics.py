"""Benchmark: vectorized revisitop E/M/H evaluation vs the per-query reference loop, +1M-sized.

The ranking places the 4,993 ROxf database ids (positives boosted, so mAP is not ~0) at random
positions among n_ranked ids; ids >= n_db are distractors, as in the +1M protocol. Both evaluators
must return the same mAP and mP@k; the result reports both times and their ratio.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np

from retrieval.evaluation.metrics import PROTOCOLS, evaluate_revisitop, revisitop_protocols

DEFAULT_GND = Path(__file__).resolve().parents[2] / "tests" / "data" / "gnd_roxford5k.pkl"


def reference_compute_map(
    ranks: np.ndarray, gnd_protocol: list[dict], kappas=(1, 5, 10)
) -> tuple[float, np.ndarray]:
    """The revisitop loop (np.isin per query, junk shift loop, trapezoidal AP): mAP and mP@k."""
    total_ap, total_pr, n_valid = 0.0, np.zeros(len(kappas)), 0
    for i, g in enumerate(gnd_protocol):
        if len(g["ok"]) == 0:
            continue
        n_valid += 1
        positions = np.arange(ranks.shape[0])[np.isin(ranks[:, i], g["ok"])]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], g["junk"])]
        shift, j = 0, 0
        for p in range(len(positions)):
            while j < len(junk) and positions[p] > junk[j]:
                shift, j = shift + 1, j + 1
            positions[p] -= shift
        for index, rank in enumerate(positions):
            before = 1.0 if rank == 0 else index / rank
            total_ap += (before + (index + 1) / (rank + 1)) / 2 / len(g["ok"])
        one_based = positions + 1
        for c, kappa in enumerate(kappas):
            cut = min(one_based.max(), kappa) if one_based.size else 0
            total_pr[c] += (one_based <= cut).sum() / cut if cut else 0.0
    return total_ap / n_valid, total_pr / n_valid


def make_ranking(gnd: list[dict], n_db: int, n_ranked: int, seed: int) -> np.ndarray:
    """Rank matrix (n_ranked, nq): db ids (positives boosted) in the top 2 * n_db, distractors."""
    rng = np.random.default_rng(seed)
    ranks = np.empty((n_ranked, len(gnd)), dtype=np.int64)
    window = min(n_ranked, 2 * n_db)  # about half of the top 2 * n_db are distractors
    for i, g in enumerate(gnd):
        scores = rng.random(n_db)
        scores[np.asarray(g["easy"] + g["hard"], dtype=np.int64)] += 0.7
        slots = np.sort(rng.choice(window, n_db, replace=False))
        is_db = np.zeros(n_ranked, dtype=bool)
        is_db[slots] = True
        ranks[is_db, i] = np.argsort(-scores)
        ranks[~is_db, i] = n_db + rng.permutation(n_ranked - n_db)
    return ranks


def _timed(fn, *args):
    """Result and wall seconds of fn(*args)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def run(argv: list[str]) -> dict:
    """Time both evaluators on the same ranking, assert equal values, return the numbers."""
    parser = argparse.ArgumentParser(prog="eval-metrics", description=__doc__)
    parser.add_argument("--gnd", type=Path, default=DEFAULT_GND, help="revisitop gnd pickle")
    parser.add_argument(
        "--n-ranked", type=int, default=1_000_000, help="length of every ranking column"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.gnd, "rb") as f:
        data = pickle.load(f)
    gnd, n_db = data["gnd"], len(data["imlist"])
    ranks = make_ranking(gnd, n_db, max(args.n_ranked, n_db), args.seed)
    ours, ours_s = _timed(evaluate_revisitop, ranks, gnd)
    protocols = revisitop_protocols(gnd)
    reference, reference_s = _timed(
        lambda: {p: reference_compute_map(ranks, protocols[p]) for p in PROTOCOLS}
    )
    for protocol in PROTOCOLS:
        np.testing.assert_allclose(
            ours[protocol]["map"], reference[protocol][0], rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            list(ours[protocol]["mp@k"].values()), reference[protocol][1], atol=1e-12
        )
    return {
        "n_queries": len(gnd),
        "n_ranked": int(ranks.shape[0]),
        "n_db": n_db,
        "map": {p: ours[p]["map"] for p in PROTOCOLS},
        "mp@k": {p: {str(k): v for k, v in ours[p]["mp@k"].items()} for p in PROTOCOLS},
        "ours_s": ours_s,
        "reference_s": reference_s,
        "speedup": reference_s / ours_s,
    }
