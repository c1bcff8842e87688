"""Argument checks shared by every layer of the package (it imports nothing from it)."""

from __future__ import annotations


def is_positive_int(value: object) -> bool:
    """True for an ``int`` >= 1; False for ``bool`` (``True`` is not a device or group count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
