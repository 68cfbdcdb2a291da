"""Training task of CVNet-Rerank for the shared engine (tools/train.py, MODEL.ARCH cvnet_rerank).

The encoder (CVNet-Global backbone) comes from a trained global model (MODEL.RERANK.GLOBAL_WEIGHTS)
and is frozen: no gradient and BatchNorm in eval mode (spec/cvnet.md §6, "shared and frozen"); only
``compress`` and ``cv_learner`` train. Data: per-epoch tuples (cvnet/tuples.py) from the overlapped
pairs and hard-negative pools of tools/select_pairs.py, with the TRAIN.AUG crop/jitter/flip and
Hide-and-Seek. Loss: the 2-way cross-entropy of the match logits (class 1 = match), i.e. the binary
cross-entropy of l1 - l0, on positive pairs (q, p) and negative pairs (q, n), symmetrised over the
input order: the mean over (q,p), (p,q), (q,n), (n,q), which equals the mean of the losses of both
orders (CVNet supp. Tab. S7 "loss symmetrization").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from yacs.config import CfgNode

from cvnet.rerank_model import CVNetRerank
from cvnet.tuples import HideAndSeek, TupleSampler, read_hard_negatives, read_positive_pairs
from retrieval.checkpoint import (
    load_model_weights,
    load_state_strict,
    read_model_state,
    save_checkpoint,
)
from retrieval.data.augment import build_train_augment
from retrieval.data.gldv2 import Transform, image_path, read_train_csv
from retrieval.data.image_io import ImageReadError, read_image
from retrieval.engine.trainer import TrainTask
from retrieval.modeling.inspect import guess_arch
from retrieval.modeling.registry import build_model

logger = logging.getLogger(__name__)
ROLES = ("query", "positive", "negative")


class RerankTupleDataset(Dataset):
    """Item i of epoch e: tuple i of e, three images augmented with an rng of (seed, e, i)."""

    def __init__(
        self,
        image_ids: list[str],
        image_dir: str | Path,
        sampler: TupleSampler,
        transform: Transform,
        hide: HideAndSeek,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        self.image_ids, self.image_dir, self.sampler = image_ids, Path(image_dir), sampler
        self.transform, self.hide, self.seed, self.skip_unreadable = (
            transform,
            hide,
            seed,
            skip_unreadable,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the tuples of ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch, self.tuples = epoch, self.sampler.epoch_tuples(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _images(self, index: int) -> dict:
        """Augmented (3, S, S) query, positive and negative of tuple ``index``."""
        item, rng = self.tuples[index], np.random.default_rng([self.seed, self.epoch, index])
        out = {"hard": item.hard}
        for role, image in zip(ROLES, (item.query, item.positive, item.negative)):
            pixels = read_image(image_path(self.image_dir, self.image_ids[image]))
            out[role] = self.hide(self.transform(pixels, rng), self.epoch, rng)
        return out

    def __getitem__(self, index: int) -> dict:
        """{"query", "positive", "negative": (3, S, S), "hard", "unreadable": tuples skipped}."""
        for attempt in range(len(self)):
            try:
                return {**self._images((index + attempt) % len(self)), "unreadable": attempt}
            except ImageReadError as err:
                if not self.skip_unreadable:
                    raise ImageReadError(f"{err} (set DATA.SKIP_UNREADABLE True to skip)") from None
                logger.warning("skipping a tuple with an unreadable image: %s", err)
        raise ImageReadError("no tuple of the epoch has three readable images")


def symmetric_match_loss(
    logits_ab: torch.Tensor, logits_ba: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean of the match cross-entropies of both input orders: (N, 2), (N, 2), (N,) -> scalar."""
    return 0.5 * (
        F.cross_entropy(logits_ab.float(), target) + F.cross_entropy(logits_ba.float(), target)
    )


class RerankTrainModule(nn.Module):
    """CVNet-Rerank with a frozen encoder: forward(batch) -> {'loss_match', 'acc_match'}."""

    def __init__(self, model: CVNetRerank) -> None:
        super().__init__()
        self.model = model
        model.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> RerankTrainModule:
        """Train mode for compress and cv_learner; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.model.encoder.eval()
        return self

    def pyramids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, S, S) -> pyramid levels (N, C', h_i, w_i); no gradient through the encoder."""
        with torch.no_grad():
            dense = self.model.extract_dense(images)
        return self.model.build_pyramid(dense)

    def logits(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """Pyramids of a and b (batch N) -> (N, 2) match logits of the pairs (a_i, b_i)."""
        return self.model.logits(a, b)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Symmetrised match loss of (q, p) positives and (q, n) negatives."""
        q, p, n = batch["query"], batch["positive"], batch["negative"]
        size = q.shape[0]
        levels = self.pyramids(torch.cat([q, p, n]))  # each level (3B, C', h, w)
        q_pyr, p_pyr, n_pyr = zip(*(level.split(size) for level in levels))
        # pairs (q, p) then (q, n): anchors (2B, ...) hold q twice
        anchors = [torch.cat([a, a]) for a in q_pyr]
        others = [torch.cat([b, c]) for b, c in zip(p_pyr, n_pyr)]
        target = torch.cat([torch.ones(size), torch.zeros(size)]).long().to(q.device)  # 1 = match
        logits_ab, logits_ba = self.logits(anchors, others), self.logits(others, anchors)
        accuracy = (torch.cat([logits_ab, logits_ba]).argmax(1) == target.repeat(2)).float().mean()
        return {
            "loss_match": symmetric_match_loss(logits_ab, logits_ba, target),
            "acc_match": accuracy.detach(),
        }


def load_encoder_weights(model: CVNetRerank, path: str) -> None:
    """Encoder weights from a global or re-rank checkpoint (ours or official).

    CVNet-Global and CVNet-Rerank checkpoints fill the whole encoder. A SENet checkpoint fills its
    backbone only (the re-ranker correlates backbone features; the SSM and head have no place in a
    CVNet-Global encoder), so a trained SENet can feed the re-ranker as in SENet supp. Tab. S1 (b).
    """
    _, state = read_model_state(path)
    source = f"MODEL.RERANK.GLOBAL_WEIGHTS {path!r}"
    arch = guess_arch(state)
    if arch == "cvnet_rerank":  # its encoder only
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if arch == "senet":
        backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        load_state_strict(model.encoder.backbone, backbone, f"{source} (SENet backbone)")
        return
    load_state_strict(model.encoder, state, source)


def build_rerank_model(cfg: CfgNode) -> CVNetRerank:
    """cvnet_rerank; MODEL.WEIGHTS (whole model) then MODEL.RERANK.GLOBAL_WEIGHTS (encoder)."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS, "cvnet_rerank")
    if cfg.MODEL.RERANK.GLOBAL_WEIGHTS:
        load_encoder_weights(model, cfg.MODEL.RERANK.GLOBAL_WEIGHTS)
    if not (cfg.MODEL.WEIGHTS or cfg.MODEL.RERANK.GLOBAL_WEIGHTS):
        logger.warning(
            "CVNet-Rerank: MODEL.RERANK.GLOBAL_WEIGHTS is empty: the frozen encoder is untrained"
        )
    return model


def build_tuple_sampler(cfg: CfgNode, image_ids: list[str], labels: list[int]) -> TupleSampler:
    """TupleSampler from RERANK_TRAIN.* (pairs and pools read from DATA.ROOT)."""
    root, r = Path(cfg.DATA.ROOT), cfg.RERANK_TRAIN
    index_of = {image: i for i, image in enumerate(image_ids)}
    positives = read_positive_pairs(root / r.PAIRS_CSV, index_of)
    pools = read_hard_negatives(root / r.HARD_NEG_CSV, index_of)
    return TupleSampler(
        labels,
        positives,
        pools,
        tuple(r.HARD_NEG_RATIO),
        r.HARD_NEG_POOL,
        cfg.TRAIN.EPOCHS,
        cfg.SEED,
    )


class RerankTask(TrainTask):
    """CVNet-Rerank training on the selected GLDv2 subset (CVNet supp. S1)."""

    sample_labels = None  # tuples are shuffled by the trainer's sampler

    def __init__(self, cfg: CfgNode) -> None:
        root, self.cfg = Path(cfg.DATA.ROOT), cfg
        train_list = read_train_csv(root / cfg.TRAIN.CSV)
        self.sampler = build_tuple_sampler(cfg, train_list.image_ids, train_list.labels)
        hide = HideAndSeek(
            cfg.RERANK_TRAIN.HIDE_GRID, tuple(cfg.RERANK_TRAIN.HIDE_PROB), cfg.TRAIN.EPOCHS
        )
        self.dataset = RerankTupleDataset(
            train_list.image_ids,
            root / cfg.TRAIN.IMAGE_DIR,
            self.sampler,
            build_train_augment(cfg),
            hide,
            cfg.SEED,
            cfg.DATA.SKIP_UNREADABLE,
        )
        self.module = RerankTrainModule(build_rerank_model(cfg))

    def before_epoch(self, epoch: int) -> None:
        """Draw the tuples (hard-negative ratio, Hide-and-Seek probability) of the epoch."""
        self.dataset.set_epoch(epoch)
        logger.info(
            "epoch %d: hard-negative ratio %.3f, Hide-and-Seek probability %.3f",
            epoch,
            self.sampler.hard_negative_ratio(epoch),
            self.dataset.hide.probability(epoch),
        )

    def extra_state(self) -> dict:
        """Where the tuples came from."""
        r = self.cfg.RERANK_TRAIN
        return {
            "pairs_csv": r.PAIRS_CSV,
            "hard_neg_csv": r.HARD_NEG_CSV,
            "tuples_per_epoch": len(self.sampler),
        }

    def export(self, path: Path) -> None:
        """model_final.pth: the re-ranker weights (frozen encoder included) and the config."""
        save_checkpoint({"model": self.module.model.state_dict(), "config": self.cfg.dump()}, path)


def build_task(cfg: CfgNode) -> RerankTask:
    """The CVNet-Rerank training task (entry point used by tools/train.py)."""
    return RerankTask(cfg)
