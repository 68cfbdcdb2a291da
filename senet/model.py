"""SENet: ResNet -> SSM after stage 4 -> GeM (fixed p) -> FC -> L2 (spec/senet.md §2)."""

from __future__ import annotations

import torch
from torch import nn
from yacs.config import CfgNode

from cvnet.global_model import build_global_head
from retrieval.modeling.backbone import ResNetBackbone
from retrieval.modeling.head import GlobalHead, l2_normalize
from retrieval.modeling.pretrained import init_backbone
from retrieval.modeling.registry import register_model
from senet.ssm import SSM


class SENet(nn.Module):
    """Structural embedding network: the self-similarity module refines res5 before pooling."""

    def __init__(self, backbone: ResNetBackbone, ssm: SSM, head: GlobalHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.ssm = ssm
        self.head = head

    @property
    def out_dim(self) -> int:
        """Descriptor dimension."""
        return self.head.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, D) L2-normalised descriptor."""
        feat = self.backbone(x, ("res5",))["res5"]  # (B, C, H/32, W/32)
        return l2_normalize(self.head(self.ssm(feat)))


def build_ssm(cfg: CfgNode, in_dim: int) -> SSM:
    """The SSM with the ablation flags of MODEL.SSM."""
    ssm_cfg = cfg.MODEL.SSM
    return SSM(
        in_dim=in_dim,
        mid_dim=ssm_cfg.MID_DIM,
        unfold_size=ssm_cfg.UNFOLD_SIZE,
        kernel_size=ssm_cfg.KERNEL_SIZE,
        self_similarity=ssm_cfg.SELF_SIMILARITY,
        similarity=ssm_cfg.SIM,
        fusion=ssm_cfg.FUSION,
        init=ssm_cfg.INIT,
    )


@register_model("senet")
def build_senet(cfg: CfgNode) -> SENet:
    """SENet from the config; GeM p follows MODEL.GEM_TRAINABLE (official SENet: fixed, no key)."""
    backbone = ResNetBackbone(cfg.MODEL.DEPTH)
    init_backbone(
        backbone, cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAINED_FORMAT, cfg.MODEL.INPUT_FORMAT
    )
    in_dim = backbone.output_shape()["res5"].channels
    head = build_global_head(cfg, in_dim, cfg.MODEL.GEM_TRAINABLE)
    return SENet(backbone, build_ssm(cfg, in_dim), head)
