"""Scale-wise feature pyramid and 4D cross-scale cosine correlation (spec/cvnet.md §3.2-3.3).

Two equivalent correlation paths:

* ``correlation_reference``: the official order. Cosine correlation at each pair of pyramid sizes
  (norm product + 1e-8 in the denominator), then a 4D bilinear resize to the full-scale size (query
  dims first, key dims second), stack, clamp >= 0.
* ``correlation_fast``: bilinear interpolation is linear in each argument, so resizing the
  correlation equals correlating the resized L2-normalised features: normalise every location,
  upsample the normalised maps to the full-scale size, then one batched matmul per scale pair at
  full size. No 4D resize is ever materialised. The only numerical difference is the 1e-8 in the
  official denominator (relative 1e-8 / (|q| |k|)).

Scoring does not build either volume: ``cvnet/correlation_conv.py`` computes the first 4D conv
straight from the upsampled unit features. Both functions here stay as the references it is tested
against and for inspecting correlations (``CVNetRerank.correlate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Added to the product of the two norms in the official cosine.
COSINE_EPS = 1e-8
# Smallest norm used to normalise a location in the fast path (keeps all-zero vectors at zero).
NORM_EPS = 1e-12


def pyramid_sizes(height: int, width: int, scales: Sequence[float]) -> list[tuple[int, int]]:
    """Per area ratio s the size (round(h*sqrt(s)), round(w*sqrt(s))), Python round-half-to-even."""
    sizes = [(round(height * math.sqrt(s)), round(width * math.sqrt(s))) for s in scales]
    for scale, size in zip(scales, sizes):
        if min(size) < 1:
            raise ValueError(
                f"feature map {height}x{width} vanishes at pyramid scale {scale} (size {size}); "
                "images need at least 17 px per side for res4 features (33 px for res5)"
            )
    return sizes


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, align_corners=True as every CVNet resize: (B, C, h, w) -> (B, C, *size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # align_corners=True at the same size is the identity
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def cosine_correlation(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cosine (+1e-8 on the norm product): (B, C, hq, wq), (B, C, hk, wk) -> (B, hq, wq, hk, wk)."""
    batch, _, hq, wq = q.shape
    q_flat, k_flat = q.flatten(2), k.flatten(2)  # (B, C, hq*wq), (B, C, hk*wk)
    dots = torch.bmm(q_flat.transpose(1, 2), k_flat)  # (B, hq*wq, hk*wk)
    norms = q_flat.norm(dim=1).unsqueeze(2) * k_flat.norm(dim=1).unsqueeze(1)
    return (dots / (norms + COSINE_EPS)).view(batch, hq, wq, *k.shape[-2:])


def interpolate4d(
    corr: torch.Tensor, size_q: tuple[int, int], size_k: tuple[int, int]
) -> torch.Tensor:
    """4D bilinear resize, query dims first: (B, hq, wq, hk, wk) -> (B, *size_q, *size_k)."""
    batch, hq, wq, hk, wk = corr.shape
    # (B, hq, wq, hk, wk) -> (B, hk*wk, hq, wq): key dims as channels
    x = corr.reshape(batch, hq * wq, hk * wk).transpose(1, 2).reshape(batch, hk * wk, hq, wq)
    x = resize_bilinear(x, size_q)  # (B, hk*wk, Hq, Wq)
    # (B, hk*wk, Hq, Wq) -> (B, Hq*Wq, hk, wk): query dims as channels
    x = x.reshape(batch, hk * wk, -1).transpose(1, 2).reshape(batch, -1, hk, wk)
    x = resize_bilinear(x, size_k)  # (B, Hq*Wq, Hk, Wk)
    return x.reshape(batch, *size_q, *size_k)


def correlation_reference(
    q_levels: Sequence[torch.Tensor],
    k_levels: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Official order: correlate, 4D-resize to full size, stack, clamp -> (B, P, Hq, Wq, Hk, Wk).

    ``q_levels``/``k_levels`` are one pyramid (B, C', h_i, w_i) per scale; the last level is the
    full scale.
    """
    size_q, size_k = tuple(q_levels[-1].shape[-2:]), tuple(k_levels[-1].shape[-2:])
    corrs = [
        interpolate4d(cosine_correlation(q_levels[i], k_levels[j]), size_q, size_k)
        for i, j in pairs
    ]
    return torch.stack(corrs, dim=1).clamp(min=0)


def normalize_locations(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the channel vector of every location: (B, C, h, w) -> (B, C, h, w)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)


def upsampled_unit_levels(levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Normalise each level and resize it to the last (full-scale) level -> [(B, hw_full, C')],
    contiguous.

    The resize runs channels last: its output is then already the (B, hw, C') layout the
    correlation matmuls read, and CUDA's channels-first bilinear kernel spreads its threads over
    output positions only, looping over B x C' in each (0.65 ms per call for a batch of 16 on an
    H100, the second costliest op of the scoring).
    """
    size = tuple(levels[-1].shape[-2:])
    units = []
    for x in levels:
        x = normalize_locations(x).contiguous(memory_format=torch.channels_last)
        # (B, C', H, W) channels last: (B, H*W, C') in memory
        units.append(
            resize_bilinear(x, size).permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        )
    return units


class UnitMaps(NamedTuple):
    """One side's upsampled unit levels: per scale (B, H*W, C'), and their (H, W)."""

    maps: list[torch.Tensor]
    size: tuple[int, int]


def padded_unit_maps(
    groups: Sequence[Sequence[torch.Tensor]], size: tuple[int, int] | None = None
) -> UnitMaps:
    """Pyramids (per group: levels (B_g, C', h_i, w_i)) -> their upsampled unit levels, zero-padded
    at the bottom and right to ``size`` (default: the groups' common full-scale size) and
    concatenated over the groups -> UnitMaps of per scale (sum B_g, H*W, C')."""
    size = tuple(size or groups[0][-1].shape[-2:])
    per_group = []
    for levels in groups:
        height, width = levels[-1].shape[-2:]
        if height > size[0] or width > size[1]:
            raise ValueError(f"a {height}x{width} level cannot be padded to {size}")
        units = upsampled_unit_levels(levels)  # (B_g, h*w, C') per scale
        if (height, width) != size:
            units = [
                F.pad(
                    u.view(u.shape[0], height, width, -1),
                    (0, 0, 0, size[1] - width, 0, size[0] - height),
                ).view(u.shape[0], -1, u.shape[-1])
                for u in units
            ]
        per_group.append(units)
    maps = [torch.cat(scale) if len(scale) > 1 else scale[0] for scale in zip(*per_group)]
    return UnitMaps(maps, size)


def correlation_fast(
    q_levels: Sequence[torch.Tensor],
    k_levels: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Upsample-first equivalent of ``correlation_reference`` -> (B, P, Hq, Wq, Hk, Wk).

    A query pyramid of batch 1 is broadcast against a key batch of B (one query, many database
    images).
    """
    size_q, size_k = tuple(q_levels[-1].shape[-2:]), tuple(k_levels[-1].shape[-2:])
    qs = upsampled_unit_levels(q_levels)  # (Bq, Hq*Wq, C') per scale
    ks = [x.transpose(1, 2) for x in upsampled_unit_levels(k_levels)]  # (Bk, C', Hk*Wk) per scale
    corr = torch.stack([torch.matmul(qs[i], ks[j]) for i, j in pairs], dim=1)  # (B, P, HqWq, HkWk)
    return corr.clamp_(min=0).view(corr.shape[0], len(pairs), *size_q, *size_k)
