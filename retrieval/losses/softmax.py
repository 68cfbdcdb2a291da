"""Plain softmax classification loss: the margin-free alternative to CurricularFace for L_cls.

A linear classifier (with bias, weights not normalised) on the L2-normalised descriptor multiplied
by a fixed scale, then cross-entropy with optional label smoothing. Unlike CurricularFace (s = 30
and a margin from the first step), the logits start small and grow with the classifier weights,
which lets a randomly initialised network learn from a few hundred steps (configs/demo/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.losses.checks import check_class_inputs, check_class_sizes


class SoftmaxClassifierLoss(nn.Module):
    """(embeddings (B, d), labels (B,)) -> mean cross-entropy of a linear classifier's logits."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 10.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_class_sizes("SoftmaxClassifierLoss", embedding_dim, num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"SoftmaxClassifierLoss: label_smoothing={label_smoothing} must be in [0, 1)"
            )
        self.num_classes, self.scale, self.label_smoothing = num_classes, scale, label_smoothing
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_class_inputs(
            "SoftmaxClassifierLoss",
            embeddings,
            labels,
            self.classifier.in_features,
            self.num_classes,
        )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            logits = self.classifier(self.scale * F.normalize(embeddings.float(), dim=1))  # (B, C)
        return F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, label_smoothing={self.label_smoothing}"
