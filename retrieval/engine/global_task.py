"""Training task of the global-descriptor models (SENet, CVNet-Global) on GLDv2-clean.

Loss (CVNet-Global recipe, spec/cvnet.md §6; assumed for SENet, spec/senet.md §3.1):
  L = LOSS.CLS_WEIGHT · L_cls (CurricularFace; the class weights live in the loss)
    + LOSS.CON_WEIGHT · L_con (momentum contrastive, CVNet supp. Eq. S3, or SupCon, Eq. S2),
either term switchable off ('none'). L_con contrasts the query descriptors with key descriptors of a
momentum copy of the model (no gradient; θ_k ← m·θ_k + (1 − m)·θ_q after every optimiser step)
and a labelled key queue. The key encoder runs in the module's mode (batch statistics in training,
MoCo-style, without shuffle-BN). The exported model_final.pth holds the retrieval model and config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from yacs.config import CfgNode

from retrieval.checkpoint import load_model_weights, save_checkpoint
from retrieval.data.augment import build_train_augment
from retrieval.data.gldv2 import GLDv2Train, read_train_csv, write_class_list
from retrieval.engine.trainer import TrainTask
from retrieval.losses import (
    CurricularFace,
    MomentumContrastiveLoss,
    SoftmaxClassifierLoss,
    SupConLoss,
    momentum_copy,
    momentum_update,
)
from retrieval.modeling.registry import build_model

CLASS_LIST = "train_classes.json"


class GlobalTrainModule(nn.Module):
    """Query model + CurricularFace and/or contrastive loss: forward(batch) -> weighted losses."""

    def __init__(
        self,
        model: nn.Module,
        cls_loss: nn.Module | None,
        con_loss: nn.Module | None,
        cls_weight: float = 0.5,
        con_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if cls_loss is None and con_loss is None:
            raise ValueError(
                "GlobalTrainModule: both losses are off (LOSS.CLS and LOSS.CON are 'none')"
            )
        self.model, self.cls_loss, self.con_loss = model, cls_loss, con_loss
        self.key_encoder = momentum_copy(model) if con_loss is not None else None
        self.cls_weight, self.con_weight = cls_weight, con_weight

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch['image'] (B, 3, S, S), batch['label'] (B,) -> {'loss_cls', 'loss_con'}."""
        images, labels = batch["image"], batch["label"]
        q = self.model(images)  # (B, D) L2-normalised
        losses = {}
        if self.cls_loss is not None:
            losses["loss_cls"] = self.cls_weight * self.cls_loss(q, labels)
        if self.con_loss is not None:
            with torch.no_grad():
                k = self.key_encoder(images)  # (B, D), no gradient
            losses["loss_con"] = self.con_weight * self.con_loss(q, k, labels)
        return losses

    @torch.no_grad()
    def momentum_step(self, momentum: float) -> None:
        """Key-encoder update after an optimiser step (no-op without the contrastive loss)."""
        if self.key_encoder is not None:
            momentum_update(self.key_encoder, self.model, momentum)


def build_cls_loss(cfg: CfgNode, dim: int, num_classes: int) -> nn.Module | None:
    """CurricularFace or the softmax classifier from LOSS.CLS_* (None when LOSS.CLS is 'none')."""
    loss = cfg.LOSS
    if loss.CLS == "none":
        return None
    if loss.CLS == "softmax":
        return SoftmaxClassifierLoss(dim, num_classes, loss.CLS_SCALE, loss.LABEL_SMOOTHING)
    return CurricularFace(dim, num_classes, margin=loss.CLS_MARGIN, scale=loss.CLS_SCALE)


def build_con_loss(cfg: CfgNode, dim: int) -> nn.Module | None:
    """Momentum contrastive (Eq. S3) or SupCon (Eq. S2) from LOSS.* (None for LOSS.CON 'none')."""
    kinds = {"momentum": MomentumContrastiveLoss, "supcon": SupConLoss}
    if cfg.LOSS.CON == "none":
        return None
    if cfg.LOSS.CON not in kinds:
        raise ValueError(f"LOSS.CON={cfg.LOSS.CON!r}; expected one of {sorted(kinds)} or 'none'")
    return kinds[cfg.LOSS.CON](dim, cfg.LOSS.QUEUE_SIZE, cfg.LOSS.TEMPERATURE, cfg.LOSS.CON_MARGIN)


def build_global_train_module(
    cfg: CfgNode, model: nn.Module, num_classes: int
) -> GlobalTrainModule:
    """The training module of a global model with the losses of LOSS.*."""
    dim = model.out_dim
    return GlobalTrainModule(
        model,
        build_cls_loss(cfg, dim, num_classes),
        build_con_loss(cfg, dim),
        cfg.LOSS.CLS_WEIGHT,
        cfg.LOSS.CON_WEIGHT,
    )


def _numeric(results: dict, prefix: str = "") -> dict[str, float]:
    """Flatten a nested result dict to its numeric leaves ('a/b' names)."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(_numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class GlobalTask(TrainTask):
    """GLDv2 training of the model named by MODEL.ARCH (senet | cvnet_global)."""

    def __init__(self, cfg: CfgNode) -> None:
        root = Path(cfg.DATA.ROOT)
        self.cfg, self.csv_path = cfg, root / cfg.TRAIN.CSV
        self.train_list = read_train_csv(self.csv_path)
        self.dataset = GLDv2Train(
            self.train_list,
            root / cfg.TRAIN.IMAGE_DIR,
            build_train_augment(cfg),
            cfg.SEED,
            cfg.DATA.SKIP_UNREADABLE,
        )
        self.sample_labels = self.train_list.labels
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            load_model_weights(model, cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH)
        self.module = build_global_train_module(cfg, model, len(self.train_list.classes))

    @property
    def model(self) -> nn.Module:
        """The retrieval model being trained."""
        return self.module.model

    def before_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of the epoch."""
        self.dataset.set_epoch(epoch)

    def after_step(self) -> None:
        """Momentum update of the key encoder (LOSS.MOMENTUM)."""
        self.module.momentum_step(self.cfg.LOSS.MOMENTUM)

    def extra_state(self) -> dict:
        """Class list and identity of the training CSV."""
        return {
            "classes": self.train_list.classes,
            "csv": str(self.csv_path),
            "csv_sha1": self.train_list.csv_sha1,
        }

    def save_info(self, output_dir: Path) -> None:
        """OUTPUT_DIR/train_classes.json: class index -> landmark id, and the CSV's identity."""
        write_class_list(self.train_list, str(self.csv_path), output_dir / CLASS_LIST)

    def evaluate(self, cfg: CfgNode, output_dir: Path) -> dict[str, float]:
        """retrieval.evaluation.evaluator.evaluate on TEST.DATASETS; numeric results flattened."""
        from retrieval.evaluation.evaluator import evaluate  # lazy: evaluation imports faiss & co.

        try:
            return _numeric(evaluate(cfg, self.model, output_dir=output_dir))
        finally:
            self.model.train()  # the evaluator set eval mode; the trainer resets BN modes per epoch

    def export(self, path: Path) -> None:
        """model_final.pth: retrieval model weights + config (no classifier, no key encoder)."""
        save_checkpoint({"model": self.model.state_dict(), "config": self.cfg.dump()}, path)


def build_task(cfg: CfgNode) -> GlobalTask:
    """The global-descriptor training task (entry point used by tools/train.py)."""
    return GlobalTask(cfg)
