"""Facts about a state dict that tools report: architecture guess, ResNet depth, parameter count."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from retrieval.modeling.backbone import RESNET_SPECS
from retrieval.modeling.official_names import from_official, looks_official

_BLOCK = re.compile(r"backbone\.layer(\d)\.(\d+)\.")


def guess_depth(state: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth from the number of blocks per stage and the block type (our key names)."""
    blocks = {1: 0, 2: 0, 3: 0, 4: 0}
    for key in state:
        match = _BLOCK.search(key)
        if match:
            stage, index = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = any(key.endswith("conv3.weight") for key in state)
    layout = tuple(blocks[s] for s in (1, 2, 3, 4))
    for depth, (block, layers) in RESNET_SPECS.items():
        if tuple(layers) == layout and (block.expansion == 4) == bottleneck:
            return depth
    raise ValueError(f"blocks per stage {layout} match no ResNet depth {sorted(RESNET_SPECS)}")


def guess_arch(state: Mapping[str, torch.Tensor]) -> str:
    """'cvnet_rerank', 'senet' or 'cvnet_global' from characteristic keys (our key names)."""
    if any(key.startswith("cv_learner.") for key in state):
        return "cvnet_rerank"
    if any(key.startswith("ssm.") for key in state):
        return "senet"
    return "cvnet_global"


def guess_official_arch(state: Mapping[str, torch.Tensor]) -> str:
    """Architecture of an official checkpoint: re-ranker parts, else the CVNet ``encoder_q.``
    scope, else SENet (its backbone keys have no scope)."""
    if any(key.startswith(("conv2ds.", "cv_learner.")) for key in state):
        return "cvnet_rerank"
    if any(key.startswith("encoder_q.") for key in state):
        return "cvnet_global"
    return "senet"


def to_our_names(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(``state`` in our naming, its architecture); official checkpoints are converted (KeyError
    when their keys do not fit the guessed architecture)."""
    if not looks_official(state):
        return dict(state), guess_arch(state)
    arch = guess_official_arch(state)
    return from_official(state, arch), arch


def count_parameters(state: Mapping[str, torch.Tensor]) -> int:
    """Number of floating-point values, BN running statistics and counters excluded."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in state.items() if not k.endswith(skip))


def model_overrides(state: Mapping[str, torch.Tensor], arch: str) -> list[str]:
    """Config overrides (KEY VALUE ...) that build the model of a checkpoint without a stored
    config.

    ``state`` uses our naming; depth and whether GeM p is a parameter are read off the keys.
    """
    depth = guess_depth({key.removeprefix("encoder."): value for key, value in state.items()})
    p_trainable = any(key.endswith("head.pool.p") for key in state)
    return ["MODEL.ARCH", arch, "MODEL.DEPTH", str(depth), "MODEL.GEM_TRAINABLE", str(p_trainable)]
