"""tools/benchmark.py rerank-eval: the ROxf stand-in and the phase-timed evaluation runs."""

from __future__ import annotations

import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from retrieval.benchmarks.rerank_eval import make_standin, parse_args, run, subset_gnd

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
            *("--opts", "TEST.RERANK_STREAMS", "2"),  # concurrent scoring threads
            *("--variant", "TEST.RERANK_STREAMS", "1", "TEST.RERANK_CACHE_DTYPE", "float16"),
        ]
    )
    assert out["shared_pass_used"] and out["lazy_equals_shared"]
    assert out["setup"]["opts"] == ["TEST.RERANK_STREAMS", "2"]
    runs = out["runs"]
    variant = "warm TEST.RERANK_STREAMS=1 TEST.RERANK_CACHE_DTYPE=float16"
    assert set(runs) == {"shared_cold", "shared_warm", variant, "global", "lazy_cold"}
    cold = runs["shared_cold"]["seconds"]
    assert set(cold) == {
        "extract_query",
        "extract_db",
        "extract_db_rerank_pyramids",
        "search",
        "rerank",
    }
    assert 0 < cold["extract_db_rerank_pyramids"] < cold["extract_db"]
    # the variant re-ranks the warm caches (no pyramid rebuilt) with one thread, to the same scores
    assert runs[variant]["seconds"]["extract_db_rerank_pyramids"] < 0.05 * cold["extract_db"]
    assert runs[variant]["rerank_pairs"] == runs["shared_cold"]["rerank_pairs"]
    assert out["variants"] == {
        variant: {"rerank_s": runs[variant]["seconds"]["rerank"], "max_map_difference": 0.0}
    }
    assert "rerank" not in runs["global"]["seconds"]
    assert runs["shared_cold"]["rerank_pairs"] == runs["lazy_cold"]["rerank_pairs"] > 0
    # the shared pass stores every database pyramid, the lazy path only the shortlisted ones
    assert runs["shared_cold"]["cache_bytes"] > runs["lazy_cold"]["cache_bytes"]
    assert out["rerank_cold_s"] == cold["rerank"] + cold["extract_db_rerank_pyramids"]
    assert out["standin"]["db_images"] == 12 and not (tmp_path / "w" / "data").exists()


def test_standin_images_have_the_real_sizes_and_hold_the_query_boxes(tmp_path) -> None:
    args = parse_args(
        [
            *("--gnd", str(DATA_DIR / "gnd_roxford5k.pkl"), "--sizes-dir", str(DATA_DIR)),
            *("--work", str(tmp_path), "--queries", "3", "--db-images", "8"),
            *("--size-divisor", "8", "--workers", "1"),
        ]
    )
    name, facts = make_standin(args, tmp_path)
    gnd = pickle.loads((tmp_path / name / f"gnd_{name}.pkl").read_bytes())
    sizes = {
        line.split(",")[0]: tuple(int(v) // 8 for v in line.split(",")[2:])
        for line in (DATA_DIR / "roxford5k_gallery_sizes.txt").read_text().split()
    }
    for image in gnd["imlist"]:
        height, width = cv2.imread(str(tmp_path / name / "jpg" / f"{image}.jpg")).shape[:2]
        assert (width, height) == sizes[f"jpg/{image}.jpg"]
    for image, entry in zip(gnd["qimlist"], gnd["gnd"]):
        height, width = cv2.imread(str(tmp_path / name / "jpg" / f"{image}.jpg")).shape[:2]
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert facts["queries"] == 3 and facts["db_images"] == 8


def test_a_foreign_work_folder_or_a_missing_input_is_refused(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    base = ["--gnd", str(DATA_DIR / "gnd_roxford5k.pkl"), "--sizes-dir", str(DATA_DIR)]
    with pytest.raises(SystemExit, match="not made by this benchmark"):
        run([*base, "--work", str(tmp_path)])
    assert (tmp_path / "mine.txt").read_text() == "user data"
    with pytest.raises(SystemExit):  # a --variant of a key without its value
        parse_args([*base, "--work", str(tmp_path / "w"), "--variant", "TEST.RERANK_STREAMS"])
    with pytest.raises(SystemExit):  # argparse: --sizes-dir holds no roxford5k_gallery_sizes.txt
        parse_args([*base[:2], "--sizes-dir", str(tmp_path), "--work", str(tmp_path / "w")])


def test_benchmark_tool_help_succeeds_and_a_wrong_name_fails() -> None:
    tool = [sys.executable, str(Path(__file__).parents[1] / "tools" / "benchmark.py")]
    shown = subprocess.run([*tool, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "rerank-eval" in shown.stdout
    wrong = subprocess.run([*tool, "rerank_eval"], capture_output=True, text=True, check=False)
    assert wrong.returncode != 0 and "NAME one of" in wrong.stderr


def test_results_name_the_cpu_and_its_bf16_support(monkeypatch) -> None:
    """CPU timings depend on the vector units: every results file says which CPU made them."""
    tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "benchmark.py"))
    monkeypatch.setattr("retrieval.precision.cpu_flags", lambda: frozenset({"avx512_bf16"}))
    record = tool["machine"]()
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["native_bf16_cpu"] is True and isinstance(record["cpu"], str)
