"""Parameter-free self-correlation of SENet's SSM (spec/senet.md §2.3 steps 2-3; supp. Tab. S3, S4).

For every position the reduced feature q is compared with its K×K neighbours, r = K // 2:

    S[b, c, y, x, u, v] = relu(q̂[b, c, y, x] * q̂[b, c, y + u - r, x + v - r]),

with u the row offset index and v the column offset index. Neighbours outside the map are zeros
(zero padding, as the official ``nn.Unfold(K, padding=r)``), so border cells get 0, not a mask.
``self_similarity``: 'channelwise' keeps the C products apart (official); 'direct' sums them over
channels before the clamp, one similarity per neighbour (Tab. S3 "directly").
``similarity``: 'cosine' L2-normalises q over channels first (official, eps 1e-12); 'dot' does not
(Tab. S4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.modeling.choices import resolve_choice

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def check_size(arg: str, value: int, minimum: int = 1, odd: bool = False) -> None:
    """Raise a ValueError naming ``arg`` unless ``value`` is an int >= minimum (odd if asked)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum or (odd and value % 2 == 0):
        kind = "an odd int" if odd else "an int"
        raise ValueError(f"{arg}={value!r} is invalid; expected {kind} >= {minimum}")


def _cosine(q: torch.Tensor) -> torch.Tensor:
    """L2-normalise over channels: (B, C, H, W) -> (B, C, H, W), divided by max(||q||, 1e-12)."""
    return F.normalize(q, p=2.0, dim=1, eps=1e-12)


def _dot(q: torch.Tensor) -> torch.Tensor:
    """Raw features: the products become plain dot-product terms (Tab. S4 "Dot Product")."""
    return q


def _keep_channels(products: torch.Tensor) -> torch.Tensor:
    """Channel-wise self-similarity: (B, C, H, W, K) unchanged."""
    return products


def _sum_channels(products: torch.Tensor) -> torch.Tensor:
    """Direct self-similarity: (B, C, H, W, K) -> (B, 1, H, W, K), summed before the clamp."""
    return products.sum(dim=1, keepdim=True)


SIMILARITIES: dict[str, TensorFn] = {"cosine": _cosine, "dot": _dot}
# value -> (channel reduction of the products, whether the output keeps the C channels)
SELF_SIMILARITIES: dict[str, tuple[TensorFn, bool]] = {
    "channelwise": (_keep_channels, True),
    "direct": (_sum_channels, False),
}


def self_correlation(
    q: torch.Tensor, unfold_size: int, reduce_channels: TensorFn, out_channels: int
) -> torch.Tensor:
    """Clamped products with the K×K zero-padded neighbours: (B, C, H, W) -> (B, C_out, H, W, K, K).

    The output is written one window row at a time into a preallocated tensor, so the transient
    memory is 1/K of the result instead of a second full copy (broadcasting against an unfold view
    gives a non-contiguous result whose layout depends on the sizes).
    """
    batch, _, height, width = q.shape
    radius = unfold_size // 2
    padded = F.pad(q, (radius, radius, radius, radius))  # (B, C, H + 2r, W + 2r), zeros outside
    out = q.new_empty(batch, out_channels, height, width, unfold_size, unfold_size)
    for u in range(unfold_size):
        # (B, C, H, W + 2r) -> (B, C, H, W, K): neighbours at row offset u - r, columns -r..r
        row = padded[:, :, u : u + height].unfold(3, unfold_size, 1)
        out[:, :, :, :, u] = reduce_channels(q.unsqueeze(-1) * row)  # (B, C_out, H, W, K)
    return out.relu_()


class SelfCorrelation(nn.Module):
    """q (B, C, H, W) -> neighbour similarities (B, C_out, H, W, K, K); the official SCC."""

    def __init__(
        self,
        in_channels: int,
        unfold_size: int = 7,
        self_similarity: str = "channelwise",
        similarity: str = "cosine",
    ) -> None:
        super().__init__()
        check_size("in_channels", in_channels)
        check_size("unfold_size", unfold_size, minimum=3, odd=True)
        self.normalize = resolve_choice("similarity", similarity, SIMILARITIES)
        self.reduce_channels, keeps = resolve_choice(
            "self_similarity", self_similarity, SELF_SIMILARITIES
        )
        self.unfold_size = unfold_size
        self.out_channels = in_channels if keeps else 1
        self._names = (self_similarity, similarity)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, H, W, K, K), C_out = C ('channelwise') or 1 ('direct')."""
        return self_correlation(
            self.normalize(q), self.unfold_size, self.reduce_channels, self.out_channels
        )

    def extra_repr(self) -> str:
        mode, similarity = self._names
        return f"unfold_size={self.unfold_size}, self_similarity={mode}, similarity={similarity}"
