"""Training checkpoints: RNG states, the OUTPUT_DIR/last_checkpoint pointer, rotation and resume.

A checkpoint is written atomically (retrieval.checkpoint.save_checkpoint); only afterwards is the
small text file ``last_checkpoint`` replaced to name it, so the pointer always names a complete
file.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from yacs.config import CfgNode

from retrieval.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)
POINTER = "last_checkpoint"
PREFIX = "checkpoint_"


def rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) CUDA generator states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generator states saved by rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (set before CUDA initialises)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint taken after ``iteration`` optimiser steps."""
    return f"{PREFIX}{iteration:07d}.pth"


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by OUTPUT_DIR/last_checkpoint, or None when there is none."""
    pointer = Path(output_dir) / POINTER
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {str(path)!r}, which does not exist")
    return path


def write_checkpoint(state: dict, output_dir: str | os.PathLike, iteration: int, keep: int) -> Path:
    """Save atomically, point last_checkpoint at it, keep the newest ``keep`` files (0 = all)."""
    output_dir = Path(output_dir)
    path = save_checkpoint(state, output_dir / checkpoint_name(iteration))
    tmp = output_dir / f".{POINTER}.tmp"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, output_dir / POINTER)
    if keep > 0:
        for old in sorted(output_dir.glob(f"{PREFIX}*.pth"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


# Keys that define the sample order and schedule: changing them breaks exact continuation.
ORDER_KEYS = ("SEED", "TRAIN.BATCH_SIZE", "TRAIN.SAMPLES_PER_CLASS", "TRAIN.EPOCHS", "OPTIM")


def warn_order_changes(stored: CfgNode, cfg: CfgNode, path: Path) -> None:
    """Warn when a resumed run changed a key of ORDER_KEYS since the checkpoint was written."""
    for key in ORDER_KEYS:
        old, new = stored, cfg
        for part in key.split("."):
            old, new = old[part], new[part]
        if old != new:
            logger.warning("resuming %s with %s changed: %s -> %s", path, key, old, new)
