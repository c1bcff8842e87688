"""Counting the torch operations a piece of code runs, for tests that check a path's op budget.

Shared by the layer tests (imported as a plain module: ``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts the torch operations run, and the float64 tensors they produce."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.float64 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func.overloadpacket)] += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self.float64 += isinstance(t, torch.Tensor) and t.dtype == torch.float64
        return out
