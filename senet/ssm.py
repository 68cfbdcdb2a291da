"""SENet's Self-Similarity Module (SSM) and its ablation variants (spec/senet.md §2.3, Tab. S3-S5).

    x (B, D, H, W) -> q = reduce(x) (1×1, no bias) -> S = self-correlation(q) (B, C', H, W, K, K)
      -> E = encoder(S): valid (1, k, k) Conv3d+BN+ReLU blocks per position, mean over the remaining
         window, 1×1 conv + BN back to D channels (no ReLU)
      -> out = FFN(fuse(x, E)), fuse = x + E ('sum', official) or cat[x, E] ('concat', Tab. S5);
         the FFN is 1×1 -> ReLU -> 1×1 with NO residual around it.

Submodule names map one-to-one onto the official checkpoint:
``reduce`` = ``SSM.ch_reduction_encoder``, ``encoder.blocks`` = ``SSM.SSE.conv_in``,
``encoder.project`` = ``SSM.SSE.conv1x1_out``, ``ffn`` = ``SSM.FFN``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from retrieval.modeling.choices import resolve_choice
from senet.self_similarity import SelfCorrelation, check_size

FuseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fuse_sum(x: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
    """Sum fusion (official): (B, D, H, W) + (B, D, H, W) -> (B, D, H, W)."""
    return x + structure


def _fuse_concat(x: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
    """Concatenation fusion (Tab. S5): (B, D, H, W), (B, D, H, W) -> (B, 2D, H, W)."""
    return torch.cat((x, structure), dim=1)


# value -> (fusion, FFN input channels as a multiple of in_dim)
FUSIONS: dict[str, tuple[FuseFn, int]] = {"sum": (_fuse_sum, 1), "concat": (_fuse_concat, 2)}


def encoder_depth(unfold_size: int, kernel_size: int) -> int:
    """Number of valid k×k convs that shrink a K×K window as far as possible (not below 1×1)."""
    return (unfold_size - 1) // (kernel_size - 1)


def _window_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv3d (1, k, k) with bias -> BN3d -> ReLU: a valid k×k conv on each position's window."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (1, kernel_size, kernel_size), bias=True),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class SelfSimilarityEncoder(nn.Module):
    """Similarities (B, C_s, H, W, K, K) -> structural embedding (B, D, H, W); the official SSE."""

    def __init__(
        self, in_channels: int, mid_dim: int, out_dim: int, unfold_size: int, kernel_size: int
    ) -> None:
        super().__init__()
        depth = encoder_depth(unfold_size, kernel_size)
        rest = (_window_block(mid_dim, mid_dim, kernel_size) for _ in range(depth - 1))
        self.blocks = nn.Sequential(_window_block(in_channels, mid_dim, kernel_size), *rest)
        self.project = nn.Sequential(
            nn.Conv2d(mid_dim, out_dim, 1, bias=True), nn.BatchNorm2d(out_dim)
        )
        self.window_out = unfold_size - depth * (kernel_size - 1)

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        """(B, C_s, H, W, K, K) -> (B, out_dim, H, W)."""
        batch, channels, height, width, size, _ = sim.shape
        # Depth H·W with kernel depth 1: every position's window is convolved alone, shared weights.
        volume = sim.view(batch, channels, height * width, size, size)  # (B, C_s, HW, K, K)
        volume = self.blocks(volume)  # -> (B, C', HW, K', K'), valid convs
        pooled = volume.mean(dim=(-2, -1))  # (B, C', HW): official mean over the remaining window
        pooled = pooled.reshape(batch, -1, height, width)  # (B, C', H, W)
        return self.project(pooled)  # (B, C', H, W) -> (B, D, H, W)


class SSM(nn.Module):
    """Self-Similarity Module: (B, in_dim, H, W) -> (B, in_dim, H, W) structural feature map."""

    def __init__(
        self,
        in_dim: int = 2048,
        mid_dim: int = 256,
        unfold_size: int = 7,
        kernel_size: int = 3,
        self_similarity: str = "channelwise",
        similarity: str = "cosine",
        fusion: str = "sum",
        init: str = "pycls",
    ) -> None:
        super().__init__()
        check_size("in_dim", in_dim)
        check_size("mid_dim", mid_dim)
        check_size("unfold_size", unfold_size, minimum=3, odd=True)
        check_size("kernel_size", kernel_size, minimum=3, odd=True)
        if kernel_size > unfold_size:
            raise ValueError(f"kernel_size={kernel_size} must be <= unfold_size={unfold_size}")
        self.fuse, ffn_factor = resolve_choice("fusion", fusion, FUSIONS)
        self.reduce = nn.Conv2d(in_dim, mid_dim, 1, bias=False)
        self.correlation = SelfCorrelation(mid_dim, unfold_size, self_similarity, similarity)
        self.encoder = SelfSimilarityEncoder(
            self.correlation.out_channels, mid_dim, in_dim, unfold_size, kernel_size
        )
        self.ffn = nn.Sequential(
            nn.Conv2d(ffn_factor * in_dim, in_dim, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, in_dim, 1, bias=True),
        )
        self.out_channels = in_dim
        self.fusion = fusion
        self.init = init
        resolve_choice("init", init, INITS)(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, H, W) -> FFN(fuse(x, E)) of shape (B, in_dim, H, W)."""
        structure = self.encoder(self.correlation(self.reduce(x)))  # (B, C', H, W, K, K) inside
        return self.ffn(self.fuse(x, structure))  # no residual around the FFN (spec §7.6)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, init={self.init}"


def init_pycls(ssm: SSM) -> None:
    """pycls init (spec §2.6): Conv2d weights N(0, sqrt(2 / fan_out)), the rest PyTorch's."""
    for module in ssm.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.reset_parameters()
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))


@torch.no_grad()
def init_identity(ssm: SSM) -> None:
    """pycls init, then the SSM made the identity on its (post-ReLU, non-negative) input, so a
    network inserting it after a trained backbone starts as backbone + GeM + FC. Both FFN convs
    pass x through (weights [I | 0], zero bias; ReLU(x) = x for x >= 0). Sum fusion also zeroes the
    BN scale ending the structure branch (x + E = x); concat fusion leaves E alive but unweighted,
    so the zero block of the first FFN conv still gets a gradient (grad · E)."""
    init_pycls(ssm)
    if ssm.fusion == "sum":
        nn.init.zeros_(ssm.encoder.project[1].weight)
    for conv in (ssm.ffn[0], ssm.ffn[2]):
        out_dim, in_dim = conv.weight.shape[:2]
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(out_dim, in_dim)
        conv.bias.zero_()


# value of MODEL.SSM.INIT -> initialiser
INITS: dict[str, Callable[[SSM], None]] = {"pycls": init_pycls, "identity": init_identity}
