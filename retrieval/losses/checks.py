"""Input checks shared by the losses."""

from __future__ import annotations

import torch


def check_class_sizes(loss: str, embedding_dim: int, num_classes: int) -> None:
    """Raise a clear error unless both sizes of a classification loss are >= 1."""
    if embedding_dim < 1 or num_classes < 1:
        raise ValueError(
            f"{loss}: embedding_dim={embedding_dim} and num_classes={num_classes} must be >= 1"
        )


def check_labels(loss: str, labels: torch.Tensor, batch: int) -> None:
    """Raise a clear error unless ``labels`` is an integer tensor of shape (batch,)."""
    if labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(
            f"{loss}: labels must be an integer tensor of shape ({batch},), "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )


def check_class_inputs(
    loss: str, embeddings: torch.Tensor, labels: torch.Tensor, dim: int, num_classes: int
) -> None:
    """Raise a clear error for bad shapes, non-integer labels or labels outside [0, C)."""
    if embeddings.dim() != 2 or embeddings.shape[1] != dim:
        raise ValueError(
            f"{loss}: embeddings of shape {tuple(embeddings.shape)}, expected (B, {dim})"
        )
    check_labels(loss, labels, embeddings.shape[0])
    low, high = labels.aminmax()
    if low < 0 or high >= num_classes:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(
            f"{loss}: label {bad} is outside [0, num_classes) with num_classes={num_classes}"
        )
