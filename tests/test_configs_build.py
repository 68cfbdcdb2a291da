"""Every shipped model config loads and builds its model (table rows: tests/test_tables.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.config import load_cfg
from retrieval.modeling.registry import build_model

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted(
    str(p.relative_to(REPO))
    for folder in ("senet", "cvnet", "demo")
    for p in (REPO / "configs" / folder).glob("*.yaml")
    if p.name != "scale.yaml"  # an overlay, not a model
)
CLASS_OF_ARCH = {"senet": "SENet", "cvnet_global": "CVNetGlobal", "cvnet_rerank": "CVNetRerank"}


def test_model_configs_found():
    assert len(MODEL_CONFIGS) >= 10


@pytest.mark.parametrize("path", MODEL_CONFIGS)
def test_config_builds_its_model(path):
    cfg = load_cfg(REPO / path, ["MODEL.PRETRAINED", ""])
    model = build_model(cfg).eval()
    assert type(model).__name__ == CLASS_OF_ARCH[cfg.MODEL.ARCH]
    if cfg.MODEL.DEPTH <= 50 and cfg.MODEL.ARCH != "cvnet_rerank":
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert out.shape == (1, cfg.MODEL.REDUCTION_DIM)
        assert torch.allclose(out.norm(dim=1), torch.ones(1), atol=1e-5)
