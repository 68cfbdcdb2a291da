"""Train a model: ``python tools/train.py --config C [KEY VALUE ...]`` (also under torchrun).

MODEL.ARCH picks the task: senet / cvnet_global -> global-descriptor training (global_task);
cvnet_rerank -> the re-ranker task (rerank_task).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from retrieval.cli import config_parser, parse_config, run_cli  # noqa: E402
from retrieval.engine.resume import seed_everything  # noqa: E402
from retrieval.engine.trainer import TrainTask, train  # noqa: E402

# MODEL.ARCH -> module providing build_task(cfg) -> TrainTask.
TASK_MODULES = {
    "senet": "retrieval.engine.global_task",
    "cvnet_global": "retrieval.engine.global_task",
    "cvnet_rerank": "retrieval.engine.rerank_task",
}


def build_task(cfg) -> TrainTask:
    """The training task of cfg.MODEL.ARCH."""
    name = TASK_MODULES.get(cfg.MODEL.ARCH)
    if name is None:
        raise SystemExit(
            f"MODEL.ARCH={cfg.MODEL.ARCH!r} has no training task; known: {sorted(TASK_MODULES)}"
        )
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise SystemExit(
            f"training MODEL.ARCH={cfg.MODEL.ARCH!r} needs {name}, which is not implemented yet"
        ) from None
    return module.build_task(cfg)


def main(argv: list[str] | None = None) -> dict:
    """Parse --config and overrides, build the task and train."""
    _, cfg = parse_config(config_parser(__doc__), argv)
    seed_everything(
        cfg.SEED, cfg.DETERMINISTIC
    )  # the same initial weights on every rank and in every run
    return train(cfg, build_task(cfg))


if __name__ == "__main__":
    run_cli(main)
