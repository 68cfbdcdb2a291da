"""Training losses of the global models (CVNet-Global, SENet).

* `CurricularFace`: margin softmax L_cls (Huang et al., CVPR 2020); it owns the class weights, so
  an exported retrieval model has no classifier.
* `SoftmaxClassifierLoss`: plain linear-softmax L_cls (LOSS.CLS softmax), margin-free.
* `MomentumContrastiveLoss`: label-aware momentum contrastive loss L_con with a key queue (CVNet
  supp. Eq. S3); `SupConLoss` is the Eq. S2 variant (Tab. S10).
* `momentum_copy` / `momentum_update` create and maintain the MoCo key encoder.
Modules take plain values; the builders that read the config live elsewhere.
"""

from retrieval.losses.contrastive import (
    EMPTY_LABEL,
    MomentumContrastiveLoss,
    SupConLoss,
    momentum_copy,
    momentum_update,
    multi_positive_contrastive_loss,
)
from retrieval.losses.curricularface import CurricularFace
from retrieval.losses.softmax import SoftmaxClassifierLoss

__all__ = [
    "EMPTY_LABEL",
    "CurricularFace",
    "MomentumContrastiveLoss",
    "SoftmaxClassifierLoss",
    "SupConLoss",
    "momentum_copy",
    "momentum_update",
    "multi_positive_contrastive_loss",
]
