"""Center-pivot 4D convolution (spec/cvnet.md §3.4) and its symmetric variant (CVNet Tab. S7).

A full k^4 kernel over a correlation volume (B, C, ha, wa, hb, wb) is replaced by the sum of two 2D
convolutions: one over the query dims (ha, wa) at every key position and one over the key dims (hb,
wb) at every query position. A stride s keeps the positions 0, s, 2s, ... of the *other* pair of
dims, so both branches end on the same (ceil(ha/s), ceil(wa/s), ceil(hb/s), ceil(wb/s)) grid.

Two layouts of the same operator:

* ``forward``: channels first, (B, C, ha, wa, hb, wb), the official layout. Each branch folds the
  other pair of dims into the batch, which takes a permuted copy of the volume, and so does the sum
  of the two permuted outputs. It scores the straightforward (official-loop) path.
* ``forward_channels_last``: (B, ha, wa, hb, wb, C), the layout of the fast path (the 4D CNN after
  the fused first layer, ``CVLearner.from_first_convs``). Both branches read the volume in place:
  the key branch as a channels-last 2D batch (B*ha*wa, C, hb, wb), the query branch as a
  channels-last 3D volume (B, C, ha, wa, hb*wb) with a (k, k, 1) kernel, and both outputs come out
  in the same layout, so the sum is contiguous. Only a strided layer copies, and only the quarter of
  the volume it keeps. Measured on the CPU (R50 shapes, batch 8): copies and strided sums went from
  36 % of the scoring time to 13 % (what remains is in the fused first layer,
  ``cvnet/correlation_conv.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (B, C, ha, wa, hb, wb) <-> (B, C, hb, wb, ha, wa): a view, its own inverse.
SWAP_QUERY_KEY = (0, 1, 4, 5, 2, 3)


def _conv_bf16_safe(conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """conv(x), in float32 for a size-1 map dim when a gradient flows under CPU bf16 autocast.

    On CPU, PyTorch 2.14's bf16 backward of a stride-2 conv over a width-1 map returns non-finite
    gradients at random (measured: about one call in five; never seen for width >= 2 or stride 1;
    tests/test_conv4d.py). Such maps are common once training queries are small crops, and one bad
    gradient poisons every weight through the clipping norm. The forward is correct, so inference
    keeps bf16.
    """
    # seen for width 1; every size-1 dim is guarded (the 3D conv's dims are the 2D ones reordered)
    if (
        min(x.shape[2:]) == 1
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
    ):
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


def _conv3d_query_dims(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """conv's 2D kernel as a (k, k, 1) 3D conv over (B, C, ha, wa, L) -> (B, O, ha', wa', L)."""
    pad = conv.padding[0]
    weight = conv.weight.unsqueeze(-1)  # (O, C, k, k, 1)
    return _conv_bf16_safe(
        lambda v: F.conv3d(v, weight, conv.bias, (stride, stride, 1), (pad, pad, 0)), x
    )


def _conv_query_dims(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Query-side branch: (B, C, ha, wa, hb, wb) -> (B, O, ha', wa', hb', wb'). The key-side branch
    is this one on the volume with the two pairs of dims swapped (``SWAP_QUERY_KEY``)."""
    x = x[..., ::stride, ::stride]
    batch, channels, ha, wa, hb, wb = x.shape
    # (B, C, ha, wa, hb, wb) -> (B*hb*wb, C, ha, wa): key positions folded into the batch
    folded = x.permute(0, 4, 5, 1, 2, 3).reshape(batch * hb * wb, channels, ha, wa)
    out = _conv_bf16_safe(conv, folded)
    out = out.view(batch, hb, wb, *out.shape[1:])  # (B, hb, wb, O, ha', wa')
    return out.permute(0, 3, 4, 5, 1, 2)


def _query_dims_channels_last(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Query-side branch: (B, ha, wa, hb, wb, C) -> (B, ha', wa', hb', wb', O)."""
    if stride > 1:
        x = x[:, :, :, ::stride, ::stride].contiguous()
    batch, ha, wa, hb, wb, channels = x.shape
    # (B, ha, wa, hb*wb, C) read as a channels-last (B, C, ha, wa, hb*wb) volume: no copy
    volume = x.view(batch, ha, wa, hb * wb, channels).permute(0, 4, 1, 2, 3)
    out = _conv3d_query_dims(conv, volume, stride)  # (B, O, ha', wa', hb*wb), channels last
    # contiguous(): a no-op when the conv kept channels last (it does for float32/bf16); a copy
    # where it could not tell the layout (size-1 dims) or has no channels-last kernel (float64)
    return out.permute(0, 2, 3, 4, 1).contiguous().view(batch, *out.shape[2:4], hb, wb, -1)


def _key_dims_channels_last(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Key-side branch: (B, ha, wa, hb, wb, C) -> (B, ha', wa', hb', wb', O)."""
    if stride > 1:
        x = x[:, ::stride, ::stride].contiguous()
    batch, ha, wa, hb, wb, channels = x.shape
    # (B*ha*wa, hb, wb, C) read as a channels-last (B*ha*wa, C, hb, wb) batch: no copy
    folded = x.view(batch * ha * wa, hb, wb, channels).permute(0, 3, 1, 2)
    out = _conv_bf16_safe(conv, folded)  # (B*ha*wa, O, hb', wb'), channels last
    return out.permute(0, 2, 3, 1).contiguous().view(batch, ha, wa, *out.shape[2:], -1)


class CenterPivotConv4d(nn.Module):
    """4D conv = conv1 over the query dims + conv2 over the key dims (biased 2D convs, spec §3.4).

    ``symmetric=True`` (Tab. S7) ties the two 2D kernels: ``conv2`` is the very same module as
    ``conv1``, so the 4D kernel is invariant to swapping the query and key dims (the state dict then
    lists the shared tensors under both names).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"center-pivot kernel size must be odd (pads k//2), got {kernel_size}")
        self.stride = stride
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=True
        )
        self.conv2 = (
            self.conv1
            if symmetric
            else nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=True
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ha, wa, hb, wb) -> (B, O, ceil(ha/s), ceil(wa/s), ceil(hb/s), ceil(wb/s))."""
        key_side = _conv_query_dims(self.conv2, x.permute(SWAP_QUERY_KEY), self.stride)
        return _conv_query_dims(self.conv1, x, self.stride) + key_side.permute(SWAP_QUERY_KEY)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ha, wa, hb, wb, C) contiguous -> (B, ceil(ha/s), ..., ceil(wb/s), O) contiguous."""
        out = _query_dims_channels_last(self.conv1, x, self.stride)
        return out.add_(_key_dims_channels_last(self.conv2, x, self.stride))
