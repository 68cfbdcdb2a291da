"""Initialise a backbone from a local ImageNet checkpoint (torchvision RGB or pycls BGR weights)."""

from __future__ import annotations

import logging
import os

from retrieval.checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_checkpoint,
    load_state_strict,
)
from retrieval.modeling.backbone import ResNetBackbone
from retrieval.modeling.official_names import from_official_key

logger = logging.getLogger(__name__)
# The channel order each ImageNet lineage was trained with.
FORMAT_INPUT = {"torchvision": "RGB", "pycls": "BGR"}


def _backbone_keys(state: dict, fmt: str) -> dict:
    """Keep the backbone entries of an ImageNet checkpoint, renamed to ResNetBackbone keys."""
    if fmt == "torchvision":
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    renamed = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        renamed[from_official_key(key, "senet").removeprefix("backbone.")] = value
    return renamed


def load_pretrained_backbone(
    backbone: ResNetBackbone, path: str | os.PathLike, fmt: str, input_format: str
) -> None:
    """Load ImageNet weights of format 'torchvision' or 'pycls' into ``backbone`` strictly."""
    if fmt not in FORMAT_INPUT:
        raise ValueError(f"pretrained format {fmt!r} unknown; allowed: {sorted(FORMAT_INPUT)}")
    try:
        state = _backbone_keys(extract_state_dict(load_checkpoint(path)), fmt)
    except KeyError as err:
        raise CheckpointError(f"{path}: not a {fmt} ImageNet ResNet checkpoint: {err}") from None
    load_state_strict(backbone, state, f"ImageNet checkpoint {str(path)!r} ({fmt})")
    if FORMAT_INPUT[fmt] != input_format:
        logger.warning(
            "%s weights were trained on %s input but MODEL.INPUT_FORMAT is %s",
            fmt,
            FORMAT_INPUT[fmt],
            input_format,
        )


def init_backbone(backbone: ResNetBackbone, path: str, fmt: str, input_format: str) -> None:
    """Load ImageNet weights when ``path`` is set, otherwise warn that the backbone is random."""
    if path:
        load_pretrained_backbone(backbone, path, fmt, input_format)
    else:
        logger.warning("MODEL.PRETRAINED is empty: the backbone starts from random weights")
