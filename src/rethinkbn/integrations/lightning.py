"""Lightning callbacks: periodic PreciseBN and FrozenBN for the last part of training.

    trainer = lightning.Trainer(callbacks=[PreciseBN(num_samples=10_000), FreezeBN(fraction=0.2)])

The callbacks subclass ``lightning.pytorch.Callback`` (the ``lightning`` package), or
``pytorch_lightning.Callback`` when only the older package is installed. Both use the trainer's
training dataloader unless given ``data``, and the module's device. Their options are those of
:func:`rethinkbn.precise_bn` (:class:`~rethinkbn.population.PreciseBNOptions`). Under a
distributed strategy every rank passes over its own shard and :func:`rethinkbn.precise_bn` merges
the ranks' statistics in one collective.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # only the older package name is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            "rethinkbn.integrations.lightning needs Lightning: pip install 'rethinkbn[lightning]'"
        ) from error

from .._checks import in_context
from .._model import batchnorm_layers, running_buffers
from ..convert import freeze_bn
from ..layers import FrozenBatchNorm
from ..population.options import PreciseBNOptions
from ..population.schedule import (
    FreezeBNHook,
    PreciseBNHook,
    freeze_epoch_for,
    split_freeze_kwargs,
)

__all__ = ["FreezeBN", "PreciseBN"]


def _data(own: Iterable[Any] | None, trainer: pl.Trainer) -> Iterable[Any]:
    data = own if own is not None else trainer.train_dataloader
    if data is None:
        raise ValueError("the trainer has no training dataloader; pass data= to the callback")
    return data


class PreciseBN(pl.Callback):
    """Recompute precise population statistics every ``every_n_epochs`` epochs.

    Runs before validation (sanity checks excepted) so that validation uses them, or at the end
    of the training epoch when no validation ran since the last training step. ``kwargs`` go to
    :func:`rethinkbn.precise_bn`. ``reports`` holds the reports by epoch.

    Pass ``data`` (a loader of its own) when the training loader has persistent workers and
    validation runs mid-epoch: a second iteration of that loader would restart the workers of
    the epoch in progress.
    """

    def __init__(
        self,
        data: Iterable[Any] | None = None,
        *,
        every_n_epochs: int = 1,
        options: PreciseBNOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self.data = data
        self.hook = PreciseBNHook(data, every_n_epochs=every_n_epochs, options=options, **kwargs)
        self._last_step: int | None = None

    @property
    def reports(self) -> dict[int, Any]:
        return self.hook.reports

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step == trainer.global_step or not self.hook.due(trainer.current_epoch):
            return
        self._last_step = trainer.global_step
        device = self.hook.options.device or pl_module.device
        self.hook(pl_module, trainer.current_epoch, _data(self.data, trainer), device=device)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


class FreezeBN(pl.Callback):
    """Train the last epochs with FrozenBatchNorm holding precise statistics (paper Sec. 4.3).

    Freezes at the start of epoch ``freeze_epoch``, or of the last ``fraction`` of
    ``trainer.max_epochs`` (default: the last 20%). ``options`` / ``kwargs`` go to
    :func:`rethinkbn.population.freeze_with_precise_stats` (``num_samples``, ``include``, ...).
    The optimizer keeps working: the affine parameters stay the same Parameter objects.

    Resuming (``trainer.fit(ckpt_path=...)``) from a checkpoint saved after the freeze: the
    callback's state says it froze, the checkpoint's statistics load into the model's plain
    BatchNorm layers, and at the start of the next training epoch those layers become
    FrozenBatchNorm again, holding the loaded statistics (no new pass).
    """

    def __init__(
        self,
        data: Iterable[Any] | None = None,
        *,
        freeze_epoch: int | None = None,
        fraction: float = 0.2,
        options: PreciseBNOptions | None = None,
        **kwargs: Any,
    ) -> None:
        if freeze_epoch is None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        with in_context("FreezeBN"):
            self.options, self.layer_kwargs = split_freeze_kwargs(options, kwargs)
        self.data = data
        self.freeze_epoch = freeze_epoch
        self.fraction = fraction
        self.frozen = False

    def _hook(self, trainer: pl.Trainer) -> FreezeBNHook:
        epoch = self.freeze_epoch
        if epoch is None:
            if not trainer.max_epochs or trainer.max_epochs < 1:
                raise ValueError(
                    "FreezeBN: the trainer has no max_epochs (got "
                    f"{trainer.max_epochs!r}); pass freeze_epoch= instead of fraction="
                )
            epoch = freeze_epoch_for(self.fraction, trainer.max_epochs)
        hook = FreezeBNHook(self.data, freeze_epoch=epoch, options=self.options,
                            **self.layer_kwargs)
        hook.frozen = self.frozen
        return hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen:
            self._refreeze(pl_module)
            return
        hook = self._hook(trainer)
        device = self.options.device or pl_module.device
        hook(pl_module, trainer.current_epoch, _data(self.data, trainer), device=device)
        self.frozen = hook.frozen

    def _refreeze(self, pl_module: pl.LightningModule) -> None:
        """After a resume: freeze the layers that a checkpoint reload made plain BatchNorm again.

        Their running buffers hold the frozen statistics loaded from the checkpoint.
        """
        if any(not isinstance(layer, FrozenBatchNorm) and running_buffers(layer) is not None
               for _, layer in batchnorm_layers(pl_module)):
            with warnings.catch_warnings():
                # with include=/exclude=, unselected layers stay plain: nothing to convert
                warnings.filterwarnings("ignore", "convert_batchnorm: no BatchNorm layer")
                freeze_bn(pl_module, **self.layer_kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = bool(state_dict.get("frozen", False))
