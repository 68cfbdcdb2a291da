"""TRAIN.AMP 'auto': bf16 only where the device computes it natively."""

from __future__ import annotations

import pytest
import torch

from retrieval.precision import cpu_flags, cpuinfo_field, native_bf16_cpu, resolve_amp

CPU = torch.device("cpu")


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx512f amx_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: no native bf16 assumed
    assert cpuinfo_field("model name", cpuinfo) == "X"
    assert cpuinfo_field("model name", tmp_path / "absent") == ""
    assert native_bf16_cpu(cpu_flags(cpuinfo)) and not native_bf16_cpu({"avx2"})


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "off"),  # no native bf16 arithmetic
        ({"avx512f", "avx512bw"}, "off"),
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"avx512f", "amx_tile", "amx_bf16"}, "bf16"),
    ],
)
def test_auto_on_cpu_follows_native_bf16(flags, expected):
    assert resolve_amp("auto", CPU, flags) == expected


@pytest.mark.parametrize("name", ["off", "bf16", "fp16"])
def test_explicit_choice_is_kept(name):
    assert resolve_amp(name, CPU, {"avx2"}) == name
