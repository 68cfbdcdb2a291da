"""torchrun helpers: rank/world size from torch.distributed; every helper is a no-op at world size
1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op at world size 1)."""
    if is_distributed():
        dist.barrier()


def all_gather(obj: object) -> list:
    """Gather a picklable object from every rank, in rank order ([obj] at world size 1)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather equally shaped tensors from every rank, in rank order ([tensor] at world size 1)."""
    if not is_distributed():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; a bare 'cuda' under torchrun -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (env://; nccl on CUDA, gloo on CPU); no-op without it."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", init_method="env://"
    )


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank; identity at world size 1)."""
    if not is_distributed() or not values:
        return dict(values)
    names = sorted(values)
    # nccl reduces CUDA tensors only
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {n: v / get_world_size() for n, v in zip(names, tensor.tolist())}
