"""Registry of model architectures: ``MODEL.ARCH`` -> builder ``build(cfg) -> nn.Module``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn
from yacs.config import CfgNode

_BUILDERS: dict[str, Callable[[CfgNode], nn.Module]] = {}
# Packages whose import registers their architectures.
_MODEL_PACKAGES = ("senet", "cvnet")


def register_model(name: str) -> Callable:
    """Decorator registering ``build(cfg)`` under the architecture ``name``."""

    def wrap(fn: Callable[[CfgNode], nn.Module]) -> Callable[[CfgNode], nn.Module]:
        if name in _BUILDERS:
            raise KeyError(f"architecture {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return wrap


def build_model(cfg: CfgNode) -> nn.Module:
    """Build the architecture named by ``cfg.MODEL.ARCH`` (weights are loaded separately)."""
    for package in _MODEL_PACKAGES:
        importlib.import_module(package)
    if cfg.MODEL.ARCH not in _BUILDERS:
        raise KeyError(
            f"MODEL.ARCH {cfg.MODEL.ARCH!r} is not registered; allowed: {sorted(_BUILDERS)}"
        )
    return _BUILDERS[cfg.MODEL.ARCH](cfg)
