"""Global descriptor head: GeM pooling followed by the 'whitening' FC layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.modeling.pooling import GeM


class GlobalHead(nn.Module):
    """GeM -> Linear(in_dim, out_dim, bias) producing the un-normalised global descriptor."""

    def __init__(self, in_dim: int, out_dim: int, p: float = 3.0, p_trainable: bool = True) -> None:
        super().__init__()
        self.pool = GeM(p=p, trainable=p_trainable)
        self.fc = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return self.fc(self.pool(x))


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """L2-normalise along ``dim`` (eps 1e-12, as F.normalize)."""
    return F.normalize(x, p=2.0, dim=dim)
