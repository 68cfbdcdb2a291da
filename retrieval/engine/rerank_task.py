"""Training task of CVNet-Rerank for the shared engine (tools/train.py, MODEL.ARCH cvnet_rerank).

The encoder (CVNet-Global backbone) comes from a trained global model (MODEL.RERANK.GLOBAL_WEIGHTS)
and is frozen: no gradient and BatchNorm in eval mode (spec/cvnet.md §6, "shared and frozen"); only
``compress`` and ``cv_learner`` train. Data: per-epoch tuples (cvnet/tuples.py) from the overlapped
pairs and hard-negative pools of tools/select_pairs.py, with Hide-and-Seek and the input geometry of
RERANK_TRAIN.GEOMETRY: square (TRAIN.AUG crop/jitter/flip to TRAIN.IMG_SIZE^2, equal shapes) or
native (aspect kept, as the test protocol feeds the re-ranker); RERANK_TRAIN.QUERY_CROP inliers
crops the query to the part the positive shows, as a test query is cropped to its landmark box.
Images travel as lists; the module batches the images, and the pairs, of equal shapes.

Loss: the 2-way cross-entropy of the match logits (class 1 = match), i.e. the binary cross-entropy
of l1 - l0, on positive pairs (q, p) and negative pairs (q, n), symmetrised over the input order:
the mean over (q,p), (p,q), (q,n), (n,q), which equals the mean of the losses of both orders (CVNet
supp. Tab. S7 "loss symmetrization").
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, default_collate
from yacs.config import CfgNode

from cvnet.rerank_model import CVNetRerank
from cvnet.tuples import (
    Box,
    HideAndSeek,
    TupleSampler,
    read_hard_negatives,
    read_pairs,
)
from retrieval.checkpoint import (
    load_model_weights,
    load_state_strict,
    read_model_state,
    save_checkpoint,
)
from retrieval.data.augment import NativeAugment, build_train_augment
from retrieval.data.gldv2 import Transform, image_path, read_train_csv
from retrieval.data.image_io import ImageReadError, read_image
from retrieval.engine.trainer import TrainTask
from retrieval.modeling.inspect import guess_arch
from retrieval.modeling.registry import build_model

logger = logging.getLogger(__name__)
ROLES = ("query", "positive", "negative")
# Smallest side of a cropped training query: the re-ranker's pyramid needs 17 px, the test protocol
# upscales queries below TEST.MIN_SIDE (32).
MIN_QUERY_SIDE = 32


def _grow(lo: float, hi: float, limit: int) -> tuple[float, float]:
    """Interval [lo, hi] grown about its centre to MIN_QUERY_SIDE, shifted to stay in [0, limit]."""
    need = max(MIN_QUERY_SIDE - (hi - lo), 0) / 2
    lo, hi = lo - need, hi + need
    shift = max(-lo, 0) - max(hi - limit, 0)
    return max(lo + shift, 0), min(hi + shift, limit)


def expand_box(box: Box, margin: float, width: int, height: int) -> Box:
    """``box`` grown by ``margin`` of its size on each side inside the (width, height) image, then
    to MIN_QUERY_SIDE where the image allows."""
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1 = _grow(max(x0 - mx, 0), min(x1 + mx, width), width)
    y0, y1 = _grow(max(y0 - my, 0), min(y1 + my, height), height)
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))


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
        query_boxes: Mapping[tuple[int, int], Box] | None = None,
        crop_margin: float = 0.1,
    ) -> None:
        self.image_ids, self.image_dir, self.sampler = image_ids, Path(image_dir), sampler
        self.transform, self.hide, self.seed, self.skip_unreadable = (
            transform,
            hide,
            seed,
            skip_unreadable,
        )
        self.query_boxes, self.crop_margin = query_boxes, crop_margin  # None: whole query
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the tuples of ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch, self.tuples = epoch, self.sampler.epoch_tuples(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _images(self, index: int) -> dict:
        """Augmented (3, H, W) query, positive and negative of tuple ``index``."""
        item, rng = self.tuples[index], np.random.default_rng([self.seed, self.epoch, index])
        out = {"hard": item.hard}
        for role, image in zip(ROLES, (item.query, item.positive, item.negative)):
            pixels = read_image(image_path(self.image_dir, self.image_ids[image]))
            if role == "query" and self.query_boxes is not None:
                height, width = pixels.shape[:2]
                box = self.query_boxes[item.query, item.positive]
                x0, y0, x1, y1 = expand_box(box, self.crop_margin, width, height)
                pixels = pixels[y0:y1, x0:x1]
            out[role] = self.hide(self.transform(pixels, rng), self.epoch, rng)
        return out

    def __getitem__(self, index: int) -> dict:
        """{"query", "positive", "negative": (3, H, W), "hard", "unreadable": tuples skipped}."""
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


def shape_groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


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

    def pyramids(self, images: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Images (3, H_i, W_i) -> per image its pyramid levels (1, C', h, w). Images of one shape
        share an encoder pass; no gradient through the encoder."""
        out: list[list[torch.Tensor]] = [[] for _ in images]
        for group in shape_groups([tuple(image.shape) for image in images]):
            with torch.no_grad():
                dense = self.model.extract_dense(torch.stack([images[i] for i in group]))
            levels = self.model.build_pyramid(dense)  # each (len(group), C', h, w)
            for row, index in enumerate(group):
                out[index] = [level[row : row + 1] for level in levels]
        return out

    def logits(self, a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per-pair pyramids of a and b (N pairs) -> (N, 2) match logits of the pairs (a_i, b_i);
        pairs of equal shapes are scored as one batch."""
        keys = [tuple(level.shape for level in x + y) for x, y in zip(a, b)]
        out: list[torch.Tensor] = [torch.empty(0)] * len(a)
        for group in shape_groups(keys):
            logits = self.model.logits(
                [torch.cat(levels) for levels in zip(*(a[i] for i in group))],
                [torch.cat(levels) for levels in zip(*(b[i] for i in group))],
            )  # (len(group), 2)
            for row, index in enumerate(group):
                out[index] = logits[row]
        return torch.stack(out)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Symmetrised match loss of (q, p) positives and (q, n) negatives; the images of each role
        are a list of (3, H, W) (or an (N, 3, S, S) batch)."""
        q, p, n = batch["query"], batch["positive"], batch["negative"]
        size = len(q)
        pyramids = self.pyramids([*q, *p, *n])
        q_pyr, p_pyr, n_pyr = pyramids[:size], pyramids[size : 2 * size], pyramids[2 * size :]
        # pairs (q, p) then (q, n): the anchors hold q twice
        anchors, others = q_pyr + q_pyr, p_pyr + n_pyr
        device = q[0].device
        target = torch.cat([torch.ones(size), torch.zeros(size)]).long().to(device)  # 1 = match
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


def build_rerank_augment(cfg: CfgNode) -> Transform:
    """The per-image transform of RERANK_TRAIN.GEOMETRY."""
    if cfg.RERANK_TRAIN.GEOMETRY == "native":
        return NativeAugment(cfg.TRAIN.IMG_SIZE, cfg.TRAIN.AUG.COLOR_JITTER, cfg.MODEL.INPUT_FORMAT)
    return build_train_augment(cfg)


def build_tuple_sampler(
    cfg: CfgNode, index_of: Mapping[str, int], labels: list[int], positives: dict[int, list[int]]
) -> TupleSampler:
    """TupleSampler from RERANK_TRAIN.*, the positives of the pairs CSV and the hard-negative pools
    (read from DATA.ROOT)."""
    r = cfg.RERANK_TRAIN
    pools = read_hard_negatives(Path(cfg.DATA.ROOT) / r.HARD_NEG_CSV, index_of)
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
        margin = cfg.RERANK_TRAIN.QUERY_CROP_MARGIN
        if margin < 0:
            raise ValueError(f"RERANK_TRAIN.QUERY_CROP_MARGIN must be >= 0, got {margin}")
        index_of = {image: i for i, image in enumerate(train_list.image_ids)}
        # one pass over the pairs CSV gives the sampler's positives and the query crops' boxes
        positives, query_boxes = read_pairs(
            root / cfg.RERANK_TRAIN.PAIRS_CSV, index_of, cfg.RERANK_TRAIN.QUERY_CROP == "inliers"
        )
        self.sampler = build_tuple_sampler(cfg, index_of, train_list.labels, positives)
        hide = HideAndSeek(
            cfg.RERANK_TRAIN.HIDE_GRID, tuple(cfg.RERANK_TRAIN.HIDE_PROB), cfg.TRAIN.EPOCHS
        )
        self.dataset = RerankTupleDataset(
            train_list.image_ids,
            root / cfg.TRAIN.IMAGE_DIR,
            self.sampler,
            build_rerank_augment(cfg),
            hide,
            cfg.SEED,
            cfg.DATA.SKIP_UNREADABLE,
            query_boxes,
            margin,
        )
        self.module = RerankTrainModule(build_rerank_model(cfg))

    def collate(self, samples: list[dict]) -> dict:
        """Images stay lists of (3, H, W), which differ in size under GEOMETRY native."""
        rest = default_collate([{k: v for k, v in s.items() if k not in ROLES} for s in samples])
        return {**rest, **{role: [s[role] for s in samples] for role in ROLES}}

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
