"""The BatchNorm operations the studies need, through rethinkbn's public API.

One place maps each study operation to the library: NBS via :func:`rethinkbn.convert.to_ghost_bn`
(GhostBatchNorm), population statistics via :func:`rethinkbn.population.precise_bn`, mini-batch
statistics at inference via :func:`rethinkbn.population.batch_stats_inference`, FrozenBN via
:func:`rethinkbn.convert.freeze_bn`. While a part of that API is still being written, a small
stand-in defined here takes its place (``USING_STANDINS`` lists which); the studies do not change
when the real function lands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "USING_STANDINS",
    "eval_error_minibatch",
    "freeze",
    "population_stats",
    "set_norm_batch_size",
]

USING_STANDINS: list[str] = []


# ----------------------------------------------------------------------------- stand-ins
class _GhostStandIn(nn.Module):
    """Stand-in for GhostBatchNorm: train-mode statistics over groups of ``norm_batch_size``."""

    def __init__(self, bn: _BatchNorm, norm_batch_size: int) -> None:
        super().__init__()
        self.bn, self.norm_batch_size = bn, norm_batch_size

    def forward(self, x: Tensor) -> Tensor:
        bn, k = self.bn, self.norm_batch_size
        if not self.training or x.size(0) <= k:
            return bn(x)
        if x.size(0) % k:
            raise ValueError(f"batch {x.size(0)} is not a multiple of NBS {k}")
        g = x.size(0) // k
        # (N, C, ...) -> (k, g*C, ...): one batch_norm call normalizes each group separately.
        xs = x.reshape(g, k, *x.shape[1:]).transpose(0, 1).reshape(k, g * x.size(1), *x.shape[2:])
        y = F.batch_norm(xs, None, None, bn.weight.repeat(g), bn.bias.repeat(g), True, 0.0, bn.eps)
        with torch.no_grad():
            dims = [0] + list(range(2, xs.dim()))
            mean = xs.mean(dims).view(g, -1).mean(0)
            var = xs.var(dims, unbiased=True).view(g, -1).mean(0)
            m = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.lerp_(mean, m)
            bn.running_var.lerp_(var, m)
        return y.reshape(k, g, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from ..layers import is_batchnorm
    except ImportError:
        return [m for m in model.modules() if isinstance(m, _BatchNorm)]
    return [m for m in model.modules() if is_batchnorm(m)]


# ----------------------------------------------------------------------------- operations
def set_norm_batch_size(model: nn.Module, norm_batch_size: int) -> nn.Module:
    """Every BN of ``model`` normalizes training batches in groups of ``norm_batch_size``."""
    try:
        from ..convert import to_ghost_bn
    except ImportError:
        USING_STANDINS.append("GhostBatchNorm")
        for parent in list(model.modules()):
            for key, child in parent._modules.items():
                if isinstance(child, _BatchNorm):
                    parent._modules[key] = _GhostStandIn(child, norm_batch_size)
        return model
    return to_ghost_bn(model, norm_batch_size)


def population_stats(model: nn.Module, x: Tensor, *, batch_size: int, num_samples: int,
                     seed: int = 0, pass_norm_batch_size: int | None = None) -> None:
    """PreciseBN: set every BN's running statistics to those of ``num_samples`` training inputs
    ``x`` (a seeded random subset) run in batches of ``batch_size`` with the weights frozen.

    Ghost BN layers normalize each pass batch in groups of ``pass_norm_batch_size`` (None: the
    whole batch of ``batch_size``)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[: min(num_samples, len(x))]
    device = next(model.parameters()).device
    batches = [x[idx[i : i + batch_size]].to(device) for i in range(0, len(idx), batch_size)]
    try:
        from ..population import precise_bn
    except ImportError:
        USING_STANDINS.append("precise_bn")
        layers = _bn_modules(model)
        ghosts = [m for m in model.modules() if isinstance(m, _GhostStandIn)]
        nbs = [g.norm_batch_size for g in ghosts]
        for g in ghosts:
            g.norm_batch_size = pass_norm_batch_size or 1 << 30
        saved = [(m.momentum, m.training) for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        was = model.training
        model.train()
        try:
            with torch.no_grad():
                for b in batches:
                    model(b)
        finally:
            model.train(was)
            for m, (mom, _) in zip(layers, saved, strict=True):
                m.momentum = mom
            for g, k in zip(ghosts, nbs, strict=True):
                g.norm_batch_size = k
        return
    precise_bn(model, batches, num_samples=len(idx), pass_norm_batch_size=pass_norm_batch_size,
               progress=False)


@contextlib.contextmanager
def _minibatch_standin(model: nn.Module, norm_batch_size: int) -> Iterator[None]:
    layers = _bn_modules(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              m.training) for m in layers]
    ghosts = [m for m in layers if hasattr(m, "norm_batch_size")]
    nbs = [m.norm_batch_size for m in ghosts]
    try:
        for m in layers:
            m.train()
        for m in ghosts:
            m.norm_batch_size = norm_batch_size
        yield
    finally:
        for m, k in zip(ghosts, nbs, strict=True):
            m.norm_batch_size = k
        for m, (rm, rv, nbt, tr) in zip(layers, saved, strict=True):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(nbt)
            m.train(tr)


@torch.no_grad()
def eval_error_minibatch(model: nn.Module, x: Tensor, y: Tensor, norm_batch_size: int) -> float:
    """Top-1 error (%) with mini-batch statistics: each group of ``norm_batch_size`` inputs is
    normalized with its own statistics (the paper's "mu_B" evaluation)."""
    was = model.training
    model.eval()
    try:
        from ..population import batch_stats_inference

        ctx = batch_stats_inference(model, norm_batch_size=norm_batch_size)
        chunk = norm_batch_size * max(1, 1000 // norm_batch_size)
    except ImportError:
        USING_STANDINS.append("batch_stats_inference")
        ctx = _minibatch_standin(model, norm_batch_size)
        ghost = all(hasattr(m, "norm_batch_size") for m in _bn_modules(model))
        chunk = norm_batch_size * max(1, 1000 // norm_batch_size) if ghost else norm_batch_size
    n = (len(x) // norm_batch_size) * norm_batch_size
    if n == 0:
        raise ValueError(f"mini-batch evaluation needs >= norm_batch_size={norm_batch_size} "
                         f"samples, got {len(x)}")
    device = next(model.parameters()).device
    wrong = 0
    try:
        with ctx:
            for i in range(0, n, chunk):
                pred = model(x[i : min(i + chunk, n)].to(device)).argmax(1).cpu()
                wrong += int((pred != y[i : min(i + chunk, n)]).sum())
    finally:
        model.train(was)
    return 100.0 * wrong / n


def freeze(model: nn.Module) -> nn.Module:
    """FrozenBN: from now on every BN normalizes with its population statistics, in training
    too (the affine parameters still train)."""
    try:
        from ..convert import freeze_bn
    except ImportError:
        USING_STANDINS.append("FrozenBatchNorm")
        for m in _bn_modules(model):
            m.train = lambda mode=True, _m=m: nn.Module.train(_m, False)  # type: ignore
            nn.Module.train(m, False)
        return model
    return freeze_bn(model)
