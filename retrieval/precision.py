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


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str:
    """The value of ``name`` for the first CPU in ``cpuinfo`` ('' where absent, or not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Feature flags of the first CPU in ``cpuinfo`` (empty where the file is absent: not Linux)."""
    return frozenset(cpuinfo_field("flags", cpuinfo).split())


def native_bf16_cpu(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU (``flags``, default the host's) computes bf16 natively."""
    return bool(NATIVE_BF16_CPU_FLAGS & frozenset(cpu_flags() if flags is None else flags))


def resolve_amp(amp: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """'auto' -> 'bf16' / 'fp16' / 'off' for ``device`` (CPU: by ``flags``, default the host's);
    any other name unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if native_bf16_cpu(flags) else "off"
    return "off"
