"""One explicit rename table between our module names and the official pycls-style checkpoint names.

Ours: torchvision ResNet names under ``backbone.`` (``layer3.5.bn2``), readable SSM/re-rank names.
Official (spec/cvnet.md §4, spec/senet.md §2.5): ``stem.conv``, ``s3.b6.f.b_bn``,
``SSM.SSE.conv_in``, ``conv2ds``; CVNet keys carry the ``encoder_q.`` prefix, SENet keys none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# torchvision block child -> pycls block child
BLOCK_CHILDREN = (
    ("conv1", "f.a"),
    ("bn1", "f.a_bn"),
    ("conv2", "f.b"),
    ("bn2", "f.b_bn"),
    ("conv3", "f.c"),
    ("bn3", "f.c_bn"),
    ("downsample.0", "proj"),
    ("downsample.1", "bn"),
)
# our module prefix -> official module prefix (relative to the model scope below)
MODULE_PREFIXES = (
    ("backbone.conv1.", "stem.conv."),
    ("backbone.bn1.", "stem.bn."),
    ("head.", "head."),
    ("ssm.reduce.", "SSM.ch_reduction_encoder."),
    ("ssm.encoder.blocks.", "SSM.SSE.conv_in."),
    ("ssm.encoder.project.", "SSM.SSE.conv1x1_out."),
    ("ssm.ffn.", "SSM.FFN."),
    ("compress.", "conv2ds."),
    ("cv_learner.", "cv_learner."),
)
# per architecture: our scope prefix -> official scope prefix (first match wins)
MODEL_SCOPES = {
    "senet": (("", ""),),
    "cvnet_global": (("", "encoder_q."),),
    "cvnet_rerank": (("encoder.", "encoder_q."), ("", "")),
}

_OURS_BLOCK = re.compile(r"^backbone\.layer(\d)\.(\d+)\.(.+)$")
_OFFICIAL_BLOCK = re.compile(r"^s(\d)\.b(\d+)\.(.+)$")
_OFFICIAL_BLOCK_ANYWHERE = re.compile(r"(^|\.)s\d\.b\d+\.")
_OFFICIAL_BLOCK_CHILD = re.compile(r"(^|\.)s\d\.b\d+\.(proj|bn)\.")


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    """Replace the first matching prefix of ``key`` using (ours, official) pairs; None if none
    match.
    """
    for ours, official in pairs:
        src, dst = (official, ours) if reverse else (ours, official)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


# Residual block keys per naming: regex capturing (stage, block index, child), the formatter of
# the other naming's block prefix, and the index shift (torchvision counts from 0, pycls from 1).
_BLOCK_RULES = {
    False: (_OURS_BLOCK, "s{stage}.b{index}.", 1),
    True: (_OFFICIAL_BLOCK, "backbone.layer{stage}.{index}.", -1),
}
_BLOCK_CHILD_PAIRS = tuple((ours + ".", official + ".") for ours, official in BLOCK_CHILDREN)


def _rename_module(key: str, reverse: bool) -> str:
    """Rename one key relative to its model scope: ours -> official, or back when ``reverse``."""
    pattern, prefix, shift = _BLOCK_RULES[reverse]
    match = pattern.match(key)
    if match:
        stage, index, rest = match.groups()
        child = _swap_prefix(rest, _BLOCK_CHILD_PAIRS, reverse)
        if child is not None:
            return prefix.format(stage=stage, index=int(index) + shift) + child
    renamed = _swap_prefix(key, MODULE_PREFIXES, reverse)
    if renamed is None:
        side = "official key" if reverse else "our key"
        raise KeyError(f"{side} {key!r} has no counterpart in the other naming")
    return renamed


def _scopes(arch: str) -> tuple[tuple[str, str], ...]:
    if arch not in MODEL_SCOPES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(MODEL_SCOPES)}")
    return MODEL_SCOPES[arch]


def to_official_key(key: str, arch: str) -> str:
    """Our state_dict key -> the official checkpoint key for ``arch``."""
    for ours, official in _scopes(arch):
        if key.startswith(ours):
            return official + _rename_module(key[len(ours) :], reverse=False)
    raise KeyError(f"key {key!r} is outside every scope of {arch}")


def from_official_key(key: str, arch: str) -> str:
    """Official checkpoint key for ``arch`` -> our state_dict key."""
    for ours, official in _scopes(arch):
        if key.startswith(official):
            return ours + _rename_module(key[len(official) :], reverse=True)
    raise KeyError(f"official key {key!r} does not start with any {arch} prefix")


def _official_order(keys: list[str]) -> list[str]:
    """pycls blocks register the shortcut (proj, bn) before the main path f: keep that order."""
    group_of = {}
    for key in keys:
        group_of.setdefault(_block_group(key), len(group_of))

    def rank(key: str) -> tuple[int, int]:
        is_shortcut = _OFFICIAL_BLOCK_CHILD.search(key) is not None
        return group_of[_block_group(key)], 0 if is_shortcut else 1

    return sorted(keys, key=rank)


def _block_group(key: str) -> str:
    """The 'sK.bN.' block a key belongs to (the key itself outside blocks)."""
    match = _OFFICIAL_BLOCK_ANYWHERE.search(key)
    return key[: match.end()] if match else key


def to_official(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename a whole state dict, ours -> official, in the official module order."""
    renamed = {to_official_key(key, arch): value for key, value in state.items()}
    return {key: renamed[key] for key in _official_order(list(renamed))}


def from_official(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename a whole state dict, official -> ours (order kept)."""
    return {from_official_key(key, arch): value for key, value in state.items()}


def looks_official(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys use the official pycls naming (``stem.conv``/``encoder_q.``/``SSM.``)."""
    official_markers = ("stem.conv.weight", "encoder_q.", "SSM.", "conv2ds.")
    return any(key.startswith(official_markers) or ".stem.conv." in key for key in state)
