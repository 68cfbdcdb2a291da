"""CurricularFace margin softmax (Huang et al., CVPR 2020): the classification loss L_cls of CVNet.

The class weights W (num_classes, dim) live here rather than in the model, so an exported
retrieval model carries no classifier. Logits follow the paper (Eq. 6-9) and its reference code:
  * positive: cos(θ_y + m) while θ_y + m <= π, i.e. cos θ_y > cos(π − m); beyond that the
    monotonic fallback cos θ_y − m·sin(m) (= cos θ_y − sin(π − m)·m);
  * negative j is "hard" when cos θ_j > cos(θ_y + m) (the margin logit without the fallback);
    hard negatives become cos θ_j · (t + cos θ_j), easy ones stay cos θ_j;
  * t is an EMA of the batch-mean positive cosine, t ← (1 − α)·t + α·mean(cos θ_y) with α = 0.01
    (the paper writes the decay 0.99) and t⁽⁰⁾ = 0. It is updated without gradient, before the
    hard negatives of the same batch are modulated (as the reference code does), in training mode
    only, and averaged over processes under torch.distributed so every rank holds the same t.
Defaults m = 0.5, s = 64 are the CurricularFace paper's; CVNet's own values are not available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.engine.distributed import all_gather_tensor
from retrieval.losses.checks import check_class_inputs, check_class_sizes

# Keeps sqrt(1 − cos²) differentiable when an embedding coincides with its class weight.
_SIN_EPS = 1e-12


class CurricularFace(nn.Module):
    """CurricularFace loss holding the class weights: (embeddings (B, d), labels (B,)) -> scalar."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.5,
        scale: float = 64.0,
        t_momentum: float = 0.01,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        check_class_sizes("CurricularFace", embedding_dim, num_classes)
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"CurricularFace: margin={margin} must be an angle in [0, π) radians")
        if not 0.0 <= t_momentum <= 1.0:
            raise ValueError(f"CurricularFace: t_momentum={t_momentum} must be in [0, 1]")
        self.num_classes = num_classes
        self.margin = margin
        self.scale = scale
        self.t_momentum = t_momentum
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=init_std)
        self.register_buffer("t", torch.zeros(()))  # paper: t⁽⁰⁾ = 0
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback_shift = math.sin(math.pi - margin) * margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, d) embeddings (any norm), (B,) int labels -> mean cross-entropy of the logits."""
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, d), (B,) -> (B, num_classes) scaled curricular logits; updates t in training mode."""
        check_class_inputs(
            "CurricularFace", embeddings, labels, self.weight.shape[1], self.num_classes
        )
        labels = labels.long()[:, None]  # (B, 1)
        # fp32 even under autocast: s = 64 turns half-precision cosine errors into large errors.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = F.normalize(embeddings.float(), dim=1)  # (B, d)
            weight = F.normalize(self.weight.float(), dim=1)  # (C, d)
            cos = F.linear(emb, weight)  # (B, d) x (C, d) -> (B, C)
            cos = cos.clamp(-1.0, 1.0)
            cos_y = cos.gather(1, labels)  # (B, 1)
            sin_y = (1.0 - cos_y * cos_y).clamp_min(_SIN_EPS).sqrt()
            cos_y_m = cos_y * self.cos_m - sin_y * self.sin_m  # cos(θ_y + m)
            target = torch.where(cos_y > self.threshold, cos_y_m, cos_y - self.fallback_shift)
            if self.training:
                self._update_t(cos_y)
            hard = cos > cos_y_m  # (B, C); the label column is overwritten below
            out = torch.where(hard, cos * (self.t + cos), cos)
            out = out.scatter(1, labels, target)
        return out * self.scale

    @torch.no_grad()
    def _update_t(self, cos_y: torch.Tensor) -> None:
        """EMA step of the curriculum parameter t from the process-averaged mean positive cosine."""
        batch_mean = torch.stack(all_gather_tensor(cos_y.detach().mean())).mean()  # over ranks
        self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * batch_mean)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.weight.shape[1]}, num_classes={self.num_classes}, "
            f"margin={self.margin}, scale={self.scale}, t_momentum={self.t_momentum}"
        )
