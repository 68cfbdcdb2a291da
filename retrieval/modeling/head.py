"""Global descriptor head: GeM pooling followed by the 'whitening' FC layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.modeling.choices import resolve_choice
from retrieval.modeling.pooling import GeM


def _keep_default_init(fc: nn.Linear) -> None:
    """PyTorch's Linear init, as the papers."""


def _identity_init(fc: nn.Linear) -> None:
    """Weight I, bias 0: the descriptor starts as the GeM vector itself (square heads only)."""
    if fc.out_features != fc.in_features:
        raise ValueError(
            f"fc_init='identity' needs MODEL.REDUCTION_DIM ({fc.out_features}) equal to the "
            f"backbone's {fc.in_features} channels"
        )
    nn.init.eye_(fc.weight)
    nn.init.zeros_(fc.bias)


# MODEL.FC_INIT -> initialisation of the head's FC.
FC_INITS = {"default": _keep_default_init, "identity": _identity_init}


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
        init = resolve_choice("fc_init", fc_init, FC_INITS)
        self.pool = GeM(p=p, trainable=p_trainable)
        self.fc = nn.Linear(in_dim, out_dim, bias=True)
        init(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return self.fc(self.pool(x))


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """L2-normalise along ``dim`` (eps 1e-12, as F.normalize)."""
    return F.normalize(x, p=2.0, dim=dim)
