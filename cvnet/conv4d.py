"""Center-pivot 4D convolution (spec/cvnet.md §3.4) and its symmetric variant (CVNet Tab. S7).

A full k^4 kernel over a correlation volume (B, C, ha, wa, hb, wb) is replaced by the sum of two 2D
convolutions: one over the query dims (ha, wa) at every key position and one over the key dims (hb,
wb) at every query position. A stride s keeps the positions 0, s, 2s, ... of the *other* pair of
dims, so both branches end on the same (ceil(ha/s), ceil(wa/s), ceil(hb/s), ceil(wb/s)) grid.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), in float32 for a width-1 input when a gradient flows under CPU bf16 autocast.

    On CPU, PyTorch 2.14's bf16 backward of a stride-2 conv over a width-1 map returns non-finite
    gradients at random (measured: about one call in five; never seen for width >= 2 or stride 1;
    tests/test_conv4d.py). Such maps are common once training queries are small crops, and one bad
    gradient poisons every weight through the clipping norm. The forward is correct, so inference
    keeps bf16.
    """
    if (
        x.shape[-1] == 1
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
    ):
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


def _conv_query_dims(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Query-side branch: (B, C, ha, wa, hb, wb) -> (B, O, ha', wa', hb', wb')."""
    x = x[..., ::stride, ::stride]
    batch, channels, ha, wa, hb, wb = x.shape
    # (B, C, ha, wa, hb, wb) -> (B*hb*wb, C, ha, wa): key positions folded into the batch
    folded = x.permute(0, 4, 5, 1, 2, 3).reshape(batch * hb * wb, channels, ha, wa)
    out = _conv2d(conv, folded)
    out = out.view(batch, hb, wb, *out.shape[1:])  # (B, hb, wb, O, ha', wa')
    return out.permute(0, 3, 4, 5, 1, 2)


def _conv_key_dims(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Key-side branch: (B, C, ha, wa, hb, wb) -> (B, O, ha', wa', hb', wb')."""
    x = x[:, :, ::stride, ::stride]
    batch, channels, ha, wa, hb, wb = x.shape
    # (B, C, ha, wa, hb, wb) -> (B*ha*wa, C, hb, wb): query positions folded into the batch
    folded = x.permute(0, 2, 3, 1, 4, 5).reshape(batch * ha * wa, channels, hb, wb)
    out = _conv2d(conv, folded)
    out = out.view(batch, ha, wa, *out.shape[1:])  # (B, ha, wa, O, hb', wb')
    return out.permute(0, 3, 1, 2, 4, 5)


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
        return _conv_query_dims(self.conv1, x, self.stride) + _conv_key_dims(
            self.conv2, x, self.stride
        )
