"""State shared by every BatchNorm layer of rethinkbn: parameters, running buffers, momentum.

One base class owns the state, as torch's ``_NormBase`` does, with the same attribute and
``state_dict`` names (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) so that torch checkpoints load unchanged. Subclasses only say how a
training batch is normalized.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from .._model import BatchNormFamily, batchnorm_layers
from ..stats import Moments

__all__ = [
    "NONFINITE_POLICIES",
    "BatchNormBase",
    "MomentsObserver",
    "layer_name",
    "nonfinite_report",
    "set_nonfinite",
]

MomentsObserver = Callable[["BatchNormBase", Moments], None]

# What a training step does with a non-finite batch statistic (see BatchNormBase).
NONFINITE_POLICIES = ("skip", "raise")

# The entry of a layer's state_dict metadata (``state_dict._metadata[prefix]``, beside torch's
# "version") that names the torch class the layer was converted from, "module:qualname": a
# checkpoint then reverts to that class after loading into layers built directly as rethinkbn
# layers. Metadata, not a state_dict key: torch's BatchNorm loads the same checkpoint unchanged.
TORCH_CLASS_KEY = "rethinkbn_torch_class"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _torch_class_from_path(path: object) -> type | None:
    """The BatchNorm class named by ``path``, looked up in modules already imported (a checkpoint
    never makes us import anything); None when it is not one."""
    if not isinstance(path, str) or ":" not in path:
        return None
    module_name, _, qualname = path.partition(":")
    found: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    is_bn = isinstance(found, type) and issubclass(found, nn.modules.batchnorm._BatchNorm)
    return found if is_bn else None  # type: ignore[return-value]


def layer_name(module: nn.Module) -> str:
    """How errors name a layer: its qualified name in the model when known, else its repr."""
    qualname = getattr(module, "_rethinkbn_name", None)
    return f"'{qualname}' ({module.__class__.__name__})" if qualname else repr(module)


class BatchNormBase(nn.Module, BatchNormFamily):
    """Parameters, running statistics and momentum of a BatchNorm layer of any input rank.

    Accepts inputs of rank 2 to 5 with channels in dim 1 (``(N, C)``, ``(N, C, L)``,
    ``(N, C, H, W)``, ``(N, C, D, H, W)``), like torch's BatchNorm1d/2d/3d together.

    ``momentum`` follows torch: ``running = (1 - momentum) * running + momentum * batch``, and
    ``momentum=None`` gives the cumulative average ``running = running + (batch - running) / t``
    where ``t = num_batches_tracked`` (per channel, less the batches that channel skipped under
    the NaN policy below: the average is torch's over the finite batches alone).

    ``observer`` (not part of the state) is a callable ``observer(layer, moments)`` that receives
    the float64 :class:`~rethinkbn.stats.Moments` of every batch that the layer normalizes with
    batch statistics; :func:`rethinkbn.precise_bn` uses it to aggregate population statistics.

    Errors leave the layer unchanged: inputs are validated before any buffer is written.

    The NaN policy (one for the whole family, SyncBatchNorm included): a non-finite batch
    statistic never reaches the running buffers. Per channel (and per domain row), where the
    step's mean or variance is NaN or Inf the buffers keep their previous values, and the event
    is counted on the device in ``nonfinite_count`` (a non-persistent buffer of the running
    buffers' shape, so ``state_dict`` keys stay torch's); no host synchronization. The output is
    what torch gives (NaN in, NaN out). :func:`nonfinite_report` reads the counters of a whole
    model at once (e.g. at the end of an epoch). ``nonfinite = "raise"`` (opt-in, per layer, or
    :func:`set_nonfinite` for a model) raises a ValueError naming the layer and the channels
    instead, before any buffer changes; it costs one host synchronization per layer per step.
    """

    _version = 2
    min_rank = 2
    max_rank = 5
    nonfinite = "skip"

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
        check_positive_int(num_features, "num_features", owner)
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
        self._init_nonfinite_count()
        self.reset_parameters()

    # ------------------------------------------------------------------ state
    def _init_nonfinite_count(self) -> None:
        """(Re)create the non-persistent counters with the running buffers' shape.

        ``nonfinite_count`` counts the skipped events (read and reset by
        :func:`nonfinite_report`); ``skipped_batches`` counts, per channel, the batches that
        advanced ``num_batches_tracked`` while this channel skipped them, so that the cumulative
        average (``momentum=None``) divides each channel by the batches it really averaged.
        """
        like = self.running_mean
        for name in ("nonfinite_count", "skipped_batches"):
            self.register_buffer(
                name,
                None if like is None else torch.zeros(like.shape, dtype=torch.long,
                                                      device=like.device),
                persistent=False,
            )
        self.nonfinite_count: Tensor | None
        self.skipped_batches: Tensor | None

    def reset_running_stats(self) -> None:
        """torch's reset: ``running_mean`` 0, ``running_var`` 1, ``num_batches_tracked`` 0 (and
        the skipped-batch counter, where the layer has one); nothing without running stats."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]
            if getattr(self, "skipped_batches", None) is not None:
                self.skipped_batches.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, then ``weight`` 1 and ``bias`` 0, as torch's BatchNorm."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:  # None for a layer converted from torch's BatchNorm(bias=False)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
            + (", bias=False" if self.affine and self.bias is None else "")
        )

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        torch_class = getattr(self, "_rethinkbn_torch_class", None)
        metadata = getattr(destination, "_metadata", None)
        if torch_class is not None and metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][TORCH_CLASS_KEY] = _class_path(torch_class)

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
        torch_class = _torch_class_from_path(local_metadata.get(TORCH_CLASS_KEY))
        if torch_class is not None:
            self._rethinkbn_torch_class = torch_class
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
        # a checkpoint's num_batches_tracked counts the batches every channel averaged
        if getattr(self, "skipped_batches", None) is not None:
            self.skipped_batches.zero_()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_input(self, x: Tensor) -> None:
        """Raise a clear error for an input this layer cannot normalize."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{layer_name(self)}: expected a Tensor, got {type(x).__name__}")
        self._check_dtype(x)
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

    def _check_dtype(self, x: Tensor) -> None:
        """torch's rule: a floating input of the parameters' dtype, or float16/bfloat16 input
        with float32 parameters (statistics in float32); anything else raises (TypeError)."""
        state = self.weight if self.weight is not None else self.running_mean
        if not x.is_floating_point():
            raise TypeError(
                f"{layer_name(self)}: expected a floating-point input, got dtype {x.dtype} "
                "(convert it with x.float())"
            )
        if state is None or x.dtype == state.dtype:
            return
        if state.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
            return
        raise TypeError(
            f"{layer_name(self)}: expected an input of dtype {state.dtype} (the layer's "
            f"parameters{' or float16/bfloat16' if state.dtype == torch.float32 else ''}), got "
            f"{x.dtype}; convert the input or the layer (layer.to({x.dtype}))"
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
        ``momentum=None`` with ``t`` the batches this channel averaged. A batch skipped in every
        channel (every channel of a domain row) does not count; a channel that skips a counted
        batch remembers it in ``skipped_batches``, so the cumulative average of every channel is
        torch's over the finite batches alone. With ``present`` (a bool per row of per-row
        buffers, e.g. per domain) each row keeps its own count and only the rows present in the
        batch advance and move.

        The NaN policy lives here, once for the family: where the new mean or variance is not
        finite the buffers keep their values and ``nonfinite_count`` counts the event (no host
        synchronization), or, with ``nonfinite = "raise"``, a ValueError names the layer and the
        channels before anything changes. (A layer may instead let torch's kernel blend the
        statistics, see :meth:`_kernel_updates_buffers`.)
        """
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None
        assert self.num_batches_tracked is not None
        mean = mean.to(running_mean.dtype)
        unbiased_var = unbiased_var.to(running_var.dtype)
        # v - v is 0 for a finite v and NaN for NaN or +-Inf (fewer kernels than isfinite).
        nonfinite = torch.isnan((mean - mean).add_(unbiased_var - unbiased_var))
        # an absent row (domain) has no statistics: not an event, and it does not move
        bad = nonfinite if present is None else nonfinite & present[:, None]
        if self.nonfinite == "raise":
            self._raise_if_nonfinite(bad)
        count, skipped = self.nonfinite_count, getattr(self, "skipped_batches", None)
        if any(t is None or t.shape != bad.shape or t.device != bad.device
               for t in (count, skipped)):
            self._init_nonfinite_count()
        self.nonfinite_count.add_(bad)  # type: ignore[union-attr]
        # A batch (a domain row) counts when at least one channel took it: a batch skipped in
        # every channel leaves num_batches_tracked as torch fed only the finite batches would.
        factor: float | Tensor
        if present is None:
            counted = ~nonfinite.all()
            self.num_batches_tracked.add_(counted)
            if self.momentum is None:
                factor = self._cumulative_rate(nonfinite & counted, self.num_batches_tracked)
            else:
                factor = self.momentum
        else:
            counted = present & ~nonfinite.all(1)
            self.num_batches_tracked.add_(counted)
            if self.momentum is None:
                rate = self._cumulative_rate(nonfinite & counted[:, None],
                                             self.num_batches_tracked[:, None])
            else:
                rate = torch.full((present.size(0), 1), self.momentum,
                                  dtype=running_mean.dtype, device=present.device)
            factor = rate * counted[:, None]
        # Where a statistic is not finite, lerp towards the old value itself: it stays
        # bit-identical (lerp by 0 towards NaN would still spread the NaN).
        for buffer, new in ((running_mean, mean), (running_var, unbiased_var)):
            buffer.lerp_(torch.where(nonfinite, buffer, new), factor)

    def _kernel_updates_buffers(self, x: Tensor) -> bool:
        """Whether this training step may let torch's kernel blend its statistics into the
        running buffers (``F.batch_norm(..., running_mean, running_var, True, momentum)``), as
        torch's BatchNorm does, with :meth:`_check_kernel_update` after it.

        Only where that check is free: CPU tensors in eager mode (it reads one number on the
        host), a float momentum, float32/float64 buffers, and a caller whose step may read
        values on the host at all.
        """
        buffer = self.running_mean
        return (buffer is not None and self._updates_running_stats()
                and self.momentum is not None and x.device.type == "cpu"
                and buffer.dtype in (torch.float32, torch.float64)
                and not torch.compiler.is_compiling())

    def _check_kernel_update(
        self, before: Tensor, batch_stats: Callable[[], tuple[Tensor, Tensor]],
        present: Tensor | None = None,
    ) -> None:
        """Finish a step whose statistics torch's kernel blended into the running buffers.

        ``before`` holds the buffers' values before the kernel (stacked). When every new value
        is finite (one dot product, read on the host: a non-finite term, or an overflow, makes
        it non-finite) the batch is counted (``present``: per row) and that is all: torch's
        update, at torch's cost. Otherwise (rare) the buffers are put back and the statistics
        that ``batch_stats()`` recomputes go through :meth:`_update_running_stats` (the NaN
        policy: counts, skips, ``"raise"``); the channels that took the batch then keep the
        kernel's blend, bit-identical to a step without the non-finite channels.
        """
        mean, var = self.running_mean, self.running_var
        assert mean is not None and var is not None and self.num_batches_tracked is not None
        if math.isfinite(float(torch.dot(mean.flatten(), var.flatten()))):
            self.num_batches_tracked.add_(1 if present is None else present)
            return
        with torch.no_grad():
            blended = torch.stack([mean, var])
            mean.copy_(before[0])
            var.copy_(before[1])
            batch_mean, batch_var = batch_stats()
        self._update_running_stats(batch_mean, batch_var, present)
        took = batch_mean.isfinite() & batch_var.isfinite()
        if present is not None:
            took &= present[:, None]
        with torch.no_grad():
            for buffer, new in zip((mean, var), blended, strict=True):
                buffer.copy_(torch.where(took, new, buffer))

    def _cumulative_rate(self, skipped_now: Tensor, tracked: Tensor) -> Tensor:
        """``1 / t`` per channel for ``momentum=None``: ``t`` is the number of batches the
        channel averaged (``num_batches_tracked`` less the batches it skipped)."""
        skipped, running_mean = self.skipped_batches, self.running_mean
        assert skipped is not None and running_mean is not None
        skipped.add_(skipped_now)
        averaged = (tracked - skipped).clamp_min(1)
        return averaged.double().reciprocal().to(running_mean.dtype)

    def _raise_if_nonfinite(self, bad: Tensor) -> None:
        if not bool(bad.any()):  # the opt-in strict mode's one host synchronization
            return
        cells = bad.nonzero().tolist()
        where = (f"channel(s) {[c[-1] for c in cells][:8]}" if bad.dim() == 1 else
                 f"(domain, channel) {[tuple(c) for c in cells][:8]}")
        raise ValueError(
            f"{layer_name(self)}: expected finite batch statistics, got NaN or Inf in {where}; "
            "the running buffers were left unchanged (nonfinite='raise')"
        )

    def _observe(self, moments: Moments) -> None:
        if self.observer is not None:
            self.observer(self, moments)


def _family(model: nn.Module) -> list[tuple[str, BatchNormBase]]:
    return [(n, m) for n, m in batchnorm_layers(model) if isinstance(m, BatchNormBase)]


def set_nonfinite(model: nn.Module, policy: str) -> int:
    """Set the NaN policy of every layer of the family in ``model``; returns how many.

    ``"skip"`` (default): a non-finite batch statistic leaves that channel's running buffers
    unchanged and is counted (no host synchronization). ``"raise"``: a ValueError names the layer
    and the channels before any buffer changes (one host synchronization per layer per step).
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"set_nonfinite: policy must be one of {NONFINITE_POLICIES}, got {policy!r}"
        )
    layers = _family(model)
    for _, layer in layers:
        layer.nonfinite = policy
    return len(layers)


def nonfinite_report(model: nn.Module, reset: bool = False) -> dict[str, Tensor]:
    """The layers of ``model`` whose running buffers skipped non-finite batch statistics.

    Returns ``{name: nonfinite_count}`` (a CPU copy of the per-channel counts, shape of the
    running buffers, e.g. ``(num_domains, C)`` for DomainBatchNorm) for every layer of the family
    with at least one event since construction or the last ``reset=True``; the name is the
    layer's qualified name in ``model``. Meant for the end of an epoch: ONE host
    synchronization for the whole model (the counters are gathered into one tensor first).
    """
    layers = [(n, m) for n, m in _family(model) if m.nonfinite_count is not None]
    if not layers:
        return {}
    counts = [m.nonfinite_count for _, m in layers if m.nonfinite_count is not None]
    flat = torch.cat([c.reshape(-1).to(counts[0].device) for c in counts]).cpu()
    report, offset = {}, 0
    for (name, layer), count in zip(layers, counts, strict=True):
        mine = flat[offset: offset + count.numel()].view(count.shape)
        offset += count.numel()
        if bool(mine.any()):
            report[name or getattr(layer, "_rethinkbn_name", None) or type(layer).__name__] = mine
        if reset:
            count.zero_()
    return report
