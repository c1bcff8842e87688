"""The slow obvious reference of the layer family: a loop of torch's BatchNorm, one call per group.

Shared by the layer tests (imported as a plain module: ``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contiguous_groups(n: int, k: int | None) -> list[list[int]]:
    """Blocks of k samples; a remainder of 1 joins the last block, a larger one is its own."""
    if k is None or k >= n:
        return [list(range(n))]
    blocks = [list(range(i, min(i + k, n))) for i in range(0, n, k)]
    if n % k == 1:
        last = blocks.pop()
        blocks[-1] += last
    return blocks


def strided_groups(n: int, k: int | None) -> list[list[int]]:
    """As many groups as contiguous_groups gives, sample i in group i % G."""
    count = len(contiguous_groups(n, k))
    return [list(range(g, n, count)) for g in range(count)]


def domain_groups(ids: Tensor, num_domains: int) -> list[list[int]]:
    return [[i for i, d in enumerate(ids.tolist()) if d == g] for g in range(num_domains)]


def loop_batch_norm(
    x: Tensor, groups: list[list[int]], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
    """torch's BatchNorm on each group of samples; ``y`` and ``(samples, mean, unbiased var)``
    per non-empty group (torch's buffers with momentum 1 hold exactly these)."""
    parts, stats, order = [], [], []
    for g in groups:
        if not g:
            continue
        mean = torch.zeros(x.size(1), dtype=x.dtype)
        var = torch.ones(x.size(1), dtype=x.dtype)
        parts.append(F.batch_norm(x[g], mean, var, weight, bias, True, 1.0, eps))
        stats.append((len(g), mean, var))
        order += g
    if not parts:
        return x * 0, stats
    assert sorted(order) == list(range(x.size(0)))
    return torch.cat(parts)[torch.argsort(torch.tensor(order))], stats
