"""The ranks of a distributed statistics pass agree before they merge, within a bounded wait.

At the end of its pass every rank sends one fixed-size status row (whether it failed and how,
and a fingerprint of its BatchNorm layers) in one ``all_gather`` with a timeout. Fixed size, so
that ranks that disagree on their layers still complete it; then every rank raises the same kind
of error together (naming the failing rank, or the layer that differs) before the moments
collective, whose sizes would not match. A rank that never arrives makes the others raise after
``timeout`` seconds instead of the process group's timeout (30 minutes by default).
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._model import running_buffers, world_size

__all__ = ["OK", "PROBLEM", "RAISED", "agree"]

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


def agree(
    layers: Sequence[tuple[str, nn.Module]],
    code: int,
    message: str,
    group: dist.ProcessGroup | None,
    timeout_s: float,
    caller: str,
) -> list[int]:
    """Exchange every rank's status; raise on every rank when any rank failed or differs.

    ``code`` is this rank's :data:`OK`, :data:`PROBLEM` (an empty or short loader, ``message``
    says which) or :data:`RAISED` (an exception, ``message`` is its type and text). Returns the
    ranks whose code was PROBLEM, for the caller to raise its own error; raises RuntimeError
    naming a rank that raised (this rank's caller re-raises its own exception instead: pass
    ``code=RAISED`` and catch nothing), ValueError when the ranks' layers differ, TimeoutError
    when some rank does not arrive within ``timeout_s``.
    """
    me = dist.get_rank(group)
    row = _row(code, message, layers).to(_device(group))
    rows = [torch.empty_like(row) for _ in range(world_size(group))]
    work = dist.all_gather(rows, row, group=group, async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        kind = TimeoutError if "timed out" in str(error).lower() else RuntimeError
        raise kind(
            f"{caller}: rank {me} waited up to {timeout_s:g} s at the end of the pass for the "
            f"other ranks, and not all of them arrived ({error}); a rank died, is stuck, or "
            f"did not call {caller}. This rank's model is unchanged; pass timeout= to wait "
            "longer."
        ) from error
    table = torch.stack(rows).cpu()
    raised = [r for r in range(len(rows)) if int(table[r, 0]) == RAISED and r != me]
    if raised and code != RAISED:
        r = raised[0]
        raise RuntimeError(
            f"{caller}: rank {r} raised during the pass ({_message(table[r])}); every rank "
            "stops, and this rank's model is unchanged"
        )
    if code == RAISED:
        return []
    if not bool((table[:, 1:_HEADER] == table[me, 1:_HEADER]).all()):
        _raise_mismatch(layers, group, caller)
    return [r for r in range(len(rows)) if int(table[r, 0]) == PROBLEM]


def _raise_mismatch(
    layers: Sequence[tuple[str, nn.Module]], group: dist.ProcessGroup | None, caller: str
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
                    f"{caller}: the ranks' models differ in their BatchNorm layers: layer #{i} "
                    f"is {_name(a)} on rank 0 and {_name(b)} on rank {r} ({len(first)} vs "
                    f"{len(other)} layers); every rank must run the same model. Every rank's "
                    "model is unchanged."
                )
    raise ValueError(f"{caller}: the ranks' BatchNorm layers differ")  # pragma: no cover


def _name(entry: tuple[str, tuple[int, ...]] | None) -> str:
    if entry is None:
        return "missing"
    name, shape = entry
    return f"'{name}' with statistics of shape {shape}"
