"""Mixed-precision names (TRAIN.AMP, TEST.AMP) -> autocast dtypes; TRAIN.AMP 'auto'.

'auto' picks what is fast on the device at hand: bf16 on a GPU that supports it (else fp16 with a
GradScaler), bf16 on a CPU that computes it natively (AMX or AVX512-BF16), fp32 on any other CPU,
where bf16 has no hardware arithmetic and is not expected to beat fp32. Measured on an AMX CPU: the
demo SENet trains 1.5x faster in bf16 (configs/demo/scale.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of a CPU with native bf16 arithmetic.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Feature flags of the first CPU in ``cpuinfo`` (empty where the file is absent: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_amp(amp: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """'auto' -> 'bf16' / 'fp16' / 'off' for ``device`` (CPU: by ``flags``, default the host's);
    any other name unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        native = NATIVE_BF16_CPU_FLAGS & frozenset(cpu_flags() if flags is None else flags)
        return "bf16" if native else "off"
    return "off"
