"""channels_last for models that mix 2-D and 3-D convolutions."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer channels_last, in place; tensors of other ranks stay.

    ``nn.Module.to(memory_format=torch.channels_last)`` converts 5-D tensors too and fails on them
    ("required rank 4 tensor"): SENet's SSM has 5-D Conv3d weights.
    """
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module
