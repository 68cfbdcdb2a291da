"""Correlation encoder ``cv_learner``: center-pivot 4D CNN -> 4D mean pool -> MLP (spec §3.4).

Layer table (in -> out, kernel, stride), each layer followed by GroupNorm(4) and ReLU:

    block1: 9->16 k5 s2
    block2: 16->16 k3 s1, 16->32 k3 s2
    block3: 32->32 k3 s1, 32->32 k3 s1, 32->64 k3 s2
    block4: 64->64 k3 s1, 64->64 k3 s1, 64->128 k3 s1

Feature-layer ablation (CVNet supp. S2.3, Tab. S5), our reading of the text:

* f4 (res5, stride 32): "the stride and kernel size in the first block are reduced by 1 and 3":
  block1 becomes k3 s1 (an even kernel 5-3=2 would make the two center-pivot branches disagree in
  size), so block1's output has the same resolution as for f3.
* fuse: the f3 and f4 correlations each pass their own block1 + block2 (f4 with the reduced block1,
  held in ``fuse_block1``/``fuse_block2``); the two outputs have the same shape and are merged by a
  sum before block3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvnet.conv4d import CenterPivotConv4d
from cvnet.padding import ValidGrid, masked_group_norm, masked_mean

# GroupNorm groups of every 4D layer.
NUM_GROUPS = 4
# Official block1 (kernel, stride) for the stride-16 f3 feature; its reduced form for f4 (Tab. S5).
BLOCK1_F3 = (5, 2)
BLOCK1_F4 = (3, 1)
# (out_channels, kernel, stride) of the layers of block2..block4.
LATER_BLOCKS = (
    ((16, 3, 1), (32, 3, 2)),
    ((32, 3, 1), (32, 3, 1), (64, 3, 2)),
    ((64, 3, 1), (64, 3, 1), (128, 3, 1)),
)
BLOCK1_CHANNELS = 16


def conv4d_block(
    in_channels: int, layers: Sequence[tuple[int, int, int]], symmetric: bool
) -> nn.Sequential:
    """[CenterPivotConv4d, GroupNorm, ReLU] per (out, kernel, stride) layer, as one Sequential."""
    modules: list[nn.Module] = []
    for out_channels, kernel, stride in layers:
        modules += [
            CenterPivotConv4d(in_channels, out_channels, kernel, stride, symmetric),
            nn.GroupNorm(NUM_GROUPS, out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*modules)


def group_norm_channels_last(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` over a channels-last 4D volume (B, ha, wa, hb, wb, C) -> same shape and layout."""
    batch, ha, wa, hb, wb, channels = x.shape
    # read as a channels-last (B, C, ha*wa, hb*wb) map, which group_norm keeps channels last
    plane = x.view(batch, ha * wa, hb * wb, channels).permute(0, 3, 1, 2)
    out = F.group_norm(plane, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return out.permute(0, 2, 3, 1).contiguous().view(x.shape)


def run_channels_last(
    layers: Sequence[nn.Module], x: torch.Tensor, valid: ValidGrid | None = None
) -> tuple[torch.Tensor, ValidGrid | None]:
    """[CenterPivotConv4d, GroupNorm, ReLU] modules of a block on (B, ha, wa, hb, wb, C) -> (output,
    its valid cells). ``valid``: the input's valid cells when it is zero-padded (cvnet/padding.py),
    else None."""
    for layer in layers:
        if isinstance(layer, CenterPivotConv4d):
            x = layer.forward_channels_last(x)
            valid = None if valid is None else valid.strided(layer.stride)
        elif isinstance(layer, nn.GroupNorm):
            if valid is None:
                x = group_norm_channels_last(layer, x)
            else:  # zero at padded cells, so the ReLU after it keeps them zero
                x = masked_group_norm(layer, x, valid)
        else:  # ReLU: elementwise, any layout
            x = layer(x)
    return x, valid


class CVLearner(nn.Module):
    """4D CNN over one or two correlation volumes -> (B, 2) match logits (index 1 = match).

    ``block1_specs`` holds one (kernel, stride) per input correlation: ((5, 2),) official f3, ((3,
    1),) f4, ((5, 2), (3, 1)) fuse. ``symmetric`` ties the query- and key-side 2D kernels of every
    4D conv (Tab. S7).
    """

    def __init__(
        self,
        in_channels: int = 9,
        block1_specs: Sequence[tuple[int, int]] = (BLOCK1_F3,),
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if len(block1_specs) not in (1, 2):
            raise ValueError(
                f"CVLearner takes one or two correlation inputs, got {len(block1_specs)}"
            )
        self.in_channels = in_channels
        stems = [self._stem(in_channels, spec, symmetric) for spec in block1_specs]
        self.block1, self.block2 = stems[0]
        if len(stems) == 2:
            self.fuse_block1, self.fuse_block2 = stems[1]
        self.block3 = conv4d_block(LATER_BLOCKS[0][-1][0], LATER_BLOCKS[1], symmetric)
        self.block4 = conv4d_block(LATER_BLOCKS[1][-1][0], LATER_BLOCKS[2], symmetric)
        width = LATER_BLOCKS[2][-1][0]
        self.mlp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 2)
        )
        # plain list (not registered twice): the per-input stems in input order
        self._stems = stems

    @staticmethod
    def _stem(
        in_channels: int, spec: tuple[int, int], symmetric: bool
    ) -> tuple[nn.Module, nn.Module]:
        """block1 with the given (kernel, stride) and the official block2."""
        kernel, stride = spec
        block1 = conv4d_block(in_channels, [(BLOCK1_CHANNELS, kernel, stride)], symmetric)
        return block1, conv4d_block(BLOCK1_CHANNELS, LATER_BLOCKS[0], symmetric)

    @property
    def num_inputs(self) -> int:
        """Number of correlation volumes forward() expects."""
        return len(self._stems)

    @property
    def first_convs(self) -> list[CenterPivotConv4d]:
        """The first 4D conv of each input's stem (block1's conv), in input order."""
        return [block1[0] for block1, _ in self._stems]

    def forward(self, corrs: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of (B, P, hq, wq, hk, wk) correlations -> (B, 2) logits, channels first throughout
        (the official layout; the straightforward path)."""
        x = sum(
            block2(block1(corr)) for corr, (block1, block2) in zip(corrs, self._stems, strict=True)
        )
        x = self.block4(self.block3(x))  # (B, 128, h, w, h', w')
        return self.mlp(x.flatten(2).mean(dim=2))  # 4D global average pool -> (B, 128) -> (B, 2)

    def from_first_convs(
        self, firsts: Sequence[torch.Tensor], valid: ValidGrid | None = None
    ) -> torch.Tensor:
        """Channels-last outputs of ``first_convs`` (B, h, w, h', w', 16), one per input -> (B, 2)
        logits; equal to ``forward`` up to float rounding (cvnet/conv4d.py: the two layouts).
        ``valid``: the cells of the first convs' outputs that hold data when the inputs were
        zero-padded (cvnet/padding.py), else None."""
        outputs = []
        for first, (block1, block2) in zip(firsts, self._stems, strict=True):
            x, after = run_channels_last(block1[1:], first, valid)  # block1's GN + ReLU
            outputs.append(run_channels_last(block2, x, after))
        x = sum(out for out, _ in outputs)
        x, after = run_channels_last(self.block3, x, outputs[0][1])
        x, after = run_channels_last(self.block4, x, after)  # (B, ..., 128)
        # 4D global average pool -> (B, 128) -> (B, 2)
        pooled = x.flatten(1, -2).mean(dim=1) if after is None else masked_mean(x, after)
        return self.mlp(pooled)
