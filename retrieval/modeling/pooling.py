"""Generalized-mean (GeM) pooling with a fixed or learnable exponent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """GeM(x) = (mean_hw clamp(x, eps)^p)^(1/p) per channel.

    p is learnable (CVNet) or fixed (SENet).
    """

    def __init__(self, p: float = 3.0, trainable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        if trainable:
            self.p = nn.Parameter(torch.full((1,), float(p)))
        else:
            # A plain tensor attribute: fixed p has no state_dict key, as in the official SENet.
            self.register_buffer("p", torch.full((1,), float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C)."""
        p = self.p.to(x.dtype)
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1)  # (B, C, 1, 1)
        return pooled.pow(1.0 / p).flatten(1)

    def extra_repr(self) -> str:
        return (
            f"p={self.p.item():.4f}, trainable={isinstance(self.p, nn.Parameter)}, eps={self.eps}"
        )
