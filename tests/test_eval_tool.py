"""End-to-end evaluation: tools/eval.py on tiny generated sets; rows, R1M, re-rank wiring, GLDv2."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from test_revisitop_data import _write_gldv2, make_tiny_revisitop

import cvnet.reranker
from retrieval.checkpoint import save_checkpoint
from retrieval.config import load_cfg
from retrieval.data.revisitop import load_revisitop
from retrieval.evaluation import rerankers
from retrieval.evaluation.evaluator import evaluate
from retrieval.evaluation.extract import ExtractSettings
from retrieval.evaluation.metrics import evaluate_revisitop, gldv2_map_at_k
from retrieval.evaluation.report import format_markdown
from retrieval.evaluation.rerankers import RERANKERS, RerankContext, import_reranker_module
from retrieval.modeling.registry import build_model
from tools.eval import main

TINY = [
    "MODEL.ARCH",
    "cvnet_global",
    "MODEL.DEPTH",
    18,
    "MODEL.REDUCTION_DIM",
    32,
    "DATA.NUM_WORKERS",
    0,
    "TEST.SCALES",
    [1.0],
    "TEST.SEARCH",
    "torch",
]


def _cfg(tmp_path, *opts):
    return load_cfg(
        None,
        [
            *TINY,
            "DATA.ROOT",
            str(tmp_path / "data"),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "TEST.DATASETS",
            ["roxford5k"],
            *opts,
        ],
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_cfg(None, TINY)).eval()


def test_eval_tool_end_to_end_uses_stored_config(tmp_path, capsys) -> None:
    make_tiny_revisitop(tmp_path / "data")
    model_cfg = load_cfg(None, TINY)
    weights = tmp_path / "ckpt.pth"
    save_checkpoint(
        {"model": build_model(model_cfg).state_dict(), "config": model_cfg.dump()}, weights
    )
    # --config-less default is ResNet-50/2048: only the stored config can load these ResNet-18
    # weights
    results = main(
        [
            "--weights",
            str(weights),
            "DATA.ROOT",
            str(tmp_path / "data"),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "TEST.DATASETS",
            "['roxford5k']",
            "DATA.NUM_WORKERS",
            "0",
            "TEST.QE_N",
            "2",
            "TEST.SCALES",
            "[1.0]",
        ]
    )
    printed = capsys.readouterr().out
    assert (
        "| method | E mAP | M mAP | H mAP |" in printed
        and "| global |" in printed
        and "| +aQE |" in printed
    )
    assert results["settings"]["depth"] == 18
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(stored["datasets"]["roxford5k"]["rows"]) == {"global", "+aQE"}
    assert (tmp_path / "out" / "results.md").read_text().count("| global |") == 1


def test_global_row_matches_official_ranking_of_saved_features(tmp_path, tiny_model) -> None:
    obj = make_tiny_revisitop(tmp_path / "data")
    results = evaluate(_cfg(tmp_path), tiny_model)
    q = np.load(tmp_path / "out" / "features" / "roxford5k_query.npy")
    x = np.load(tmp_path / "out" / "features" / "roxford5k_db.npy")
    assert q.shape == (3, 32) and x.shape == (len(obj["imlist"]), 32)
    expected = evaluate_revisitop(np.argsort(-(x @ q.T), axis=0), obj["gnd"])
    row = results["datasets"]["roxford5k"]["rows"]["global"]
    for protocol in ("easy", "medium", "hard"):
        assert row[protocol]["map"] == pytest.approx(expected[protocol]["map"])


def test_r1m_distractors_are_appended(tmp_path, tiny_model) -> None:
    make_tiny_revisitop(tmp_path / "data")
    folder = tmp_path / "data" / "revisitop1m"
    (folder / "jpg" / "0").mkdir(parents=True)
    names = [f"0/d{i}.jpg" for i in range(3)]
    for name in names:
        cv2.imwrite(str(folder / "jpg" / name), np.full((40, 40, 3), 128, np.uint8))
    (folder / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    results = evaluate(_cfg(tmp_path, "TEST.R1M", True, "TEST.R1M_TOPN", 6), tiny_model)
    entry = results["datasets"]["roxford5k"]
    assert entry["r1m"] == 3 and entry["ranking"] == "top 6"
    assert (tmp_path / "out" / "features" / "revisitop1m_db.npy").is_file()
    assert "+R1M 3 distractors" in format_markdown(results)


class OracleReranker:
    """Scores 1 for a query's easy/hard images, 0 otherwise; counts scored pairs."""

    def __init__(self, gnd) -> None:
        self.gnd, self.pairs = gnd, []

    def score(self, query_index, db_indices):
        positives = set(self.gnd[query_index]["easy"]) | set(self.gnd[query_index]["hard"])
        self.pairs += [(query_index, int(i)) for i in db_indices]
        return np.array([float(int(i) in positives) for i in db_indices])


@pytest.mark.parametrize("mode", ["official", "label_free"])
def test_rerank_rows_with_oracle(tmp_path, tiny_model, monkeypatch, mode: str) -> None:
    obj = make_tiny_revisitop(tmp_path / "data")
    oracle = OracleReranker(obj["gnd"])
    monkeypatch.setitem(RERANKERS, "cvnet", lambda cfg, model, context: oracle)
    cfg = _cfg(
        tmp_path,
        "TEST.QE_N",
        1,
        "TEST.RERANK_TOPK",
        [100],
        "TEST.RERANK_MODE",
        mode,
        "TEST.RERANK_WEIGHT",
        10.0,
    )
    rows = evaluate(cfg, tiny_model)["datasets"]["roxford5k"]["rows"]
    assert list(rows) == ["global", "+aQE", "+rerank 100", "+aQE+rerank 100"]
    assert len(oracle.pairs) == len(set(oracle.pairs))  # each pair scored once across both rankings
    assert rows["+rerank 100"]["medium"]["map"] == pytest.approx(
        1.0
    )  # positives all moved to the top


def test_missing_reranker_module_is_a_clear_error(tmp_path) -> None:
    cfg = _cfg(tmp_path, "TEST.RERANKER", "gv")
    with pytest.raises(RuntimeError, match="TEST.RERANKER='gv' needs module retrieval.no_such"):
        import_reranker_module(cfg, "retrieval.no_such")
    context = RerankContext("x", [], None, [], None, torch.device("cpu"), None, tmp_path)
    with pytest.raises(ValueError, match="CVNet-Rerank model"):
        RERANKERS["cvnet"](cfg, None, context)


@pytest.mark.parametrize("native", [False, True], ids=["avx2", "amx"])
def test_cpu_bf16_scoring_warns_where_bf16_is_not_native(tmp_path, monkeypatch, caplog, native):
    """bf16 on a CPU without bf16 arithmetic is slower than fp32: kept, but the log says so."""
    opts = ["MODEL.ARCH", "cvnet_rerank", "MODEL.RERANK.COMPRESS_DIM", 8, "TEST.AMP", "bf16"]
    cfg = _cfg(tmp_path, *opts)
    monkeypatch.setattr(rerankers, "native_bf16_cpu", lambda: native)
    settings = ExtractSettings.from_cfg(cfg)
    context = RerankContext("x", [], None, [], None, torch.device("cpu"), settings, tmp_path)
    with caplog.at_level("WARNING", logger="retrieval.evaluation.rerankers"):
        reranker = RERANKERS["cvnet"](cfg, build_model(cfg), context)
    assert reranker.amp_dtype == torch.bfloat16
    assert ("slower than in fp32" in caplog.text) is not native


def test_scoring_batch_and_memory_budget_reach_the_reranker_and_are_checked(
    tmp_path, monkeypatch
) -> None:
    opts = ["MODEL.ARCH", "cvnet_rerank", "MODEL.RERANK.COMPRESS_DIM", 8, "TEST.RERANK_BATCH", 3]
    cfg = _cfg(tmp_path, *opts)
    settings = ExtractSettings.from_cfg(cfg)
    model = build_model(cfg)
    context = RerankContext("x", [], None, [], None, torch.device("cpu"), settings, tmp_path)
    reranker = RERANKERS["cvnet"](cfg, model, context)
    assert reranker.batch_size == 3 and reranker.memory_bytes == 4096 * 2**20  # auto on the CPU
    cfg = _cfg(tmp_path, *opts, "TEST.RERANK_MEMORY_MB", 100)
    assert RERANKERS["cvnet"](cfg, model, context).memory_bytes == 100 * 2**20
    # auto on CUDA (faked: the reranker is not built, its arguments are recorded): half the free
    built = {}
    monkeypatch.setattr(cvnet.reranker, "CVNetReranker", lambda *a, **kw: built.update(kw))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    cuda = dataclasses.replace(context, device=torch.device("cuda"), pyramids=object())
    RERANKERS["cvnet"](_cfg(tmp_path, *opts), SimpleNamespace(to=lambda device: None), cuda)
    assert built["memory_mb"] == 5 * 1024 and built["batch_size"] == 3
    for key, bad in (("RERANK_MEMORY_MB", -1), ("RERANK_BATCH", 0)):
        with pytest.raises(ValueError, match=f"TEST.{key}={bad}; expected an integer >= "):
            RERANKERS["cvnet"](_cfg(tmp_path, *opts, f"TEST.{key}", bad), model, context)


@pytest.mark.parametrize(
    "key,attribute", [("RERANK_STREAMS", "streams"), ("RERANK_PAD_MULTIPLE", "pad_multiple")]
)
def test_scoring_streams_and_padding_apply_on_cuda_only_and_are_checked(
    tmp_path, monkeypatch, key, attribute
) -> None:
    opts = ["MODEL.ARCH", "cvnet_rerank", "MODEL.RERANK.COMPRESS_DIM", 8]
    cfg = _cfg(tmp_path, *opts, f"TEST.{key}", 3)
    settings = ExtractSettings.from_cfg(cfg)
    model = build_model(cfg)
    context = RerankContext("x", [], None, [], None, torch.device("cpu"), settings, tmp_path)
    assert getattr(RERANKERS["cvnet"](cfg, model, context), attribute) == 1
    # on CUDA (faked: the reranker is not built, its arguments are recorded)
    built = {}
    monkeypatch.setattr(cvnet.reranker, "CVNetReranker", lambda *a, **kw: built.update(kw))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 2**31))
    cuda = dataclasses.replace(context, device=torch.device("cuda"), pyramids=object())
    RERANKERS["cvnet"](cfg, SimpleNamespace(to=lambda device: None), cuda)
    assert built[attribute] == 3
    cfg = _cfg(tmp_path, *opts, f"TEST.{key}", 0)
    context = RerankContext("x", [], None, [], None, torch.device("cpu"), settings, tmp_path)
    with pytest.raises(ValueError, match=f"TEST.{key}=0"):
        RERANKERS["cvnet"](cfg, model, context)


def test_cvnet_rerank_checkpoint_end_to_end(tmp_path) -> None:
    make_tiny_revisitop(tmp_path / "data", n_queries=2, per_label=1, n_negatives=1)
    opts = ["MODEL.ARCH", "cvnet_rerank", "MODEL.RERANK.COMPRESS_DIM", 8, "TEST.RERANK_TOPK", [2]]
    cfg = _cfg(tmp_path, *opts, "TEST.RERANK_MODE", "label_free")
    torch.manual_seed(0)
    model = build_model(cfg)
    results = evaluate(
        cfg, model.encoder, model
    )  # a cvnet_rerank model: encoder global, itself re-ranks
    assert list(results["datasets"]["roxford5k"]["rows"]) == ["global", "+rerank 2"]
    features = tmp_path / "out" / "features"
    assert (features / "pyramids_roxford5k_float16").is_dir()
    # Rows of one table that differ only in the storage dtype share the feature folder (Tab. S4).
    cfg_int8 = _cfg(
        tmp_path, *opts, "TEST.RERANK_MODE", "label_free", "TEST.RERANK_CACHE_DTYPE", "int8"
    )
    again = evaluate(cfg_int8, model.encoder, model)
    assert (features / "pyramids_roxford5k_int8").is_dir()
    assert list(again["datasets"]["roxford5k"]["rows"]) == ["global", "+rerank 2"]
    # A cache left by another model is rebuilt, not reused and not an error.
    torch.manual_seed(1)
    other = build_model(cfg)
    evaluate(cfg, other.encoder, other)


def test_shared_pass_builds_db_pyramids_in_the_global_extraction(
    tmp_path, monkeypatch, caplog
) -> None:
    """TEST.RERANK_SHARED_PASS: the re-ranker runs its backbone on the queries only, stores every
    database pyramid during the global extraction, and the rows equal those of the lazy path."""
    make_tiny_revisitop(tmp_path / "data", n_queries=2, per_label=1, n_negatives=2)
    opts = ["MODEL.ARCH", "cvnet_rerank", "MODEL.RERANK.COMPRESS_DIM", 8, "TEST.RERANK_TOPK", [3]]
    opts += ["TEST.RERANK_MODE", "label_free", "TEST.SCALES", [0.7071, 1.0]]
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, *opts)).eval()
    dense_calls = []
    extract_dense = type(model).extract_dense
    monkeypatch.setattr(
        type(model),
        "extract_dense",
        lambda self, img: dense_calls.append(1) or extract_dense(self, img),
    )

    def run(shared: bool, reranker=model) -> tuple[dict, int]:
        dense_calls.clear()
        out = tmp_path / f"out_{shared}_{reranker is model}"
        cfg = _cfg(tmp_path, *opts, "TEST.RERANK_SHARED_PASS", shared, "OUTPUT_DIR", str(out))
        rows = evaluate(cfg, model.encoder, reranker)["datasets"]["roxford5k"]["rows"]
        return rows, len(dense_calls)

    (shared_rows, shared_calls), (lazy_rows, lazy_calls) = run(True), run(False)
    n_db = len(load_revisitop(tmp_path / "data", "roxford5k").db_paths())
    assert shared_calls == 2  # the two queries
    ranks = np.load(tmp_path / "out_False_True" / "rankings_roxford5k.npz")["global"]
    assert lazy_calls == 2 + len(np.unique(ranks[:3]))  # ... and every shortlisted database image
    assert shared_rows == lazy_rows
    items = tmp_path / "out_True_True" / "features" / "pyramids_roxford5k_float16" / "items"
    assert len(list(items.glob("*/*.pyr"))) == n_db
    # A re-ranker with another backbone cannot share the pass: its pyramids are built lazily.
    torch.manual_seed(1)
    other = build_model(_cfg(tmp_path, *opts)).eval()
    with caplog.at_level("INFO", logger="retrieval.evaluation.rerankers"):
        assert run(True, other)[1] > 2
    assert "backbone differs" in caplog.text


def test_gldv2_map_at_100(tmp_path, tiny_model) -> None:
    data = tmp_path / "data"
    _write_gldv2(data, ["q001,abc1 xyz3,Public", "q002,None,Ignored", "q003,abd2,Private"])
    rng = np.random.default_rng(0)
    for split, ids in (("index", ["abc1", "abd2", "xyz3"]), ("test", ["q001", "q003"])):
        for image_id in ids:
            path = (
                data / "gldv2" / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    results = evaluate(_cfg(tmp_path, "TEST.DATASETS", ["gldv2"]), tiny_model)
    scores = results["datasets"]["gldv2"]["rows"]["global"]["map@100"]
    q = np.load(tmp_path / "out" / "features" / "gldv2_test.npy")
    x = np.load(tmp_path / "out" / "features" / "gldv2_index.npy")
    index = ["abc1", "abd2", "xyz3"]
    predictions = {
        qid: [index[i] for i in np.argsort(-(x @ q[j]))] for j, qid in enumerate(["q001", "q003"])
    }
    truth = {"q001": {"abc1", "xyz3"}, "q003": {"abd2"}}
    assert scores["all"] == pytest.approx(gldv2_map_at_k(predictions, truth, 100))
    assert set(scores) == {"public", "private", "all"} and not math.isnan(scores["public"])
    assert "mAP@100 public" in format_markdown(results)
