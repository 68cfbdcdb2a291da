"""tools/benchmark.py rerank-eval: the ROxf stand-in and the phase-timed evaluation runs."""

from __future__ import annotations

import pickle
from pathlib import Path

from retrieval.benchmarks.rerank_eval import run, subset_gnd

DATA_DIR = Path(__file__).parent / "data"

GND_KEYS = ("easy", "hard", "junk")


def test_subset_keeps_the_queries_labels_consistent() -> None:
    real = pickle.loads((DATA_DIR / "gnd_roxford5k.pkl").read_bytes())
    small = subset_gnd(real, 4, 60)
    assert len(small["qimlist"]) == len(small["gnd"]) == 4 and len(small["imlist"]) == 60
    for old, new in zip(real["gnd"][:4], small["gnd"]):
        assert new["bbx"] == old["bbx"]
        for key in GND_KEYS:
            kept = [real["imlist"][i] for i in old[key] if real["imlist"][i] in small["imlist"]]
            assert [small["imlist"][i] for i in new[key]] == kept
    assert any(entry["easy"] or entry["hard"] for entry in small["gnd"])
    assert subset_gnd(real, 0, 0)["imlist"] == real["imlist"]


def test_quick_run_times_every_phase_and_the_shared_pass_equals_the_lazy_path(tmp_path) -> None:
    out = run(
        [
            *("--gnd", str(DATA_DIR / "gnd_roxford5k.pkl"), "--sizes-dir", str(DATA_DIR)),
            *("--work", str(tmp_path / "w"), "--queries", "2", "--db-images", "12"),
            *("--size-divisor", "8", "--topk", "5", "--depth", "18", "--workers", "0"),
            "--lazy",
            "--global-run",
        ]
    )
    assert out["shared_pass_used"] and out["lazy_equals_shared"]
    runs = out["runs"]
    assert set(runs) == {"shared_cold", "shared_warm", "global", "lazy_cold"}
    cold = runs["shared_cold"]["seconds"]
    assert set(cold) == {
        "extract_query",
        "extract_db",
        "extract_db_rerank_pyramids",
        "search",
        "rerank",
    }
    assert 0 < cold["extract_db_rerank_pyramids"] < cold["extract_db"]
    assert "rerank" not in runs["global"]["seconds"]
    assert runs["shared_cold"]["rerank_pairs"] == runs["lazy_cold"]["rerank_pairs"] > 0
    # the shared pass stores every database pyramid, the lazy path only the shortlisted ones
    assert runs["shared_cold"]["cache_bytes"] > runs["lazy_cold"]["cache_bytes"]
    assert out["rerank_cold_s"] == cold["rerank"] + cold["extract_db_rerank_pyramids"]
    assert out["standin"]["db_images"] == 12 and not (tmp_path / "w" / "data").exists()
