"""Argument checks shared by every layer of the package (it imports nothing from it).

The project's rule: a wrong type is a ``TypeError`` (``bool``, ``float`` and ``str`` are not
ints, ``True`` is not a count), a wrong value a ``ValueError``; the message names the owner (the
function, or the layer's qualified name), the argument, what was expected and what was received.
"""

from __future__ import annotations


def check_int(
    value: object,
    name: str,
    owner: str,
    *,
    minimum: int = 1,
    allow_none: bool = False,
    expected: str | None = None,
) -> None:
    """Raise unless ``value`` is an ``int`` >= ``minimum`` (or None with ``allow_none``).

    ``TypeError`` for anything but an int (``bool`` included), ``ValueError`` below ``minimum``;
    both read ``"{owner}: {name} must be {expected}, got {value!r}"``. ``expected`` defaults to
    "a positive int" (or "an int >= minimum"), "or None" added with ``allow_none``.
    """
    if value is None and allow_none:
        return
    if expected is None:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        expected += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")


def check_positive_int(
    value: object, name: str, owner: str, *, allow_none: bool = False, expected: str | None = None
) -> None:
    """:func:`check_int` with ``minimum=1``: counts of features, devices, domains, ranks, epochs."""
    check_int(value, name, owner, minimum=1, allow_none=allow_none, expected=expected)
