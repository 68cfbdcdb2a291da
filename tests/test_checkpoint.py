"""Atomic checkpoint writes and clear errors for missing, truncated and foreign files."""

from __future__ import annotations

import pytest
import torch

from retrieval.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_model_state,
    save_checkpoint,
)
from retrieval.config import load_cfg
from retrieval.modeling.official_names import to_official
from retrieval.modeling.registry import build_model


def test_save_then_load(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 7}, tmp_path / "a/ckpt.pth")
    obj = load_checkpoint(path)
    assert obj["iteration"] == 7 and torch.equal(obj["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint({"iteration": 1}, tmp_path / "ckpt.pth")

    def boom(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_truncated_file_is_named(tmp_path):
    path = save_checkpoint({"model": {"w": torch.randn(1000)}}, tmp_path / "full.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated"):
        load_checkpoint(cut)


def test_missing_and_foreign(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth.*holds a list"):
        load_checkpoint(tmp_path / "list.pth")


@pytest.mark.parametrize("arch", ["senet", "cvnet_global"])
def test_read_model_state_reads_the_arch_of_an_official_checkpoint(tmp_path, arch):
    model = build_model(load_cfg(None, ["MODEL.ARCH", arch, "MODEL.DEPTH", "18"]))
    path = save_checkpoint(
        {"model_state": to_official(model.state_dict(), arch)}, tmp_path / "o.pyth"
    )
    _, state = read_model_state(path)  # no arch given: read off the keys
    model.load_state_dict(state, strict=True)


def test_read_model_state_names_a_foreign_official_checkpoint(tmp_path):
    path = save_checkpoint({"model_state": {"encoder_q.foo.weight": torch.ones(1)}}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a known official checkpoint"):
        read_model_state(path)
