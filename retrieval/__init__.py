"""Shared core of the retrieval codebase: config, backbones, data, losses, engine and evaluation."""

__version__ = "0.1.0"
