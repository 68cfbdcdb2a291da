"""2-process gloo DDP (torchrun + tools/train.py) equals one process with the same global batch.

Why the runs can be equal: the sampler gives rank r the r-th half of every global batch;
TRAIN.FREEZE_BN keeps BatchNorm on its running statistics, so each sample's descriptor does not
depend on the batch split (train-mode BN statistics over 2 images per rank would legitimately differ
from those over 4, and SyncBatchNorm has no CPU kernel); CurricularFace averages its t update over
ranks; the contrastive loss gathers keys in rank order (the single-process batch order) and every
query has a positive (its own key), so each rank's mean loss averages to the global mean, as DDP
averages gradients. What remains is float summation order: a tolerance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gldv2_fixtures import one_thread, tiny_cfg, tiny_opts, write_gldv2

from retrieval.checkpoint import load_checkpoint
from retrieval.engine.global_task import GlobalTask
from retrieval.engine.logger import read_metrics
from retrieval.engine.resume import last_checkpoint, seed_everything
from retrieval.engine.trainer import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(opts: list[str], nproc: int) -> subprocess.CompletedProcess:
    """tools/train.py under torchrun on CPU (gloo), one thread per process."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(REPO / "tools" / "train.py"),
        *opts,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _losses(output_dir: Path) -> list[dict]:
    """Loss records of metrics.jsonl."""
    return [
        {k: v for k, v in r.items() if "loss" in k}
        for r in read_metrics(output_dir / "metrics.jsonl")
    ]


@pytest.mark.timeout(300)
def test_two_process_gloo_equals_one_process(tmp_path):
    root = tmp_path / "data"
    write_gldv2(root, [3, 11, 7, 20], per_class=3)
    opts = (
        "MODEL.GEM_TRAINABLE",
        "True",
        "TRAIN.FREEZE_BN",
        "True",
        "TRAIN.MAX_ITERS",
        "2",
        "LOSS.MOMENTUM",
        "0.5",
        "TRAIN.CLIP_GRAD_NORM",
        "1.0",
    )
    result = _torchrun(tiny_opts(root, tmp_path / "ddp", *opts), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cfg = tiny_cfg(root, tmp_path / "single", *opts)
    seed_everything(cfg.SEED, False)
    train(cfg, GlobalTask(cfg))

    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for one, two in zip(single, ddp):
        assert one.keys() == two.keys()
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-5), name
    state_single = load_checkpoint(last_checkpoint(tmp_path / "single"))["module"]
    state_ddp = load_checkpoint(last_checkpoint(tmp_path / "ddp"))["module"]
    assert state_single.keys() == state_ddp.keys()
    for name, value in state_single.items():  # model, classifier, key encoder, queue + labels, t
        torch.testing.assert_close(state_ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert load_checkpoint(last_checkpoint(tmp_path / "ddp"))["world_size"] == 2
