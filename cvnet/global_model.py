"""CVNet-Global: ResNet -> GeM (learnable p) -> FC -> L2 (spec/cvnet.md §2)."""

from __future__ import annotations

import torch
from torch import nn
from yacs.config import CfgNode

from retrieval.modeling.backbone import ResNetBackbone
from retrieval.modeling.head import GlobalHead, l2_normalize
from retrieval.modeling.pretrained import init_backbone
from retrieval.modeling.registry import register_model


class CVNetGlobal(nn.Module):
    """Global descriptor network: backbone res5 -> GlobalHead -> L2-normalised descriptor."""

    def __init__(self, backbone: ResNetBackbone, head: GlobalHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def out_dim(self) -> int:
        """Descriptor dimension."""
        return self.head.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, D) L2-normalised descriptor."""
        return l2_normalize(self.head(self.backbone(x, ("res5",))["res5"]))


def build_global_head(cfg: CfgNode, in_dim: int, p_trainable: bool) -> GlobalHead:
    """GeM + FC head from MODEL.GEM_P / MODEL.REDUCTION_DIM / MODEL.FC_INIT."""
    return GlobalHead(
        in_dim, cfg.MODEL.REDUCTION_DIM, cfg.MODEL.GEM_P, p_trainable, cfg.MODEL.FC_INIT
    )


@register_model("cvnet_global")
def build_cvnet_global(cfg: CfgNode) -> CVNetGlobal:
    """CVNet-Global from the config (backbone initialised from MODEL.PRETRAINED when given)."""
    backbone = ResNetBackbone(cfg.MODEL.DEPTH)
    init_backbone(
        backbone, cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAINED_FORMAT, cfg.MODEL.INPUT_FORMAT
    )
    in_dim = backbone.output_shape()["res5"].channels
    return CVNetGlobal(backbone, build_global_head(cfg, in_dim, cfg.MODEL.GEM_TRAINABLE))
