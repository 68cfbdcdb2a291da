"""Reproduce a paper table: train each distinct model of its rows once, evaluate, render.

Rows are the configs under configs/tables/<table>/. Two rows share a trained model when their
configs agree on every key except the evaluation-only ones (EVAL_ONLY_KEYS): the alpha-QE, top-K,
quantization and fusion-weight rows reuse one checkpoint. A model lives in
<out>/<scale>/models/<name>-<hash of its training config>, so tables share models too, and a model
whose model_final.pth exists is only re-evaluated.

Dependencies: a CVNet-Rerank row first needs its CVNet-Global (MODEL.RERANK.GLOBAL_WEIGHTS) and
the pairs selected with it (tools/select_pairs.py: RERANK_TRAIN.PAIRS_CSV, HARD_NEG_CSV); a global
row re-ranked by CVNet-Rerank needs that re-ranker (TEST.RERANK_WEIGHTS). At full scale existing
files at the configured paths are used as they are (e.g. an official checkpoint); otherwise, and
always at demo scale, the driver makes them from configs/cvnet/{global,rerank}_R<depth>.yaml.
At demo scale every config is followed by configs/demo/scale.yaml and the test sets become the
synthetic ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrieval.config import load_cfg, save_cfg
from retrieval.paper_tables import row_configs

SCALES = ("demo", "full")
DEMO_OVERLAY = Path("configs/demo/scale.yaml")
# Demo pair selection (SIFT verification, thresholds for 8 views per landmark) and re-ranker
# training recipe: re-ranker jobs only.
DEMO_RERANK_OVERLAY = Path("configs/demo/rerank.yaml")
# Real test set -> its synthetic stand-in at demo scale.
DEMO_SETS = {"roxford5k": "synth_oxf", "rparis6k": "synth_par"}
# Keys that change only evaluation (or bookkeeping), never the trained weights.
EVAL_ONLY_KEYS = (
    "OUTPUT_DIR",
    "TABLE",
    "TEST",
    "DATA.NUM_WORKERS",
    "MODEL.WEIGHTS",
    "TEST.RERANK_CACHE_DTYPE",
    "TRAIN.LOG_PERIOD",
    "TRAIN.EVAL_PERIOD",
)
GLOBAL_DEPENDENCY = "configs/cvnet/global_R{depth}.yaml"
RERANK_DEPENDENCY = "configs/cvnet/rerank_R{depth}.yaml"
FINAL_CHECKPOINT = "model_final.pth"


@dataclass(frozen=True)
class Options:
    """How to run: scale, output root, processes per training, interpreter, +R1M, dry run."""

    scale: str = "demo"
    out_root: Path = Path("output/reproduce")
    nproc: int = 1
    python: str = sys.executable
    r1m: bool | None = None  # None = when DATA.ROOT/revisitop1m exists (full scale only)
    dry_run: bool = False
    keep_going: bool = False
    opts: tuple[
        str, ...
    ] = ()  # KEY VALUE overrides applied to every training and evaluation config


@dataclass
class Job:
    """One command: a training (skipped when ``done`` exists) or an evaluation."""

    kind: str
    name: str
    argv: list[str]
    done: Path | None = None


@dataclass
class Plan:
    """Ordered jobs; trained-model paths by training-config hash."""

    jobs: list[Job] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)


def _drop(tree: dict, dotted: str) -> None:
    """Remove a dotted key from a nested dict (absent keys are fine)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(leaf, None)


def model_signature(cfg) -> str:
    """Hash of the training-relevant config (EVAL_ONLY_KEYS removed)."""
    tree = yaml.safe_load(cfg.dump())
    for key in EVAL_ONLY_KEYS:
        _drop(tree, key)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]


def compose(files: list[Path | str], scale: str, opts: list[str] = (), rerank: bool = False):
    """The config of ``files`` (+ the demo overlays at demo scale: scale, and the re-ranker's if
    asked) and ``opts``."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; expected one of {SCALES}")
    overlay = [DEMO_OVERLAY, *([DEMO_RERANK_OVERLAY] if rerank else [])] if scale == "demo" else []
    return load_cfg([*files, *overlay], list(opts))


def _dataset_opts(row_cfg, scale: str) -> list[str]:
    """TEST.DATASETS of the row, mapped to the synthetic sets at demo scale."""
    names = (
        [DEMO_SETS.get(n, n) for n in row_cfg.TEST.DATASETS]
        if scale == "demo"
        else row_cfg.TEST.DATASETS
    )
    return ["TEST.DATASETS", str(list(dict.fromkeys(names)))]


def _run_name(output_dir: str) -> str:
    """A readable model name from OUTPUT_DIR: output/tables/senet_S4/dot -> senet_S4_dot."""
    parts = [p for p in Path(output_dir).parts if p not in ("output", "tables", "/")]
    return "_".join(parts) or "model"


class Planner:
    """Builds the jobs of one or more tables, training each distinct model once."""

    def __init__(self, options: Options) -> None:
        self.opt, self.plan = options, Plan()
        self.selected: set[Path] = set()  # pair-selection outputs already scheduled
        self.base = options.out_root / options.scale

    def _train_argv(self, config: Path) -> list[str]:
        """tools/train.py under torchrun when several processes are asked for (full scale)."""
        if self.opt.scale == "full" and self.opt.nproc > 1:
            return [
                "torchrun",
                "--standalone",
                f"--nproc_per_node={self.opt.nproc}",
                "tools/train.py",
                "--config",
                str(config),
            ]
        return [self.opt.python, "tools/train.py", "--config", str(config)]

    def _dependency(self, configured: str, template: str, depth: int) -> Path:
        """The configured checkpoint if it exists at full scale, else the trained dependency."""
        if self.opt.scale == "full" and configured and Path(configured).is_file():
            return Path(configured)
        return self.ensure_model([template.format(depth=depth)], depth)

    def _dependency_opts(self, files: list, depth: int) -> list[str]:
        """Overrides pointing a row at the models it depends on."""
        cfg = compose(files, self.opt.scale)
        if cfg.MODEL.ARCH == "cvnet_rerank":
            path = self._dependency(cfg.MODEL.RERANK.GLOBAL_WEIGHTS, GLOBAL_DEPENDENCY, depth)
            return ["MODEL.RERANK.GLOBAL_WEIGHTS", str(path), *self._pair_opts(cfg, path, depth)]
        if cfg.TEST.RERANK_WEIGHTS and len(cfg.TEST.RERANK_TOPK):
            return [
                "TEST.RERANK_WEIGHTS",
                str(self._dependency(cfg.TEST.RERANK_WEIGHTS, RERANK_DEPENDENCY, depth)),
            ]
        return []

    def _pair_opts(self, cfg, global_weights: Path, depth: int) -> list[str]:
        """Overlapped pairs and hard negatives of the re-ranker (tools/select_pairs.py), once per
        global model; at full scale existing files at the configured paths are used as they are."""
        root, r = Path(cfg.DATA.ROOT), cfg.RERANK_TRAIN
        if self.opt.scale == "full" and all(
            (root / f).is_file() for f in (r.PAIRS_CSV, r.HARD_NEG_CSV)
        ):
            return []
        out = global_weights.parent.with_name(global_weights.parent.name + ".pairs").resolve()
        opts = [
            "RERANK_TRAIN.PAIRS_CSV",
            str(out / "overlapping_pairs.csv"),
            "RERANK_TRAIN.HARD_NEG_CSV",
            str(out / "hard_negatives.csv"),
        ]
        if out not in self.selected:
            self.selected.add(out)
            # <model>.pairs.yaml: with_suffix would give <model>.yaml, the model's training config
            config = out.with_name(out.name + ".yaml")
            extra = ["MODEL.WEIGHTS", str(global_weights), "OUTPUT_DIR", str(out), *opts]
            if not self.opt.dry_run:
                dependency = GLOBAL_DEPENDENCY.format(depth=depth)
                save_cfg(
                    compose([dependency], self.opt.scale, [*self.opt.opts, *extra], True), config
                )
            argv = [self.opt.python, "tools/select_pairs.py", "--config", str(config)]
            self.plan.jobs.append(Job("select", out.name, argv, out / "hard_negatives.csv"))
        return opts

    def ensure_model(self, files: list, depth: int) -> Path:
        """Schedule the training of ``files`` once; returns its final checkpoint path."""
        deps = [*self._dependency_opts(files, depth), *self.opt.opts]
        cfg = compose(files, self.opt.scale, deps)
        rerank = cfg.MODEL.ARCH == "cvnet_rerank"
        cfg = compose(files, self.opt.scale, deps, rerank)
        signature = model_signature(cfg)
        if signature not in self.plan.models:
            # A model trained earlier under another row's name has the same signature: reuse it.
            trained = sorted(self.base.glob(f"models/*-{signature}/{FINAL_CHECKPOINT}"))
            name = trained[0].parent.name if trained else f"{_run_name(cfg.OUTPUT_DIR)}-{signature}"
            out = self.base / "models" / name
            config = self.base / "models" / f"{name}.yaml"
            if not self.opt.dry_run:
                save_cfg(
                    compose(files, self.opt.scale, [*deps, "OUTPUT_DIR", str(out)], rerank), config
                )
            self.plan.jobs.append(
                Job("train", name, self._train_argv(config), out / FINAL_CHECKPOINT)
            )
            self.plan.models[signature] = out / FINAL_CHECKPOINT
        return self.plan.models[signature]

    def _eval_job(self, row: Path, table: str, suffix: str, opts: list[str], weights: Path) -> None:
        """Save the row's evaluation config and schedule tools/eval.py."""
        out = self.base / "results" / table / f"{row.stem}{suffix}"
        config = out / "eval_config.yaml"
        if not self.opt.dry_run:
            save_cfg(
                compose([row], self.opt.scale, [*opts, *self.opt.opts, "OUTPUT_DIR", str(out)]),
                config,
            )
            _share_feature_cache(out, weights)
        argv = [
            self.opt.python,
            "tools/eval.py",
            "--config",
            str(config),
            "--weights",
            str(weights),
        ]
        self.plan.jobs.append(Job("eval", f"{table}/{row.stem}{suffix}", argv))

    def _use_r1m(self, cfg) -> bool:
        """+R1M evaluation: full scale and (asked for, or the distractors are present)."""
        if self.opt.scale != "full":
            return False
        return (
            self.opt.r1m
            if self.opt.r1m is not None
            else (Path(cfg.DATA.ROOT) / "revisitop1m").is_dir()
        )

    def add_table(self, table: str) -> None:
        """Train (once) and evaluate every row config of ``table``."""
        for row in row_configs(table):
            row_cfg = load_cfg(row)
            depth = row_cfg.MODEL.DEPTH
            deps = self._dependency_opts([row], depth)
            weights = self.ensure_model([row], depth)
            opts = [*deps, *_dataset_opts(row_cfg, self.opt.scale)]
            self._eval_job(row, table, "", opts, weights)
            if self._use_r1m(row_cfg):
                self._eval_job(row, table, "_r1m", [*opts, "TEST.R1M", "True"], weights)


def _share_feature_cache(eval_dir: Path, weights: Path) -> None:
    """Point <eval_dir>/features at one folder per trained model: its rows extract once.

    Safe: the evaluator keys every cached file by the model's weights and the extraction settings.
    """
    shared = weights.parent.with_name(weights.parent.name + ".features")
    shared.mkdir(parents=True, exist_ok=True)
    link = eval_dir / "features"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared.resolve(), target_is_directory=True)


def run_jobs(jobs: list[Job], log_dir: Path, keep_going: bool) -> list[dict]:
    """Run the jobs in order (a training whose checkpoint exists is skipped); returns timings."""
    log_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for job in jobs:
        if job.done is not None and job.done.is_file():
            print(f"[reproduce] {job.kind} {job.name}: {job.done} exists, skipped", flush=True)
            continue
        log = log_dir / f"{job.kind}-{job.name.replace('/', '_')}.log"
        print(f"[reproduce] {job.kind} {job.name} (log: {log})", flush=True)
        start = time.time()
        with log.open("w") as f:
            code = subprocess.run(
                job.argv, stdout=f, stderr=subprocess.STDOUT, env=_child_env()
            ).returncode
        records.append(
            {
                "kind": job.kind,
                "name": job.name,
                "seconds": round(time.time() - start, 1),
                "returncode": code,
            }
        )
        print(f"[reproduce]   -> exit {code} in {records[-1]['seconds']:.0f} s", flush=True)
        if code and not keep_going:
            raise RuntimeError(f"{job.kind} {job.name} failed (exit {code}); see {log}")
    return records


def _child_env() -> dict:
    """The environment of the jobs: this checkout importable, progress bars kept short in logs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return env
