"""Re-ranking a global ranking: shortlists, score fusion and re-sorting inside the shortlist slots.

Two shortlist conventions (spec/eval_protocol.md section 5, spec/cvnet.md section 5):
* ``official`` (CVNet test code): per protocol, walk the global ranking, skip the query's junk,
  count an easy item for E and M, a hard item for M and H, any other item for all three; each
  protocol accepts its first K. This gives one re-ranked ranking per protocol (keys 'easy',
  'medium', 'hard'), each evaluated under its own protocol.
* ``label_free``: the top-K of the global ranking, one re-ranked ranking (key 'all') evaluated
  under all protocols.

Each (query, db item) pair is scored once: a query's shortlists for every protocol and every K share
one scoring of their union. The fused score is s_global + weight * s_rerank (CVNet: weight 0.5, not
a convex mix); the shortlisted ids are re-sorted by it and written back into the same rank slots,
all other slots keep their order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tqdm import tqdm

from retrieval.evaluation.metrics import PROTOCOLS, evaluate_revisitop, label_ids

LABEL_FREE_KEY = "all"


class Reranker(Protocol):
    """Anything that scores one query against database items (higher = more similar)."""

    def score(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        """Scores (len(db_indices),) of query ``query_index`` against the given database ids."""
        ...


@dataclass
class QueryShortlist:
    """One query's shortlists: key -> (ascending slot positions, db ids there); the ids to score."""

    slots: dict[str, tuple[np.ndarray, np.ndarray]]
    union: np.ndarray  # sorted unique db ids over all slots


def _shortlist(slots: dict[str, tuple[np.ndarray, np.ndarray]]) -> QueryShortlist:
    """Wrap slots with the sorted union of their ids."""
    return QueryShortlist(slots, np.unique(np.concatenate([ids for _, ids in slots.values()])))


def _official_query(column: np.ndarray, gnd_query: dict, k: int) -> QueryShortlist:
    """CVNet per-protocol shortlist of one ranking column (spec/cvnet.md section 5)."""
    keys = ("junk", "easy", "hard")
    # each protocol skips at most junk + easy + hard items, so this prefix always holds its first k
    head = column[: k + label_ids(gnd_query, keys).size]
    junk, easy, hard = (np.isin(head, label_ids(gnd_query, (key,))) for key in keys)
    accepts = {"easy": ~junk & ~hard, "medium": ~junk, "hard": ~junk & ~easy}
    positions = {protocol: np.flatnonzero(accepts[protocol])[:k] for protocol in PROTOCOLS}
    return _shortlist({protocol: (pos, head[pos]) for protocol, pos in positions.items()})


def official_shortlists(ranks: np.ndarray, gnd: list[dict], k: int) -> list[QueryShortlist]:
    """CVNet official shortlists of ranks (n, nq): per query the first k non-junk per protocol."""
    if ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks has {ranks.shape[1]} queries but the ground truth has {len(gnd)}")
    return [_official_query(ranks[:, i], gnd[i], k) for i in range(ranks.shape[1])]


def label_free_shortlists(ranks: np.ndarray, k: int) -> list[QueryShortlist]:
    """Top-k of every column of a (n, nq) rank matrix, under the single key 'all'."""
    positions = np.arange(min(k, ranks.shape[0]))
    return [
        _shortlist({LABEL_FREE_KEY: (positions, ranks[positions, i])})
        for i in range(ranks.shape[1])
    ]


ScoreTable = tuple[np.ndarray, np.ndarray]  # (sorted db ids, their re-rank scores) of one query


def _lookup(table: ScoreTable, ids: np.ndarray, query: int) -> np.ndarray:
    """Re-rank scores of ids from one query's score table (raises when an id was not scored)."""
    scored_ids, scores = table
    where = np.searchsorted(scored_ids, ids)
    if (where >= scored_ids.size).any() or not np.array_equal(scored_ids[where], ids):
        raise ValueError(f"query {query}: the re-rank scores do not cover every shortlisted db id")
    return scores[where]


def rerank(
    ranks: np.ndarray,
    global_sims: np.ndarray,
    shortlists: Sequence[QueryShortlist],
    rerank_scores: Sequence[ScoreTable],
    weight: float = 0.5,
) -> dict[str, np.ndarray]:
    """Re-sort each shortlist by s_global + weight * s_rerank in its slots: key -> ranks (n, nq).

    global_sims is (n_db, nq) (official layout ``X @ Q.T``); rerank_scores[i] covers query i's
    shortlisted ids.
    """
    out = {key: ranks.copy() for key in shortlists[0].slots}
    for query, (shortlist, table) in enumerate(zip(shortlists, rerank_scores)):
        for key, (positions, ids) in shortlist.slots.items():
            fused = global_sims[ids, query] + weight * _lookup(table, ids, query)
            out[key][positions, query] = ids[np.argsort(-fused, kind="stable")]
    return out


def _score_union(reranker: Reranker, per_k: Sequence[Sequence[QueryShortlist]]) -> list[ScoreTable]:
    """Score every query once against the union of its shortlists over all K."""
    tables = []
    for query in tqdm(range(len(per_k[0])), desc="rerank", leave=False):
        ids = np.unique(np.concatenate([shortlists[query].union for shortlists in per_k]))
        tables.append((ids, np.asarray(reranker.score(query, ids), dtype=np.float64)))
    return tables


SHORTLIST_BUILDERS: dict[
    str, Callable[[np.ndarray, list[dict] | None, int], list[QueryShortlist]]
] = {
    "official": official_shortlists,
    "label_free": lambda ranks, gnd, k: label_free_shortlists(ranks, k),
}


def rerank_top_k(
    ranks: np.ndarray,
    global_sims: np.ndarray,
    reranker: Reranker,
    k_list: Sequence[int],
    *,
    gnd: list[dict] | None = None,
    shortlist: str = "official",
    weight: float = 0.5,
) -> dict[int, dict[str, np.ndarray]]:
    """Re-rank for several K, scoring each (query, item) pair once: K -> key -> ranks (n, nq)."""
    if shortlist not in SHORTLIST_BUILDERS:
        raise ValueError(
            f"unknown shortlist {shortlist!r}; expected one of {sorted(SHORTLIST_BUILDERS)}"
        )
    if shortlist == "official" and gnd is None:
        raise ValueError("shortlist 'official' needs the revisitop gnd (junk/easy/hard labels)")
    per_k = [SHORTLIST_BUILDERS[shortlist](ranks, gnd, k) for k in k_list]
    tables = _score_union(reranker, per_k)
    return {
        k: rerank(ranks, global_sims, shortlists, tables, weight)
        for k, shortlists in zip(k_list, per_k)
    }


def evaluate_reranked(
    reranked: dict[str, np.ndarray], gnd: list[dict], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict]:
    """E/M/H results: per-protocol rankings under their own protocol, 'all' under every protocol."""
    if LABEL_FREE_KEY in reranked:
        return evaluate_revisitop(reranked[LABEL_FREE_KEY], gnd, kappas)
    return {
        protocol: evaluate_revisitop(reranked[protocol], gnd, kappas)[protocol]
        for protocol in PROTOCOLS
    }
