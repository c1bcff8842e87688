"""FrozenBN late in training (the paper's Sec. 4.3) and periodic PreciseBN, for plain loops.

Training the last part of a schedule (the paper: the last 20 of 100 epochs) with FrozenBatchNorm,
i.e. with population statistics instead of mini-batch statistics, removes the train/test
inconsistency of small normalization batch sizes. :func:`freeze_with_precise_stats` does the
switch; :class:`FreezeBNHook` and :class:`PreciseBNHook` call it and :func:`precise_bn` from a
plain training loop::

    freeze = FreezeBNHook.last_fraction(train_loader, 0.2, total_epochs=100)
    precise = PreciseBNHook(train_loader, every_n_epochs=1)
    for epoch in range(100):
        model = freeze(model, epoch)          # at the start of an epoch
        train_one_epoch(model, optimizer)
        precise(model, epoch)                 # at the end of an epoch, before evaluating
        evaluate(model)
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .._checks import check_int, check_positive_int, in_context
from .._model import ROOT_NAME, batchnorm_layers, unwrap
from ..convert import freeze_bn
from ..layers import FrozenBatchNorm
from ._state import check_model_first, is_frozen
from .bank import capture_stats, install_stats
from .options import OPTION_NAMES, PreciseBNOptions, options_from, with_options
from .precise import PreciseBNReport, estimate, precise_bn

__all__ = ["FreezeBNHook", "PreciseBNHook", "freeze_epoch_for", "freeze_with_precise_stats"]

logger = logging.getLogger(__name__)

# FrozenBatchNorm's constructor keywords (device= is precise_bn's: the new layers take the old
# ones' device), and convert_batchnorm's domain= (which row of a per-domain layer to keep).
_FREEZE_KEYS = (
    set(inspect.signature(FrozenBatchNorm.__init__).parameters)
    - {"self", "num_features", "device"}
) | {"domain"}
_SELECT_KEYS = {"include", "exclude", "predicate"}


def split_freeze_kwargs(
    options: PreciseBNOptions | None, kwargs: dict[str, Any]
) -> tuple[PreciseBNOptions, dict[str, Any]]:
    """(the pass's options, the FrozenBatchNorm conversion's keywords) from ``kwargs``.

    Raises TypeError for a keyword that neither takes, or as :func:`options_from` for a bad
    option (the entry point adds its name).
    """
    unknown = set(kwargs) - OPTION_NAMES - _FREEZE_KEYS - _SELECT_KEYS
    if unknown:
        raise TypeError(
            f"unknown arguments {sorted(unknown)}; expected PreciseBNOptions fields "
            f"{sorted(OPTION_NAMES)}, FrozenBatchNorm's {sorted(_FREEZE_KEYS)} or a layer "
            f"selection {sorted(_SELECT_KEYS)}"
        )
    opts = options_from(options, {k: v for k, v in kwargs.items() if k in OPTION_NAMES})
    return opts, {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}


@with_options(other_keywords=True)
@in_context("freeze_with_precise_stats")
def freeze_with_precise_stats(
    model: nn.Module,
    data: Iterable[Any],
    options: PreciseBNOptions | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Recompute precise population statistics, then turn the BatchNorm layers into FrozenBN.

    ``kwargs`` are the pass's options (below, as for :func:`precise_bn`) and FrozenBatchNorm's
    keywords (``affine_trainable``, ...); ``include`` / ``exclude`` / ``predicate`` select
    layers as in :func:`rethinkbn.convert.convert_batchnorm`. Returns the model, the same object
    (a DDP or ``torch.compile`` wrapper included; its inner layers are replaced) unless the root
    itself was a BatchNorm.

    Side effects: the selected layers are replaced by FrozenBatchNorm layers holding the precise
    statistics; their weight and bias stay the same Parameter objects, so the optimizer keeps
    training them. Layers not selected keep their statistics. On an error the model is unchanged.
    The reverse is :func:`rethinkbn.convert.unfreeze_bn` (back to torch BatchNorm, with the
    frozen statistics as running statistics).
    """
    check_model_first(model, data)
    opts, layer_kwargs = split_freeze_kwargs(options, kwargs)
    inner = unwrap(model)
    old = capture_stats(inner)
    _, stats = estimate(inner, data, opts, label="freeze_with_precise_stats")
    install_stats(inner, stats, partial=True)
    frozen = inner
    try:
        frozen = freeze_bn(inner, include=include, exclude=exclude, predicate=predicate,
                           **layer_kwargs)
    finally:
        # layers still of their old kind (not selected, or a failed conversion) get their
        # statistics back
        kept = {name: old[name] for name, layer in batchnorm_layers(frozen, root=ROOT_NAME)
                if name in old and not is_frozen(layer)}
        install_stats(frozen, kept, partial=True)
    # a wrapper (DDP, torch.compile) stays the model to use, unless the root itself was replaced
    return model if frozen is inner else frozen


class PreciseBNHook:
    """Periodic PreciseBN for a plain loop: call ``hook(model, epoch)`` at the end of each epoch.

    Runs :func:`precise_bn` on ``data`` after epochs ``every_n_epochs - 1``,
    ``2 * every_n_epochs - 1``, ... (0-based) and returns its report (None on other epochs);
    ``reports`` keeps them all by epoch. ``options`` / ``kwargs`` are :func:`precise_bn`'s,
    checked now (``self.options``).
    """

    def __init__(
        self,
        data: Iterable[Any] | None,
        *,
        every_n_epochs: int = 1,
        options: PreciseBNOptions | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive_int(every_n_epochs, "every_n_epochs", "PreciseBNHook")
        self.data = data
        self.every_n_epochs = every_n_epochs
        with in_context("PreciseBNHook"):
            self.options = options_from(options, kwargs)
        self.reports: dict[int, PreciseBNReport] = {}

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    def __call__(
        self, model: nn.Module, epoch: int, data: Iterable[Any] | None = None, **overrides: Any
    ) -> PreciseBNReport | None:
        """Run when due; ``data`` and ``overrides`` replace the constructor's for this call."""
        if not self.due(epoch):
            return None
        with in_context("PreciseBNHook"):
            options = options_from(self.options, overrides)
        report = precise_bn(model, _data_for("PreciseBNHook", self.data, data), options)
        self.reports[epoch] = report
        logger.info("PreciseBN after epoch %d: %d samples", epoch, report.num_samples)
        return report


class FreezeBNHook:
    """FrozenBN from epoch ``freeze_epoch`` on: call ``model = hook(model, epoch)`` at the start
    of each epoch.

    At the first call with ``epoch >= freeze_epoch`` it runs :func:`freeze_with_precise_stats`
    (``options`` / ``kwargs`` go to it); later calls do nothing. Returns the model to keep using.
    """

    def __init__(
        self,
        data: Iterable[Any] | None,
        *,
        freeze_epoch: int,
        options: PreciseBNOptions | None = None,
        **kwargs: Any,
    ) -> None:
        check_int(freeze_epoch, "freeze_epoch", "FreezeBNHook", minimum=0)
        # a misspelt keyword fails now, not many epochs later at the freeze
        with in_context("FreezeBNHook"):
            self.options, self.layer_kwargs = split_freeze_kwargs(options, kwargs)
        self.data = data
        self.freeze_epoch = freeze_epoch
        self.frozen = False

    @classmethod
    def last_fraction(
        cls,
        data: Iterable[Any] | None,
        fraction: float,
        total_epochs: int,
        options: PreciseBNOptions | None = None,
        **kwargs: Any,
    ) -> FreezeBNHook:
        """Freeze for the last ``fraction`` of ``total_epochs`` (the paper: 0.2 of 100 epochs)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        return cls(data, freeze_epoch=freeze_epoch_for(fraction, total_epochs), options=options,
                   **kwargs)

    def __call__(
        self, model: nn.Module, epoch: int, data: Iterable[Any] | None = None, **overrides: Any
    ) -> nn.Module:
        """Freeze when due; ``data`` and ``overrides`` replace the constructor's for this call."""
        if self.frozen or epoch < self.freeze_epoch:
            return model
        with in_context("FreezeBNHook"):
            options, layer_kwargs = split_freeze_kwargs(self.options, overrides)
        model = freeze_with_precise_stats(model, _data_for("FreezeBNHook", self.data, data),
                                          options, **{**self.layer_kwargs, **layer_kwargs})
        self.frozen = True
        logger.info("FrozenBN from epoch %d on", epoch)
        return model


def _data_for(hook: str, own: Iterable[Any] | None, given: Iterable[Any] | None) -> Iterable[Any]:
    """The data of one call of a hook: ``given``, else the constructor's; TypeError if neither."""
    data = own if given is None else given
    if data is None:
        raise TypeError(f"{hook}: no data; pass it to the constructor or to the call")
    return data


def freeze_epoch_for(fraction: float, total_epochs: int) -> int:
    """The first epoch (0-based) of the last ``fraction`` of ``total_epochs``: 80 for 0.2, 100."""
    check_positive_int(total_epochs, "total_epochs", "freeze_epoch_for")
    return total_epochs - math.ceil(round(fraction * total_epochs, 9))
