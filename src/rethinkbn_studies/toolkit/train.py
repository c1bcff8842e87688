"""The SGD training loop of the studies (:func:`sgd`, the one loop every study trains with),
with per-epoch callbacks and a progress bar; :func:`train` runs it on a classification set.

SGD with momentum and weight decay; the learning rate warms up linearly over
``warmup_epochs`` and then follows a cosine to zero, updated every step. Each epoch visits the
training set in a seeded random order, in batches of ``batch_size`` (the last, smaller batch is
dropped so every step has the SGD batch size). How BatchNorm normalizes a batch (its NBS) is a
property of the model's layers, not of the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.base import ProgressFactory

__all__ = ["Callback", "EpochEnd", "TrainConfig", "evaluate_error", "evaluate_wrong",
           "predict_logits", "sgd", "shuffled_batches", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all of them go into the run cache's key)."""

    epochs: int
    batch_size: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.milestones:  # the cosine schedule: keys as before step decay existed
            del out["milestones"], out["gamma"]
        return out

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of ``step``: linear warmup, then cosine decay to 0; or, with
        ``milestones`` (fractions of training), a step decay: ``lr * gamma**k`` after the
        ``k``-th milestone."""
        total = self.epochs * steps_per_epoch
        warm = self.warmup_epochs * steps_per_epoch
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.milestones:
            return self.lr * self.gamma ** sum(step >= m * total for m in self.milestones)
        progress = (step - warm) / max(1.0, total - warm)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Callback:
    """Hooks of the loop; override what you need. ``epoch`` counts from 0.

    ``on_epoch_start`` may change the model (e.g. freeze BN for the last epochs); an exception
    raised from a hook stops training and propagates (finished runs stay in the cache).
    """

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        pass


class EpochEnd(Callback):
    """A callback from a plain function ``fn(epoch, model)`` called after every epoch."""

    def __init__(self, fn: Callable[[int, nn.Module], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.fn(epoch, model)


def sgd(
    model: nn.Module,
    config: TrainConfig,
    batches: Callable[[int], Iterable[Any]],
    loss_of: Callable[[nn.Module, Any], Tensor],
    *,
    steps_per_epoch: int,
    callbacks: Sequence[Callback] = (),
    after_backward: Callable[[nn.Module], None] | None = None,
    progress: ProgressFactory | None = None,
    desc: str = "train",
) -> float:
    """The studies' one SGD loop: ``config.epochs`` epochs of ``loss_of(model, batch)`` over
    ``batches(epoch)``; returns the last step's loss.

    SGD with ``config``'s momentum and weight decay; the learning rate of each step follows
    :meth:`TrainConfig.lr_at` with ``steps_per_epoch``. Each epoch calls the callbacks'
    ``on_epoch_start`` (a callback may replace layers: the optimizer then follows the model's new
    parameters, keeping the momentum of those that stayed), puts the model in train mode, takes
    one step per batch, then calls ``on_epoch_end``. ``after_backward(model)`` runs between
    backward and the step (e.g. averaging gradients across ranks).
    """
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    epochs = range(config.epochs)
    bar = progress(epochs, desc=desc, total=config.epochs, leave=False) if progress else epochs
    step, loss = 0, torch.tensor(float("nan"))
    for epoch in bar:
        params = list(model.parameters())
        for cb in callbacks:
            cb.on_epoch_start(epoch, model)
        if [id(p) for p in model.parameters()] != [id(p) for p in params]:
            opt = _rebuilt(opt, model)
        model.train()
        for batch in batches(epoch):
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step, steps_per_epoch)
            loss = loss_of(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            step += 1
        for cb in callbacks:
            cb.on_epoch_end(epoch, model)
    return float(loss.item())


def shuffled_batches(n: int, batch_size: int, seed: int) -> Callable[[int], Iterator[Tensor]]:
    """``batches(epoch)`` for :func:`sgd`: the indices of ``n`` samples in a seeded random order
    (one permutation per epoch, drawn in epoch order), ``n // batch_size`` full batches."""
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterator[Tensor]:
        order = torch.randperm(n, generator=gen)
        for i in range(n // batch_size):
            yield order[i * batch_size : (i + 1) * batch_size]

    return batches


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    seed: int,
    callbacks: Sequence[Callback] = (),
    progress: ProgressFactory | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy (:func:`sgd`); returns the model.

    ``seed`` fixes the sample order (the model's initialization is the caller's). The model
    must already be on its device; ``x`` and ``y`` are moved there batch by batch.
    """
    if config.batch_size > len(x):
        raise ValueError(
            f"train: batch_size {config.batch_size} exceeds the {len(x)} training samples"
        )
    device = next(model.parameters()).device
    loss_fn = nn.CrossEntropyLoss()
    sgd(model, config, shuffled_batches(len(x), config.batch_size, seed),
        lambda m, idx: loss_fn(m(x[idx].to(device)), y[idx].to(device)),
        steps_per_epoch=len(x) // config.batch_size, callbacks=callbacks, progress=progress,
        desc=desc)
    return model


def _rebuilt(opt: torch.optim.SGD, model: nn.Module) -> torch.optim.SGD:
    """A new SGD over ``model``'s current parameters after a callback replaced layers (e.g.
    FrozenBN); momentum buffers carry over for every parameter that is still the same tensor."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    new = torch.optim.SGD(model.parameters(), **group)
    for p in model.parameters():
        if p in opt.state:
            new.state[p] = opt.state[p]
    return new


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits of ``model`` on ``x`` in batches of ``batch_size``, in the model's current mode.

    The caller picks the mode: ``model.eval()`` for population statistics, or train mode inside
    ``batch_stats_inference`` for mini-batch statistics (then ``batch_size`` is the evaluation
    batch whose statistics normalize it).
    """
    device = next(model.parameters()).device
    outs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def evaluate_wrong(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
    """Which samples of ``(x, y)`` ``model`` gets wrong (bool, one per sample) with population
    statistics (eval mode), for paired tests between models. Restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        pred = predict_logits(model, x, batch_size).argmax(1)
    finally:
        model.train(was_training)
    return pred != y.to(pred.device)


def evaluate_error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 error (%) of ``model`` on ``(x, y)`` with population statistics (eval mode).

    Restores the model's train/eval mode afterwards.
    """
    return 100.0 * float(evaluate_wrong(model, x, y, batch_size).float().mean())
