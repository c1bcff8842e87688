"""The ranks of a distributed statistics pass agree before they merge, within a bounded wait.

At the end of its pass every rank sends one fixed-size status row (whether it failed and how,
and a fingerprint of its BatchNorm layers) in one ``all_gather`` with a timeout. Fixed size, so
that ranks that disagree on their layers still complete it; then every rank raises the same kind
of error together (naming the failing rank, or the layer that differs) before the moments
collective, whose sizes would not match. A rank that never arrives makes the others raise
``TimeoutError`` after ``timeout`` seconds instead of the process group's timeout (30 minutes by
default): the wait is bounded by a deadline armed here, and the exception says which way it
ended, never parsed from torch's message. A backend that fails the exchange first (a peer's
process died and its connection closed, or the process group's own timeout is the shorter one)
makes it raise ``RuntimeError`` carrying the backend's error.

Messages name no entry point: the public function adds its name where it was called
(:func:`rethinkbn._checks.in_context`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._model import running_buffers, world_size

__all__ = ["OK", "PROBLEM", "RAISED", "agree", "wait_within"]

OK, PROBLEM, RAISED = 0, 1, 2
_MESSAGE_BYTES = 160
_HEADER = 4  # code, layers, values, fingerprint


def _describe(layers: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(running_buffers(layer)[0].shape))  # type: ignore[index]
            for name, layer in layers]


def _device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _row(code: int, message: str, layers: Sequence[tuple[str, nn.Module]]) -> torch.Tensor:
    described = _describe(layers)
    values = sum(int(torch.Size(shape).numel()) for _, shape in described)
    fingerprint = zlib.crc32(repr(described).encode())
    text = list(message.encode("utf-8", "replace")[:_MESSAGE_BYTES])
    text += [0] * (_MESSAGE_BYTES - len(text))
    return torch.tensor([code, len(described), values, fingerprint, *text], dtype=torch.int64)


def _message(row: torch.Tensor) -> str:
    raw = bytes(int(b) for b in row[_HEADER:].tolist() if b)
    return raw.decode("utf-8", "ignore")


def wait_within(work: dist.Work, timeout_s: float) -> None:
    """Wait for ``work`` (an async collective) at most ``timeout_s`` seconds.

    Raises TimeoutError when the deadline armed here passes first (the collective is still
    pending: some rank never joined it), RuntimeError (the backend's, from ``work.wait()``) when
    the backend failed it. Polls ``work.is_completed()`` with pauses growing from 0.1 ms to 10 ms.
    """
    deadline = time.monotonic() + timeout_s
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the collective did not complete within {timeout_s:g} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    work.wait()


def agree(
    layers: Sequence[tuple[str, nn.Module]],
    code: int,
    message: str,
    group: dist.ProcessGroup | None,
    timeout_s: float,
) -> list[int]:
    """Exchange every rank's status; raise on every rank when any rank failed or differs.

    ``code`` is this rank's :data:`OK`, :data:`PROBLEM` (an empty or short loader, ``message``
    says which) or :data:`RAISED` (an exception, ``message`` is its type and text). Returns the
    ranks whose code was PROBLEM, for the caller to raise its own error; raises RuntimeError
    naming a rank that raised (this rank's caller re-raises its own exception instead: pass
    ``code=RAISED`` and catch nothing), ValueError when the ranks' layers differ, TimeoutError
    when some rank does not arrive within ``timeout_s`` (:func:`wait_within`), RuntimeError when
    the backend fails the exchange first.
    """
    me = dist.get_rank(group)
    row = _row(code, message, layers).to(_device(group))
    rows = [torch.empty_like(row) for _ in range(world_size(group))]
    work = dist.all_gather(rows, row, group=group, async_op=True)
    try:
        wait_within(work, timeout_s)
    except TimeoutError as error:
        raise TimeoutError(
            f"rank {me} waited up to {timeout_s:g} s at the end of the pass for the other ranks, "
            "and not all of them arrived; a rank is stuck, busy elsewhere, or did not call the "
            "same function. This rank's model is unchanged; pass timeout= to wait longer."
        ) from error
    except RuntimeError as error:
        raise RuntimeError(
            f"rank {me}: the exchange with the other ranks at the end of the pass failed "
            f"({error}); a rank died or the process group timed out first. This rank's model "
            "is unchanged."
        ) from error
    table = torch.stack(rows).cpu()
    raised = [r for r in range(len(rows)) if int(table[r, 0]) == RAISED and r != me]
    if raised and code != RAISED:
        r = raised[0]
        raise RuntimeError(
            f"rank {r} raised during the pass ({_message(table[r])}); every rank "
            "stops, and this rank's model is unchanged"
        )
    if code == RAISED:
        return []
    if not bool((table[:, 1:_HEADER] == table[me, 1:_HEADER]).all()):
        _raise_mismatch(layers, group)
    return [r for r in range(len(rows)) if int(table[r, 0]) == PROBLEM]


def _raise_mismatch(layers: Sequence[tuple[str, nn.Module]], group: dist.ProcessGroup | None
                    ) -> None:
    """Every rank saw the fingerprints differ: gather the layer lists and name the difference."""
    described = _describe(layers)
    lists: list[list[tuple[str, tuple[int, ...]]] | None] = [None] * world_size(group)
    dist.all_gather_object(lists, described, group=group)
    first = lists[0] or []
    for r, other in enumerate(lists[1:], start=1):
        other = other or []
        for i in range(max(len(first), len(other))):
            a = first[i] if i < len(first) else None
            b = other[i] if i < len(other) else None
            if a != b:
                raise ValueError(
                    f"the ranks' models differ in their BatchNorm layers: layer #{i} "
                    f"is {_name(a)} on rank 0 and {_name(b)} on rank {r} ({len(first)} vs "
                    f"{len(other)} layers); every rank must run the same model. Every rank's "
                    "model is unchanged."
                )
    raise ValueError("the ranks' BatchNorm layers differ")  # pragma: no cover


def _name(entry: tuple[str, tuple[int, ...]] | None) -> str:
    if entry is None:
        return "missing"
    name, shape = entry
    return f"'{name}' with statistics of shape {shape}"
