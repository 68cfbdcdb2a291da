"""Zero-padded 4D grids: the cells of a channels-last volume (B, ha, wa, hb, wb, C) that hold data.

Why pad: on CUDA every new conv shape makes cuDNN plan each of the 4D CNN's 18 convs on the host
(about 1.3 ms each on an H100 host), and database images of different sizes cannot share a batch.
ROxf's 4,993 images give 88 res4 map sizes, and each of its 70 query crops has a size of its own.
Rounding every first-layer grid up to a multiple of a few cells merges them into a dozen database
buckets (93 % of the images in the two largest) and lets queries of similar sizes share shapes.

Padding changes no score beyond float rounding when:

* padded cells are zero wherever a conv reads them: the valid cells are a prefix of every dim, so a
  stride keeps them at the same indices, and a conv reading past them sees the zeros its own zero
  padding would have given the unpadded volume;
* the GroupNorm statistics and the final mean pooling count valid cells only (``masked_group_norm``,
  ``masked_mean``); GroupNorm leaves padded cells at zero, so the ReLU after it does too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def ceil_div(size: int, stride: int) -> int:
    """Cells left after a stride-``stride`` conv of odd kernel padded by k//2."""
    return -(-size // stride)


def round_up(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return ceil_div(size, multiple) * multiple


def _prefix_mask(
    valid: tuple[int, int], padded: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(*padded) bool, true on the first valid[0] x valid[1] cells."""
    rows = torch.arange(padded[0], device=device) < valid[0]
    return rows[:, None] & (torch.arange(padded[1], device=device) < valid[1])


@dataclass(frozen=True)
class ValidGrid:
    """Valid cells of a padded batch: query cells [:ha, :wa] (shared), key cells [:hb, :wb] per run
    of consecutive items (``runs``: (items, hb, wb) in batch order)."""

    query: tuple[int, int]
    runs: tuple[tuple[int, int, int], ...]
    # (padded shape, device) -> (padding mask, valid cells per item), built on first use
    _masks: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls, query: tuple[int, int], keys: Sequence[tuple[int, tuple[int, int]]], padded: tuple
    ) -> ValidGrid | None:
        """From the query grid, (items, key grid) runs and the padded (ha, wa, hb, wb); None when
        nothing is padded."""
        grid = cls(tuple(query), tuple((items, *key) for items, key in keys))
        full = all((*grid.query, h, w) == tuple(padded) for _, h, w in grid.runs)
        return None if full else grid

    def strided(self, stride: int) -> ValidGrid:
        """The valid cells after a conv of stride ``stride`` over all four dims."""
        if stride == 1:
            return self
        return ValidGrid(
            tuple(ceil_div(n, stride) for n in self.query),
            tuple((i, ceil_div(h, stride), ceil_div(w, stride)) for i, h, w in self.runs),
        )

    def _masks_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(padding mask (B, ha, wa, hb, wb, 1) bool, valid cells (B,) float32) for x's shape.

        Built on x's device once per shape, from comparisons with Python ints (no host-to-device
        copy, so no sync): a few ops per layer instead of a slice fill per run and dim (the host
        launches every op, on CUDA the bottleneck of small batches)."""
        key = (tuple(x.shape[:5]), x.device)
        if key not in self._masks:
            ha, wa, hb, wb = key[0][1:]
            query = _prefix_mask(self.query, (ha, wa), x.device)  # (ha, wa)
            keys = torch.cat(
                [
                    _prefix_mask((h, w), (hb, wb), x.device).expand(items, hb, wb)
                    for items, h, w in self.runs
                ]
            )  # (B, hb, wb)
            valid = query[None, :, :, None, None] & keys[:, None, None]  # (B, ha, wa, hb, wb)
            self._masks[key] = (~valid).unsqueeze(-1), valid.flatten(1).sum(1).float()
        return self._masks[key]

    def zero_outside(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the padded cells of (B, ha, wa, hb, wb, C) in place."""
        return x.masked_fill_(self._masks_for(x)[0], 0)

    def cells(self, like: torch.Tensor) -> torch.Tensor:
        """(B,) valid cells per item, float32 on ``like``'s device."""
        return self._masks_for(like)[1]


def masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, valid: ValidGrid) -> torch.Tensor:
    """``norm`` over the valid cells of (B, ha, wa, hb, wb, C) -> fp32, zero at padded cells.

    Computed in fp32 as autocast runs GroupNorm; two passes (mean, then the centred squares) as the
    unpadded kernel, so padding cannot cost precision. About 15 ops: each is launched from the host.
    """
    batch, channels = x.shape[0], x.shape[-1]
    groups = norm.num_groups
    x = valid.zero_outside(x.float())  # a conv leaves its bias etc. in the padding
    grouped = x.view(batch, -1, groups, channels // groups)  # (B, cells, G, C/G)
    count = valid.cells(x).view(batch, 1, 1, 1) * (channels // groups)
    centred = grouped - grouped.sum(dim=(1, 3), keepdim=True) / count
    centred = valid.zero_outside(centred.view(x.shape)).view(grouped.shape)
    var = centred.square().sum(dim=(1, 3), keepdim=True) / count  # (B, 1, G, 1)
    scale = (var + norm.eps).rsqrt_() * norm.weight.view(groups, -1)  # (B, 1, G, C/G)
    out = torch.addcmul(norm.bias.view(groups, -1), centred, scale)  # (B, cells, G, C/G)
    return valid.zero_outside(out.view(x.shape))


def masked_mean(x: torch.Tensor, valid: ValidGrid) -> torch.Tensor:
    """Mean over the valid cells of (B, ha, wa, hb, wb, C), zero elsewhere -> (B, C)."""
    return x.flatten(1, -2).sum(dim=1) / valid.cells(x).unsqueeze(1).to(x.dtype)
