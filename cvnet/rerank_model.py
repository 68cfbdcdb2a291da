"""CVNet-Rerank: encoder -> per-scale compressed pyramid -> cross-scale 4D correlation -> 4D CNN.

Module names follow the official checkpoint (spec/cvnet.md §4): ``encoder`` (-> ``encoder_q``),
``compress`` (-> ``conv2ds``) and ``cv_learner``, registered in that order so the converted state
dict lists the keys in the official order. The score is softmax(logits)[:, 1], the match probability
(spec §3.5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from yacs.config import CfgNode

from cvnet.correlation import correlation_fast, padded_unit_maps, pyramid_sizes, resize_bilinear
from cvnet.correlation_conv import correlate_first_layer
from cvnet.global_model import CVNetGlobal, build_cvnet_global
from cvnet.learner import BLOCK1_F3, BLOCK1_F4, CVLearner
from cvnet.padding import ValidGrid, ceil_div, round_up
from retrieval.modeling.choices import resolve_choice
from retrieval.modeling.registry import register_model

# MODEL.RERANK.FEATURE_LAYER -> correlated features (Tab. S5: f3 = pre-ReLU res4, f4 = res5).
FEATURE_LAYERS = {"res4": ("res4_prerelu",), "res5": ("res5",), "fuse": ("res4_prerelu", "res5")}
# block1 (kernel, stride) of the correlation encoder per backbone feature (see cvnet/learner.py).
BLOCK1_FOR_FEATURE = {"res4_prerelu": BLOCK1_F3, "res5": BLOCK1_F4}
# Correlation function: (query levels, key levels, scale pairs) -> (B, P, Hq, Wq, Hk, Wk).
Correlation = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[tuple[int, int]]], torch.Tensor
]


def scale_pairs(num_scales: int, cross_scale: bool) -> tuple[tuple[int, int], ...]:
    """(query scale, key scale) pairs, query-major; equal scales only without cross-scale (S12)."""
    if cross_scale:
        return tuple((i, j) for i in range(num_scales) for j in range(num_scales))
    return tuple((i, i) for i in range(num_scales))


def match_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits -> (B,) softmax(logits)[:, 1] in fp32, the match score (spec §3.5)."""
    return logits.float().softmax(dim=1)[:, 1]


class CVNetRerank(nn.Module):
    """Correlation verification re-ranker; ``forward(q, k)`` trains compress and cv_learner."""

    def __init__(
        self,
        encoder: CVNetGlobal,
        compress: nn.ModuleList,
        cv_learner: CVLearner,
        scales: Sequence[float] = (0.25, 0.5, 1.0),
        cross_scale: bool = True,
        feature_layer: str = "res4",
    ) -> None:
        super().__init__()
        self.feature_names = resolve_choice("feature_layer", feature_layer, FEATURE_LAYERS)
        if list(scales) != sorted(scales) or scales[-1] != 1.0:
            raise ValueError(
                f"scales must be ascending area ratios ending at 1.0 (full scale), got {scales}"
            )
        self.encoder = encoder
        self.compress = compress
        self.cv_learner = cv_learner
        self.scales = tuple(float(s) for s in scales)
        self.pairs = scale_pairs(len(self.scales), cross_scale)
        self._check_parts()

    def _check_parts(self) -> None:
        """The injected compress convs and cv_learner must fit the scales, pairs and features."""
        expected = len(self.scales) * len(self.feature_names)
        if len(self.compress) != expected:
            raise ValueError(
                f"compress holds {len(self.compress)} convs, expected {expected} (scales x layers)"
            )
        if self.cv_learner.in_channels != len(self.pairs):
            raise ValueError(
                f"cv_learner takes {self.cv_learner.in_channels} channels, pairs give "
                f"{len(self.pairs)}"
            )
        if self.cv_learner.num_inputs != len(self.feature_names):
            raise ValueError(
                f"cv_learner takes {self.cv_learner.num_inputs} inputs for {self.feature_names}"
            )

    @property
    def compress_dim(self) -> int:
        """Compressed channels C'."""
        return self.compress[0].out_channels

    def extract_dense(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> a dense map (B, C, h, w) per correlated feature (one unless 'fuse')."""
        feats = self.encoder.backbone(img, self.feature_names)
        return [feats[name] for name in self.feature_names]

    def build_pyramid(self, dense: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Resize + per-scale compress (spec §3.2) -> levels (B, C', h_i, w_i), layer-major."""
        levels = []
        for layer, feat in enumerate(dense):
            sizes = pyramid_sizes(feat.shape[-2], feat.shape[-1], self.scales)
            for index, size in enumerate(sizes):
                conv = self.compress[layer * len(self.scales) + index]
                # (B, C, h, w) -> (B, C, h_i, w_i) -> (B, C', h_i, w_i)
                levels.append(conv(resize_bilinear(feat, size)))
        return levels

    def correlate(
        self,
        q_pyr: Sequence[torch.Tensor],
        k_pyr: Sequence[torch.Tensor],
        correlation: Correlation = correlation_fast,
    ) -> list[torch.Tensor]:
        """One (B, P, Hq, Wq, Hk, Wk) correlation per feature layer (for tests and inspection)."""
        return [correlation(q, k, self.pairs) for q, k in self._per_layer(q_pyr, k_pyr)]

    def _per_layer(
        self, q_pyr: Sequence[torch.Tensor], k_pyr: Sequence[torch.Tensor]
    ) -> list[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]:
        """Layer-major pyramids -> (query levels, key levels) per feature layer."""
        num = len(self.scales)
        return [
            (q_pyr[start : start + num], k_pyr[start : start + num])
            for start in range(0, len(q_pyr), num)
        ]

    def score_correlations(self, corrs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Correlation volumes -> (B,) match probability softmax(logits)[:, 1], computed in fp32."""
        return match_probability(self.cv_learner(corrs))

    def logits(self, q_pyr: Sequence[torch.Tensor], k_pyr: Sequence[torch.Tensor]) -> torch.Tensor:
        """Query pyramid (batch 1 or B), key pyramids (batch B) -> (B, 2) logits.

        Equal to ``cv_learner(correlate(q_pyr, k_pyr))``, but each stem's first 4D conv is computed
        straight from the features (cvnet/correlation_conv.py): no full correlation volume.
        """
        return self.grouped_logits(q_pyr, [k_pyr])

    def grid(self, pyramid: Sequence[torch.Tensor]) -> tuple[int, int]:
        """(h, w) of the 4D CNN's first-layer output on one side of a pair: the full-scale level
        of the first feature layer through block1's stride."""
        height, width = pyramid[len(self.scales) - 1].shape[-2:]
        stride = self.cv_learner.first_convs[0].stride
        return ceil_div(height, stride), ceil_div(width, stride)

    def padded_grid(self, pyramid: Sequence[torch.Tensor], multiple: int) -> tuple[int, int]:
        """``grid`` rounded up to a multiple of ``multiple`` cells."""
        return tuple(round_up(n, multiple) for n in self.grid(pyramid))

    def grouped_logits(
        self,
        q_pyr: Sequence[torch.Tensor],
        k_groups: Sequence[Sequence[torch.Tensor]],
        multiple: int = 1,
    ) -> torch.Tensor:
        """Query pyramid, key pyramids in groups of equal size (batch B_g each) -> (sum B_g, 2).

        The query has batch 1 (or B with one group). Each group's logits equal ``logits(q_pyr,
        group)`` up to float rounding: every first-layer grid is zero-padded to the largest of its
        side, rounded up to ``multiple`` cells, and the padding is masked through the 4D CNN
        (cvnet/padding.py). Groups of different sizes then share one batch, and the conv shapes
        repeat across queries and database sizes.
        """
        q_grid, k_grids = self.grid(q_pyr), [self.grid(group) for group in k_groups]
        q_pad = tuple(round_up(n, multiple) for n in q_grid)
        k_pad = tuple(round_up(max(sizes), multiple) for sizes in zip(*k_grids))
        num = len(self.scales)
        firsts = []
        for stem, conv in enumerate(self.cv_learner.first_convs):
            q_levels = [q_pyr[stem * num : (stem + 1) * num]]
            k_levels = [group[stem * num : (stem + 1) * num] for group in k_groups]
            q_units = padded_unit_maps(q_levels, _input_size(q_levels, q_pad, conv.stride))
            k_units = padded_unit_maps(k_levels, _input_size(k_levels, k_pad, conv.stride))
            firsts.append(correlate_first_layer(conv, q_units, k_units, self.pairs))
        runs = [(group[0].shape[0], grid) for group, grid in zip(k_groups, k_grids)]
        valid = ValidGrid.of(q_grid, runs, (*q_pad, *k_pad))
        return self.cv_learner.from_first_convs(firsts, valid)

    def score_pyramids(
        self, q_pyr: Sequence[torch.Tensor], k_pyr: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Query pyramid (batch 1 or B) and key pyramids (batch B) -> (B,) match probabilities."""
        return match_probability(self.logits(q_pyr, k_pyr))

    def pair_logits(self, q_img: torch.Tensor, k_img: torch.Tensor) -> torch.Tensor:
        """(B, 3, Hq, Wq), (B, 3, Hk, Wk) -> (B, 2) logits (for a cross-entropy loss)."""
        q_pyr = self.build_pyramid(self.extract_dense(q_img))
        k_pyr = self.build_pyramid(self.extract_dense(k_img))
        return self.logits(q_pyr, k_pyr)

    def forward(self, q_img: torch.Tensor, k_img: torch.Tensor) -> torch.Tensor:
        """(B, 3, Hq, Wq), (B, 3, Hk, Wk) normalised images -> (B,) match probability."""
        return match_probability(self.pair_logits(q_img, k_img))


def _input_size(
    groups: Sequence[Sequence[torch.Tensor]], grid: tuple[int, int], stride: int
) -> tuple[int, int]:
    """Full-scale size a stem's input is padded to for a first-layer ``grid``: the groups' own size
    where they share one that gives that grid, else grid x stride (the extra cells past an odd size
    are the zeros the conv's own padding reads there)."""
    size = []
    for dim, cells in enumerate(grid):
        own = {levels[-1].shape[-2 + dim] for levels in groups}
        fits = len(own) == 1 and ceil_div(next(iter(own)), stride) == cells
        size.append(next(iter(own)) if fits else cells * stride)
    return tuple(size)


def build_compress(in_channels: Sequence[int], num_scales: int, compress_dim: int) -> nn.ModuleList:
    """Per feature layer and scale, Conv2d(C, C', 3, padding 1, no bias) (spec §3.2, Tab. S3)."""
    return nn.ModuleList(
        nn.Conv2d(channels, compress_dim, 3, padding=1, bias=False)
        for channels in in_channels
        for _ in range(num_scales)
    )


@register_model("cvnet_rerank")
def build_cvnet_rerank(cfg: CfgNode) -> CVNetRerank:
    """CVNet-Rerank from MODEL.DEPTH and MODEL.RERANK.* (weights are loaded separately)."""
    rcfg = cfg.MODEL.RERANK
    encoder = build_cvnet_global(cfg)
    names = FEATURE_LAYERS[rcfg.FEATURE_LAYER]
    shapes = encoder.backbone.output_shape()
    compress = build_compress(
        [shapes[name].channels for name in names], len(rcfg.SCALES), rcfg.COMPRESS_DIM
    )
    num_pairs = len(scale_pairs(len(rcfg.SCALES), rcfg.CROSS_SCALE))
    learner = CVLearner(
        num_pairs,
        [BLOCK1_FOR_FEATURE[name] for name in names],
        symmetric=rcfg.KERNEL == "symmetric",
    )
    return CVNetRerank(
        encoder, compress, learner, rcfg.SCALES, rcfg.CROSS_SCALE, rcfg.FEATURE_LAYER
    )
