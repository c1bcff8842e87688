"""Argument checks and the error rule shared by every layer of the package (it imports nothing
from it).

The project's rule: a wrong type is a ``TypeError`` (``bool``, ``float`` and ``str`` are not
ints, ``True`` is not a count), a wrong value a ``ValueError``; the message names the owner (the
function, or the layer's qualified name), the argument, what was expected and what was received.
The public function a user called is named once, where it is entered (:func:`in_context`): the
code below it raises without knowing who called it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# The exact types whose message gets the entry point's name; a subclass may take other
# constructor arguments, and a KeyError prints its message quoted.
_RELABELLED = (TypeError, ValueError, RuntimeError, TimeoutError)


def _raised_here(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a module of this package."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "rethinkbn" or module.startswith("rethinkbn.")


@contextmanager
def in_context(name: str) -> Iterator[None]:
    """Errors this package raises within the block (or the decorated call) say ``name`` first.

    A ``TypeError``, ``ValueError``, ``RuntimeError`` or ``TimeoutError`` raised by the package's
    own code (the innermost frame of its traceback is a ``rethinkbn`` module) is re-raised as the
    same type with the message ``"{name}: {message}"``, chained to the original (``from``); a
    message that already starts with ``"{name}: "`` is left alone. Errors raised by the user's
    code (a ``forward=``, a model's own module, a data loader, torch below them), other types and
    ``KeyboardInterrupt`` pass through unchanged. Usable as a decorator (``@in_context("f")``)
    and as a context manager (``with in_context("StatsBank.use('a')"):``).
    """
    try:
        yield
    except _RELABELLED as error:
        if type(error) not in _RELABELLED or not _raised_here(error):
            raise
        if str(error).startswith(f"{name}: "):
            raise
        raise type(error)(f"{name}: {error}") from error


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
