"""End to end: scripts/reproduce_cvnet_S10.sh --scale demo on a tiny generated benchmark.

Trains the two CVNet-Global rows of CVNet supp. Tab. S10 (SupCon vs. momentum contrastive loss) for
two iterations, evaluates both on the synthetic test sets and renders the table (about a minute,
two under load). Fast tests cover skipping and planning.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.config import load_cfg
from retrieval.reproduce import Job, Options, Planner, run_jobs

REPO = Path(__file__).resolve().parents[1]
# Every size knob down to the minimum that still exercises training, evaluation and rendering.
TINY = [
    "TRAIN.MAX_ITERS",
    "2",
    "TRAIN.BATCH_SIZE",
    "8",
    "TRAIN.IMG_SIZE",
    "64",
    "DATA.NUM_WORKERS",
    "0",
]


def _synthetic(root: Path) -> None:
    """A 32-image training split and two 24-image test sets of 64-px images."""
    subprocess.run(
        [
            sys.executable,
            "datasets/make_synthetic.py",
            "--out",
            str(root),
            "--quiet",
            "--n-train-landmarks",
            "8",
            "--views-per-landmark",
            "4",
            "--image-size",
            "64",
            "--n-test-landmarks",
            "2",
            "--n-test-queries",
            "4",
            "--n-test-db",
            "24",
            "--test-views-per-landmark",
            "4",
        ],
        cwd=REPO,
        check=True,
    )


def _reproduce(tmp_path: Path, data: Path) -> str:
    """Run the table script; returns its stdout."""
    argv = [
        "bash",
        "scripts/reproduce_cvnet_S10.sh",
        "--scale",
        "demo",
        "--out",
        str(tmp_path / "out"),
        "--tables-out",
        str(tmp_path / "tables"),
        "--opts",
        "DATA.ROOT",
        str(data),
        *TINY,
    ]
    done = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # PYTHONPATH etc. pass through
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_reproduce_cvnet_s10_demo(tmp_path: Path) -> None:
    """Both rows train once, evaluate on both synthetic sets, and land in the rendered table."""
    data = tmp_path / "synthetic"
    _synthetic(data)
    log = _reproduce(tmp_path, data)
    assert log.count("[reproduce] train ") == 2 and log.count("[reproduce] eval ") == 2
    for row in ("ours", "supcon"):
        results = json.loads(
            (tmp_path / "out/demo/results/cvnet_S10" / row / "results.json").read_text()
        )
        assert set(results["datasets"]) == {"synth_oxf", "synth_par"}
    with (tmp_path / "tables" / "cvnet_S10.csv").open() as f:
        cells = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    ours = cells[("Ours (Eq. (S3))", "hard_roxf")]
    assert ours["published"] == "62.1" and 0.0 <= float(ours["ours"]) <= 100.0
    assert cells[("Ours (Eq. (S3))", "hard_roxf1m")]["ours"] == ""  # no +1M at demo scale
    assert "synth_oxf" in (tmp_path / "tables" / "cvnet_S10.md").read_text()


def test_existing_checkpoint_is_not_retrained(tmp_path: Path) -> None:
    """A training job whose final checkpoint exists is skipped; evaluations always run."""
    done = tmp_path / "model_final.pth"
    done.write_bytes(b"x")
    marker = tmp_path / "evaluated"
    jobs = [
        Job("train", "m", [sys.executable, "-c", "raise SystemExit(3)"], done),
        Job("eval", "t/r", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]),
    ]
    records = run_jobs(jobs, tmp_path / "logs", keep_going=False)
    assert [r["kind"] for r in records] == ["eval"] and marker.is_file()
    done.unlink()
    with pytest.raises(RuntimeError, match="train m failed"):
        run_jobs(jobs, tmp_path / "logs", keep_going=False)


def test_plan_trains_shared_and_dependency_models_once(monkeypatch, tmp_path) -> None:
    """cvnet_S4 + S8: one CVNet-Global and one re-ranker (trained first), every row evaluated."""
    monkeypatch.chdir(REPO)
    # an empty output root: models already trained in the checkout's output/ would be reused
    planner = Planner(Options(scale="demo", dry_run=True, out_root=tmp_path / "reproduce"))
    planner.add_table("cvnet_S4")
    planner.add_table("cvnet_S8")
    kinds = [(job.kind, job.name.split("-")[0]) for job in planner.plan.jobs]
    assert [k for k in kinds if k[0] == "train"] == [
        ("train", "cvnet_global_R50"),
        ("train", "cvnet_rerank_R50"),
    ]
    assert kinds.index(("train", "cvnet_rerank_R50")) < kinds.index(("eval", "cvnet_S4/float32"))
    select = [i for i, (kind, _) in enumerate(kinds) if kind == "select"]
    assert len(select) == 1 and select[0] < kinds.index(("train", "cvnet_rerank_R50"))
    assert sum(kind == "eval" for kind, _ in kinds) == 4 + 4
    rerank_eval = next(j for j in planner.plan.jobs if j.name == "cvnet_S8/qe_cv")
    assert (
        rerank_eval.argv[-1].endswith("model_final.pth")
        and "cvnet_rerank_R50-" in rerank_eval.argv[-1]
    )


def test_model_trained_under_another_name_is_reused(tmp_path: Path, monkeypatch) -> None:
    """A later run finds a checkpoint by its training-config hash, whatever row named its folder."""
    monkeypatch.chdir(REPO)
    first = Planner(Options(scale="demo", out_root=tmp_path, dry_run=True))
    first.add_table("senet_S4")
    cosine = next(j for j in first.plan.jobs if j.name == "senet_S4/cosine").argv[-1]
    signature = Path(cosine).parent.name.rsplit("-", 1)[1]
    renamed = tmp_path / "demo" / "models" / f"another_row-{signature}" / "model_final.pth"
    renamed.parent.mkdir(parents=True)
    renamed.write_bytes(b"x")
    second = Planner(Options(scale="demo", out_root=tmp_path, dry_run=True))
    second.add_table("senet_S3")
    channel_wise = next(j for j in second.plan.jobs if j.name == "senet_S3/channel_wise")
    assert channel_wise.argv[-1] == str(renamed)


def test_every_job_of_a_rerank_table_has_its_own_config(tmp_path: Path, monkeypatch) -> None:
    """The pair selection's config must not overwrite the global model's training config (it once
    did: the global training then tried to load its own final checkpoint as MODEL.WEIGHTS)."""
    monkeypatch.chdir(REPO)
    planner = Planner(Options(scale="demo", out_root=tmp_path))
    planner.add_table("cvnet_S4")
    configs = [Path(job.argv[job.argv.index("--config") + 1]) for job in planner.plan.jobs]
    assert len(set(configs)) == len(configs)
    for job, config in zip(planner.plan.jobs, configs):
        cfg = load_cfg(config)
        if job.kind == "train" and cfg.MODEL.ARCH == "cvnet_global":
            assert cfg.MODEL.WEIGHTS == ""
        if job.kind == "select":
            assert cfg.MODEL.WEIGHTS.endswith("model_final.pth")
