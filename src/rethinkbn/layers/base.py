"""State shared by every BatchNorm layer of rethinkbn: parameters, running buffers, momentum.

One base class owns the state, as torch's ``_NormBase`` does, with the same attribute and
``state_dict`` names (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) so that torch checkpoints load unchanged. Subclasses only say how a
training batch is normalized.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import is_positive_int
from ..stats import Moments

__all__ = ["BatchNormBase", "MomentsObserver", "layer_name"]

MomentsObserver = Callable[["BatchNormBase", Moments], None]


def layer_name(module: nn.Module) -> str:
    """How errors name a layer: its qualified name in the model when known, else its repr."""
    qualname = getattr(module, "_rethinkbn_name", None)
    return f"'{qualname}' ({module.__class__.__name__})" if qualname else repr(module)


class BatchNormBase(nn.Module):
    """Parameters, running statistics and momentum of a BatchNorm layer of any input rank.

    Accepts inputs of rank 2 to 5 with channels in dim 1 (``(N, C)``, ``(N, C, L)``,
    ``(N, C, H, W)``, ``(N, C, D, H, W)``), like torch's BatchNorm1d/2d/3d together.

    ``momentum`` follows torch: ``running = (1 - momentum) * running + momentum * batch``, and
    ``momentum=None`` gives the cumulative average ``running = running + (batch - running) / t``
    where ``t = num_batches_tracked``.

    ``observer`` (not part of the state) is a callable ``observer(layer, moments)`` that receives
    the float64 :class:`~rethinkbn.stats.Moments` of every batch that the layer normalizes with
    batch statistics; :func:`rethinkbn.precise_bn` uses it to aggregate population statistics.

    Errors leave the layer unchanged: inputs are validated, and batch statistics are checked to be
    finite (a NaN or Inf input raises, naming the layer), before any buffer is written. With
    population statistics nothing is written, and a NaN input passes through as in torch.
    """

    _version = 2
    min_rank = 2
    max_rank = 5

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not is_positive_int(num_features):
            raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")
        if eps <= 0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.observer: MomentsObserver | None = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.running_mean: Tensor | None
            self.running_var: Tensor | None
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
            self.num_batches_tracked: Tensor | None
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints from before torch added num_batches_tracked (version < 2) lack it.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_input(self, x: Tensor) -> None:
        """Raise a clear error for an input this layer cannot normalize."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{layer_name(self)}: expected a Tensor, got {type(x).__name__}")
        if not self.min_rank <= x.dim() <= self.max_rank:
            raise ValueError(
                f"{layer_name(self)}: expected an input of rank {self.min_rank} to "
                f"{self.max_rank} (N, C, ...), got rank {x.dim()} with shape {tuple(x.shape)}"
            )
        if x.size(1) != self.num_features:
            raise ValueError(
                f"{layer_name(self)}: expected {self.num_features} channels in dim 1, got "
                f"{x.size(1)} (input shape {tuple(x.shape)})"
            )

    def _uses_batch_stats(self) -> bool:
        """Whether this forward normalizes with batch statistics (torch's ``bn_training``)."""
        return self.training or self.running_mean is None

    def _updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats

    @torch.no_grad()
    def _update_running_stats(
        self, mean: Tensor, unbiased_var: Tensor, present: Tensor | None = None
    ) -> None:
        """Blend one step's batch statistics into the running buffers (torch's update rule).

        ``num_batches_tracked`` advances by one and the factor is ``momentum``, or ``1 / t`` for
        ``momentum=None``. With ``present`` (a bool per row of per-row buffers, e.g. per domain)
        each row keeps its own count and only the rows present in the batch advance and move.
        """
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        if present is None:
            self.num_batches_tracked.add_(1)
            factor: float | Tensor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        else:
            self.num_batches_tracked.add_(present.long())
            if self.momentum is None:
                rate = 1.0 / self.num_batches_tracked.clamp_min(1).double()
            else:
                rate = torch.full(present.shape, self.momentum, dtype=torch.float64,
                                  device=present.device)
            factor = (rate * present)[:, None].to(self.running_mean.dtype)
            # an absent row's statistics may be NaN (no values): lerp by 0 would still spread it
            mean = torch.where(present[:, None], mean, self.running_mean.double())
            unbiased_var = torch.where(present[:, None], unbiased_var, self.running_var.double())
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def _observe(self, moments: Moments) -> None:
        if self.observer is not None:
            self.observer(self, moments)
