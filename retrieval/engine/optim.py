"""Optimiser, per-iteration learning-rate schedule and gradient clipping.

Schedule (per optimiser step ``it`` of ``total`` steps, warm-up of ``warmup`` steps):
  it < warmup:  factor = f0 + (1 - f0) * it / warmup                      (linear from f0)
  cosine:       factor = 0.5 * (1 + cos(pi * (it - warmup) / (total - warmup)))       (1 -> 0)
  step:         factor = gamma ** #{s in steps : it >= s}             (steps in iterations)
lr = OPTIM.LR * factor. No weight decay on 1-D parameters (BatchNorm weights, biases, GeM p).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from yacs.config import CfgNode


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: a decayed group (matrices, kernels), a no-decay group (ndim <= 1)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: CfgNode, module: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters of ``module`` (OPTIM.*)."""
    groups = param_groups(module, cfg.OPTIM.WEIGHT_DECAY)
    if cfg.OPTIM.NAME == "sgd":
        return torch.optim.SGD(groups, lr=cfg.OPTIM.LR, momentum=cfg.OPTIM.MOMENTUM)
    if cfg.OPTIM.NAME == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.OPTIM.LR)
    raise ValueError(f"OPTIM.NAME={cfg.OPTIM.NAME!r}; expected sgd or adamw")


def warmup_factor(it: int, warmup: int, start: float) -> float:
    """Linear ramp from ``start`` at it = 0 to 1 at it = warmup."""
    return start + (1.0 - start) * it / warmup


def cosine_factor(it: int, warmup: int, total: int) -> float:
    """Cosine decay from 1 at the end of warm-up to 0 at ``total``."""
    progress = min(max(it - warmup, 0) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_factor(it: int, steps: Sequence[int], gamma: float) -> float:
    """gamma to the number of milestones already reached."""
    return gamma ** sum(it >= s for s in steps)


def lr_factor(
    it: int,
    total: int,
    warmup: int,
    warmup_start: float,
    schedule: str,
    steps: Sequence[int],
    gamma: float,
) -> float:
    """Learning-rate multiplier of optimiser step ``it`` (see the module docstring)."""
    if it < warmup:
        return warmup_factor(it, warmup, warmup_start)
    if schedule == "cosine":
        return cosine_factor(it, warmup, total)
    return step_factor(it, steps, gamma)


def build_scheduler(
    cfg: CfgNode, optimizer: torch.optim.Optimizer, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR: warm-up (OPTIM.WARMUP_*) then cosine or step (epochs -> iters)."""
    if cfg.OPTIM.SCHEDULE not in ("cosine", "step"):
        raise ValueError(f"OPTIM.SCHEDULE={cfg.OPTIM.SCHEDULE!r}; expected cosine or step")
    total = cfg.TRAIN.EPOCHS * iters_per_epoch
    warmup = round(cfg.OPTIM.WARMUP_EPOCHS * iters_per_epoch)
    steps = [round(epoch * iters_per_epoch) for epoch in cfg.OPTIM.STEPS]
    args = (total, warmup, cfg.OPTIM.WARMUP_FACTOR, cfg.OPTIM.SCHEDULE, steps, cfg.OPTIM.STEP_GAMMA)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, *args))


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient L2 norm to ``max_norm`` (0 = off); returns the norm before."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
