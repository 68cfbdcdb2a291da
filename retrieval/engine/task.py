"""The interface between the generic trainer and a training task, and small batch/module helpers.

A task supplies ``module`` (forward(batch) -> dict of losses; every tensor that is trained or
checkpointed lives in it: model, loss modules with their buffers, a key encoder), the dataset and
hooks; the trainer (retrieval.engine.trainer) does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset, default_collate
from yacs.config import CfgNode


class TrainTask:
    """What a training task provides; override the hooks you need."""

    module: (
        nn.Module
    )  # forward(batch: dict) -> dict of losses; holds every trained/checkpointed tensor
    dataset: Dataset  # items are dicts; the optional key 'unreadable' counts skipped images
    sample_labels: Sequence[int] | None = (
        None  # class of every sample (class-aware sampling); None = shuffle
    )

    def collate(self, samples: list) -> dict:
        """Merge samples into a batch."""
        return default_collate(samples)

    def before_epoch(self, epoch: int) -> None:
        """Called before the data of ``epoch`` is iterated."""

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. momentum encoder update)."""

    def extra_state(self) -> dict:
        """Task information stored in every checkpoint."""
        return {}

    def save_info(self, output_dir: Path) -> None:
        """Write task files to OUTPUT_DIR at the start (main process only)."""

    def evaluate(self, cfg: CfgNode, output_dir: Path) -> dict[str, float]:
        """Periodic evaluation (TRAIN.EVAL_PERIOD) writing into ``output_dir``; none by default."""
        return {}

    def export(self, path: Path) -> None:
        """Write the final model (main process only)."""


def set_train_mode(module: nn.Module, freeze_bn: bool) -> None:
    """Training mode, with BatchNorm layers kept in eval mode when ``freeze_bn``."""
    module.train()
    for layer in module.modules():
        if freeze_bn and isinstance(layer, _BatchNorm):
            layer.eval()


def _tensor_to_device(value: torch.Tensor, device: torch.device, channels_last: bool):
    """One tensor on ``device``; a 4-D float tensor (images) in channels_last when asked."""
    value = value.to(device, non_blocking=True)
    if channels_last and value.dim() == 4 and value.is_floating_point():
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """Move tensors, and lists of tensors (images of different sizes), to ``device``."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = _tensor_to_device(value, device, channels_last)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = [_tensor_to_device(v, device, channels_last) for v in value]
        moved[key] = value
    return moved
