"""Global descriptor head: GeM pooling followed by the 'whitening' FC layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.modeling.pooling import GeM

FC_INITS = ("default", "identity")


class GlobalHead(nn.Module):
    """GeM -> Linear(in_dim, out_dim, bias) producing the un-normalised global descriptor.

    ``fc_init``: 'default' (PyTorch's Linear init) or 'identity' (weight I, bias 0; needs out_dim ==
    in_dim, as in the papers' 2048 -> 2048 heads): the descriptor starts as the GeM vector itself.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        p: float = 3.0,
        p_trainable: bool = True,
        fc_init: str = "default",
    ) -> None:
        super().__init__()
        if fc_init not in FC_INITS:
            raise ValueError(f"fc_init={fc_init!r} is not supported; allowed values: {FC_INITS}")
        if fc_init == "identity" and out_dim != in_dim:
            raise ValueError(
                f"fc_init='identity' needs MODEL.REDUCTION_DIM ({out_dim}) equal to the backbone's "
                f"{in_dim} channels"
            )
        self.pool = GeM(p=p, trainable=p_trainable)
        self.fc = nn.Linear(in_dim, out_dim, bias=True)
        if fc_init == "identity":
            nn.init.eye_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return self.fc(self.pool(x))


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """L2-normalise along ``dim`` (eps 1e-12, as F.normalize)."""
    return F.normalize(x, p=2.0, dim=dim)
