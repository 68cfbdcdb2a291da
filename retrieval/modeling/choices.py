"""Named implementation choices of model arguments (ablation flags), with one error format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def resolve_choice(arg: str, value: str, options: Mapping[str, T]) -> T:
    """Return ``options[value]``; a ValueError names ``arg`` and the allowed values otherwise."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{arg}={value!r} is not supported; allowed values: {sorted(options)}")
    return options[value]
