"""Paper tables: published numbers against the supplementary text, row configs, the renderer.

The published numbers are checked with a parser written here, independent of how the CSVs were
made: it cuts the supplementary text (a copy in tests/data) into table blocks (from the
'Medium ... Hard' header line to the 'Table S<n>.' caption) and reads the last eight numbers of
every data line.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from retrieval.config import load_cfg
from retrieval.modeling.registry import build_model
from retrieval.paper_tables import COLUMNS, make_table, read_published, result_keys, row_configs
from retrieval.reproduce import model_signature

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PUBLISHED = REPO / "docs" / "papers" / "published"
TOKEN = re.compile(r"^(?:\d+\.\d|-)$")
# table id -> (paper text, table number, only the rows after a line containing this marker)
SOURCES = (
    {f"senet_S{n}": ("senet", n, None) for n in (2, 3, 4, 5)}
    | {"senet_S1b": ("senet", 1, "(b) Ours")}
    | {f"cvnet_S{n}": ("cvnet", n, None) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12)}
)
# Row-label prefixes added in the CSVs (yacs would turn a bare numeric TABLE.ROW into a number).
LABEL_PREFIXES = ("r_H=", "p_has=", "C'=", "K=")
# The official CVNet-Rerank R50 row of each top-K table (equal, at every K, to Tab. S8 'CV').
OFFICIAL_ROW = {
    "cvnet_S1": "r_H=0.2-1.0",
    "cvnet_S2": "p_has=0.0-0.2",
    "cvnet_S3": "C'=256",
    "cvnet_S4": "float32",
    "cvnet_S5": "f_3",
    "cvnet_S6": "scales 1, 1/2, 1/√2",
    "cvnet_S7": "asymmetric",
}
TABLES = sorted(SOURCES)


def table_block(paper: str, number: int) -> list[str]:
    """Lines between the header of Table S<number> and its caption."""
    lines = (DATA / f"{paper}_supplementary.txt").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(f"Table S{number}."))
    start = max(i for i in range(end) if "Medium" in lines[i] and "Hard" in lines[i])
    return lines[start + 1 : end]


def data_lines(block: list[str], marker: str | None) -> list[tuple[str, list[str]]]:
    """(line, last eight values) of every data line, after ``marker``; exact repeated lines once."""
    if marker is not None:
        block = block[next(i for i, line in enumerate(block) if marker in line) + 1 :]
    rows, seen = [], set()
    for line in block:
        tokens = [re.sub(r"</?u>", "", t).strip() for t in line.split("\t")]
        values = [t for t in tokens if TOKEN.match(t)]
        if len(values) >= 8 and line not in seen:
            seen.add(line)
            rows.append((line, ["" if v == "-" else v for v in values[-8:]]))
    return rows


def csv_rows(table: str) -> list[dict]:
    """The published CSV as dicts."""
    with (PUBLISHED / f"{table}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("table", TABLES)
def test_published_numbers_match_the_paper_text(table: str) -> None:
    """Every number of every CSV row is the one printed in the same row and column."""
    paper, number, marker = SOURCES[table]
    text_rows = data_lines(table_block(paper, number), marker)
    rows = csv_rows(table)
    assert [list(r.keys()) for r in rows[:1]] == [["row", "topk", *COLUMNS]]
    assert len(rows) == len(text_rows), (
        f"{table}: {len(rows)} CSV rows, {len(text_rows)} in the text"
    )
    for row, (line, values) in zip(rows, text_rows):
        got = ["" if row[c] == "" else f"{float(row[c]):.1f}" for c in COLUMNS]
        assert got == values, f"{table} row {row['row']!r}: CSV {got} != text {values} ({line!r})"


def _label_core(label: str) -> str:
    """The part of a CSV row label that the text prints verbatim (spaces removed)."""
    for prefix in LABEL_PREFIXES:
        label = label.removeprefix(prefix)
    label = label.replace("†", "").split("-L_")[0]
    label = "+ αQE" if label.endswith("+ αQE") else label.split(" (L_")[0]
    return label.replace(" ", "")


@pytest.mark.parametrize("table", [t for t in TABLES if t != "cvnet_S6"])
def test_published_row_labels_match_the_paper_text(table: str) -> None:
    """Each CSV label (but 'Global', printed '0') is on its text line (S6 prints check marks)."""
    paper, number, marker = SOURCES[table]
    for row, (line, _) in zip(csv_rows(table), data_lines(table_block(paper, number), marker)):
        if row["row"] == "Global":
            assert line.startswith("0\t"), line
        else:
            assert _label_core(row["row"]) in line.replace(" ", ""), (row["row"], line)


@pytest.mark.parametrize("table", sorted(OFFICIAL_ROW))
def test_top_k_grouping_is_consistent_across_tables(table: str) -> None:
    """Rows: 0, then equal groups of K=100/200/400; the official row = Tab. S8 'CV' at each K."""
    rows = read_published(table, REPO)
    group = (len(rows) - 1) // 3
    assert [r.topk for r in rows] == [None] + [100] * group + [200] * group + [400] * group
    cv = {r.topk: r.published for r in read_published("cvnet_S8", REPO) if r.label == "CV"}
    official = {r.topk: r.published for r in rows if r.label == OFFICIAL_ROW[table]}
    assert official == cv


def all_row_configs() -> list[Path]:
    """Every configs/tables/<table>/<row>.yaml."""
    return sorted((REPO / "configs" / "tables").glob("*/*.yaml"))


@pytest.mark.parametrize("path", all_row_configs(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_row_config_loads_and_names_a_published_row(path: Path) -> None:
    """Loads at its real depth; TABLE.NAME is its folder; each (ROW, K) it gives is published."""
    cfg = load_cfg(path)
    assert cfg.TABLE.NAME == path.parent.name
    published = {r.key for r in read_published(path.parent.name, REPO)}
    assert set(result_keys(cfg)) <= published, set(result_keys(cfg)) - published


@pytest.mark.parametrize("table", sorted({p.parent.name for p in all_row_configs()}))
def test_every_published_row_has_a_config(table: str) -> None:
    """No published row is left without a config (the CSVs only list rows our models express)."""
    provided = set()
    for path in row_configs(table, REPO):
        provided |= set(result_keys(load_cfg(path)))
    assert {r.key for r in read_published(table, REPO)} <= provided


def test_eval_time_rows_share_the_trained_model() -> None:
    """Quantization, alpha-QE, top-K and fusion-weight rows train nothing new; ablation rows do."""
    tables = REPO / "configs" / "tables"

    def sig(rel: str) -> str:
        return model_signature(load_cfg(tables / rel))

    official = sig("cvnet_S4/float32.yaml")
    shared = [
        "cvnet_S4/int8.yaml",
        "cvnet_S4/int4.yaml",
        "cvnet_S8/cv.yaml",
        "cvnet_S8/qe_cv.yaml",
        "cvnet_S1/rh_0.2-1.0.yaml",
        "cvnet_S3/c256.yaml",
        "cvnet_figS3/alpha_2.0.yaml",
        "cvnet_S12/has.yaml",
    ]
    assert {sig(r) for r in shared} == {official}
    assert sig("cvnet_S3/c16.yaml") != official and sig("cvnet_S12/csc.yaml") != official
    assert (
        sig("senet_S2/R50_cls_qe_oxf.yaml")
        == sig("senet_S2/R50_cls.yaml")
        == sig("senet_S4/cosine.yaml")
    )
    assert sig("senet_S4/dot.yaml") != sig("senet_S4/cosine.yaml") != sig("senet_S4/baseline.yaml")


def _distinct_models() -> list:
    """One depth-18, no-pretrained config per distinct MODEL section of the row configs."""
    models = {}
    for path in all_row_configs():
        cfg = load_cfg(
            path, ["MODEL.DEPTH", "18", "MODEL.PRETRAINED", "", "MODEL.RERANK.GLOBAL_WEIGHTS", ""]
        )
        models.setdefault(cfg.MODEL.dump(), cfg)
    return list(models.values())


@pytest.mark.parametrize(
    "cfg", _distinct_models(), ids=lambda c: f"{c.MODEL.ARCH}-{c.TABLE.NAME}-{c.TABLE.ROW}"
)
def test_row_model_builds(cfg) -> None:
    """build_model accepts every model variant the tables use (ResNet-18 for speed)."""
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def _fake_results(path: Path, dataset: str, key: str, medium: float, hard: float) -> None:
    """A results.json as tools/eval.py writes it (mAP as fractions)."""
    path.mkdir(parents=True)
    rows = {
        key: {
            p: {"map": v, "mp@k": {"1": v}}
            for p, v in (("easy", 0.9), ("medium", medium), ("hard", hard))
        }
    }
    (path / "results.json").write_text(
        json.dumps({"datasets": {dataset: {"rows": rows}}, "settings": {}})
    )


def test_make_table_renders_published_ours_and_difference(tmp_path: Path, monkeypatch) -> None:
    """Markdown, CSV and PNG; per-benchmark QE configs fill one row; +1M from the _r1m results."""
    monkeypatch.chdir(REPO)
    results = tmp_path / "results"
    _fake_results(results / "R50_cls", "roxford5k", "global", 0.801, 0.60)
    _fake_results(results / "R50_cls_r1m", "roxford5k", "global", 0.70, 0.45)
    _fake_results(results / "R50_cls_qe_oxf", "synth_oxf", "+aQE", 0.85, 0.70)
    _fake_results(results / "R50_cls_qe_par", "synth_par", "+aQE", 0.95, 0.90)
    markdown = make_table("senet_S2", results, "full", tmp_path / "out").read_text()
    assert (
        "| R50-SENet (L_cls) |  | 81.4 / 80.1 (-1.3) | 72.9 / 70.0 (-2.9) | 90.5 / - |" in markdown
    )
    assert "| R50-SENet (L_cls) + αQE |  | 84.8 / 85.0 (+0.2) |" in markdown
    assert "93.1 / 95.0 (+1.9)" in markdown and "85.3 / 90.0 (+4.7)" in markdown
    with (tmp_path / "out" / "senet_S2.csv").open() as f:
        long = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    assert long[("R50-SENet (L_cls)", "hard_roxf")]["difference"] == "-2.3"
    assert (tmp_path / "out" / "senet_S2.png").stat().st_size > 1000


def test_make_table_reads_rerank_rows_by_depth(tmp_path: Path, monkeypatch) -> None:
    """A config with RERANK_TOPK [100, 200, 400] fills the rows (label, K) from '+rerank K'."""
    monkeypatch.chdir(REPO)
    for k, v in ((100, 0.5), (200, 0.6), (400, 0.7)):
        path = tmp_path / "res" / "int8"
        rows = {f"+rerank {k}": {p: {"map": v, "mp@k": {}} for p in ("easy", "medium", "hard")}}
        if path.is_dir():
            data = json.loads((path / "results.json").read_text())
            data["datasets"]["synth_oxf"]["rows"].update(rows)
        else:
            path.mkdir(parents=True)
            data = {"datasets": {"synth_oxf": {"rows": rows}}}
        (path / "results.json").write_text(json.dumps(data))
    markdown = make_table("cvnet_S4", tmp_path / "res", "demo", tmp_path / "out").read_text()
    assert "| int8 | 200 | 87.2 / 60.0 (-27.2) |" in markdown
    assert "| int4 | 200 | 86.9 / - |" in markdown
    assert "synth_oxf" in markdown
