"""Checkpoints: atomic saves, readable errors for corrupt files, strict loading of ours and official
weights.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.modeling.inspect import to_our_names
from retrieval.modeling.official_names import from_official, looks_official

# Keys only ever tolerated as missing: BN counters, irrelevant in eval and re-created at 0.
TOLERATED_MISSING_SUFFIX = "num_batches_tracked"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names file and keys."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a
    file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load on the CPU with one clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a torch checkpoint "
            f"({type(err).__name__}: {err})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict"
        )
    return obj


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: ours ('model'), pycls ('model_state') or a bare state
    dict.
    """
    for key in ("model", "model_state", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def _mismatch_report(model_state: Mapping, state: Mapping) -> list[str]:
    """Lines naming every missing, unexpected and mis-shaped key."""
    missing = [
        k for k in model_state if k not in state and not k.endswith(TOLERATED_MISSING_SUFFIX)
    ]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in state
        if k in model_state and tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    lines = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    return lines + [f"shape {line}" for line in shapes]


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that reports every bad key by name; only a missing num_batches_tracked is
    tolerated.
    """
    model_state = model.state_dict()
    problems = _mismatch_report(model_state, state)
    if problems:
        head = f"{source} does not fit {type(model).__name__} ({len(problems)} problems):\n  "
        raise CheckpointError(head + "\n  ".join(problems))
    model.load_state_dict(state, strict=False)


def read_model_state(
    path: str | os.PathLike, arch: str | None = None
) -> tuple[dict[str, Any], dict]:
    """(checkpoint object, its model state dict in our names): ours as stored, an official
    ``arch`` checkpoint converted (``arch`` None: the architecture is read off the keys)."""
    obj = load_checkpoint(path)
    state = extract_state_dict(obj)
    if looks_official(state):
        try:
            state = from_official(state, arch) if arch else to_our_names(state)[0]
        except KeyError as err:
            kind = f"official {arch}" if arch else "known official"
            raise CheckpointError(f"{path}: not a {kind} checkpoint: {err}") from None
    return obj, state


def load_model_weights(model: nn.Module, path: str | os.PathLike, arch: str) -> dict[str, Any]:
    """Load our or an official checkpoint into ``model`` strictly; returns the checkpoint object."""
    obj, state = read_model_state(path, arch)
    load_state_strict(model, state, f"checkpoint {str(path)!r}")
    return obj
