"""Pyramid cache item files (cvnet/cache_items.py): exact round trips, every damage named."""

from __future__ import annotations

import pytest
import torch

from cvnet.cache_items import DTYPES, MAGIC, read_item, write_item


def levels_of(dtype: torch.dtype) -> list[torch.Tensor]:
    """Three levels of odd sizes holding the full range of ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 2, 3), (5, 3, 4), (5, 4, 6)]
    if dtype.is_floating_point:
        return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    info = torch.iinfo(dtype)
    return [
        torch.randint(info.min, info.max + 1, shape, generator=gen, dtype=dtype) for shape in shapes
    ]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_round_trip_is_bit_exact(tmp_path, dtype):
    levels = levels_of(dtype)
    path = tmp_path / "sub" / "7.pyr"
    write_item(path, "abc123", 5, levels)
    header, read = read_item(path)
    assert header["digest"] == "abc123" and header["channels"] == 5
    for got, want in zip(read, levels, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert [p.name for p in path.parent.iterdir()] == ["7.pyr"]  # no temporary file left


def test_damaged_files_raise_value_errors_that_say_what(tmp_path):
    path = tmp_path / "1.pyr"
    write_item(path, "abc", 5, levels_of(torch.float16))
    good = path.read_bytes()
    torch.save({"levels": levels_of(torch.float16)}, path)  # the format before this one
    with pytest.raises(ValueError, match="bad magic"):
        read_item(path)
    for damaged in (good[:-1], good + b"\0"):  # truncated, or trailing bytes
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="where the header gives"):
            read_item(path)
    header_start = len(MAGIC) + 4
    path.write_bytes(good[:header_start] + b"#" + good[header_start + 1 :])
    with pytest.raises(ValueError, match="unreadable header"):
        read_item(path)
    path.write_bytes(good[: len(MAGIC) + 2])
    with pytest.raises(ValueError, match="bad magic"):
        read_item(path)
