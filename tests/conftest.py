"""Shared pytest fixtures: the test device, the gpu marker, paths to bundled test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config, items):
    """Skip gpu-marked tests when CUDA is absent (the only tests that may skip)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Device the suite runs on: TEST_DEVICE (cpu by default; cuda to rerun the suite on a GPU)."""
    return torch.device(os.environ.get("TEST_DEVICE", "cpu"))


@pytest.fixture
def data_dir() -> Path:
    """Folder of bundled test data (official key lists, revisitop ground truth)."""
    return DATA_DIR
