"""tools/benchmark.py rerank-mix: the real-size mix of ROxf, by scoring threads (tiny CPU run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.benchmarks.rerank_mix import parse_args, run

DATA_DIR = Path(__file__).parent / "data"
BASE = ["--gnd", str(DATA_DIR / "gnd_roxford5k.pkl"), "--sizes-dir", str(DATA_DIR)]


def test_tiny_run_reports_every_part_and_equal_scores_across_threads() -> None:
    out = run(
        [
            *BASE,
            *("--depth", "18", "--db-images", "12", "--queries", "2", "--topk", "4"),
            *("--size-divisor", "8", "--batches", "1,8", "--profile", "2", "--streams", "2"),
        ]
    )
    assert set(out["batch_sweep"]) == {"fp32_b1", "fp32_b8", "bf16_b8"}
    assert all(v["ms_pair"] > 0 for v in out["batch_sweep"].values())
    assert len(out["profile_fp32_b16"]) == 2
    assert out["cache"]["item_bytes"] > 0 and out["cache"]["get_from_disk_ms"] > 0
    assert set(out["mix"]) == {"pad1", "pad4"}
    profiled = out["mix_profile"]  # set P, one thread, exact grids, cold then warm
    assert profiled["pad_multiple"] == 1 and profiled["pairs"] == 8
    for phase in ("cold", "warm"):
        assert profiled[phase]["wall_ms"] > 0 and len(profiled[phase]["top_host_ops"]) == 2
        assert profiled[phase]["device_busy_ms"] == 0  # nothing runs on a device on the CPU
        assert profiled[phase]["top_host_ops"][0]["self_cpu_ms"] > 0
    for mix in out["mix"].values():
        for name, first, second in (("A", 1, 2), ("B", 2, 1)):
            for key in ("cold", "warm", "disk"):
                assert mix[f"{name}_threads{first}_{key}_ms_pair"] > 0
            assert mix[f"{name}_threads{second}_after_ms_pair"] > 0
            assert mix[f"{name}_max_abs_threads_diff"] <= 1e-6
        assert mix["setup"]["pairs_per_run"] == 8
        sets = mix["setup"]["query_sizes_wh"]
        assert sets["A"] != sets["B"] != sets["P"] != sets["A"]
    assert out["setup"]["memory_mb"] == "4096"  # automatic on the CPU
    exact, padded = out["shapes"]["pad1"], out["shapes"]["pad4"]
    # two streams share the 4096 MiB: ROxf's larger pairs then come in smaller batches
    assert out["shapes"]["pad1_streams2"]["batches"] > exact["batches"]
    assert out["shapes"]["setup"] == {"queries": 70, "db_images": 4993, "batch_size": 8}
    assert exact["padded_over_exact_cells"] == 1.0  # multiple 1 pads nothing
    # ROxf's sizes: padding to 4 cells merges database sizes into fuller batches and fewer shapes,
    # for some more cells (1.19x with 100-image shortlists, docs/benchmarks/README.md)
    assert padded["batches"] < exact["batches"] and padded["mean_batch"] > exact["mean_batch"]
    assert padded["distinct_shapes"] < exact["distinct_shapes"]
    assert 1.0 < padded["padded_over_exact_cells"] < 1.5


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):  # one thread cannot be compared with one
        parse_args([*BASE, "--streams", "1"])
    for multiples in ("0,4", "1,x"):
        with pytest.raises(SystemExit):
            parse_args([*BASE, "--pad-multiples", multiples])
    parse_args([*BASE, "--queries", "35", "--profile", "0"])  # two sets of 35: all 70 boxes
    with pytest.raises(SystemExit):  # three sets (A, B and the profiled P) need 72 boxes
        parse_args([*BASE, "--queries", "24"])
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--memory-mb", "-1"])
    with pytest.raises(SystemExit):  # no roxford5k_gallery_sizes.txt there
        parse_args([*BASE[:2], "--sizes-dir", str(tmp_path)])
