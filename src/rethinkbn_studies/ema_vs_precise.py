"""Sec. 3, Fig. 2-3: EMA vs PreciseBN population statistics during training.

Two runs per seed, a normal and a large SGD batch (an epoch of the large batch is a few steps).
After every epoch the model is evaluated twice: with the EMA statistics it carries, and with
PreciseBN statistics (a copy of the model, ``PRECISE_SAMPLES`` training samples in batches of
``PRECISE_BATCH``). At a few checkpoints, Fig. 2's view: for the channels of one BN layer, where
the EMA mean sits against the distribution of ``NUM_BATCH_MEANS`` per-batch means of the current
model (the fraction of channels whose EMA mean falls outside the per-batch means' 5-95% range).

The momentum (lambda) sweep: the large-batch control run also keeps, beside torch's own EMA
(momentum 0.1), one EMA per momentum of ``MOMENTA`` over the same per-step batch statistics
(:class:`MomentumSweep`, torch's update rule, all started from the same PreciseBN statistics), so
one training run gives every momentum's statistics for the same weights, exactly; after every
epoch each is evaluated and compared with PreciseBN's.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rethinkbn.layers import is_batchnorm

from . import bn, paper
from .base import RunContext, StudyResult, SummaryRow, Table, Task, mean_std, register_study
from .common import (
    FULL_MNIST1D_SAMPLES,
    Scale,
    data_key,
    data_name,
    fmt,
    new_model,
    pyplot,
    save_plot,
    scale_for,
    study_data,
)
from .train import Callback, EpochEnd, TrainConfig, evaluate_wrong, train
from .verdicts import equivalent, exceeds, paired_bootstrap

PRECISE_SAMPLES = 1000
PRECISE_BATCH = 100
NUM_BATCH_MEANS = 100
NORMAL_BATCH = 64
LARGE_BATCH = 500
BASE_LR = 0.1
# "EMA worse than PreciseBN early": the first-half gap must exceed this many points.
EARLY_MARGIN = 1.0
# Fig. 4: "10^3 samples suffice": PreciseBN with 1000 samples within this many points of N.
SUFFICE_MARGIN = 0.5
# "EMA about as good as PreciseBN mid-training" (normal batch): the equivalence margin (points).
EQUAL_MARGIN = 1.0
# The lambda sweep: torch momenta (1 - lambda) of the EMAs kept beside the control run's own.
MOMENTA = (0.01, 0.03, 0.1, 0.3, 0.9)
# The sweep's "middle" momentum (torch's default) that a large momentum is compared with.
MIDDLE_MOMENTUM = 0.1


def _probe_layer(model: nn.Module) -> nn.Module:
    """The BN layer Fig. 2 looks at: the first BN of the last stage."""
    layers = [m for m in model.modules() if is_batchnorm(m)]
    return layers[len(layers) * 2 // 3]


@torch.no_grad()
def _batch_means_view(model: nn.Module, x: Tensor, batch: int, seed: int,
                      num_means: int = NUM_BATCH_MEANS) -> dict[str, Any]:
    """EMA mean of each channel of the probe layer vs 100 per-batch means of the current model."""
    probe = copy.deepcopy(model)
    layer = _probe_layer(probe)
    ema = layer.running_mean.detach().cpu().clone()
    means: list[Tensor] = []
    hook = layer.register_forward_pre_hook(
        lambda m, inp: means.append(inp[0].mean(dim=[0, *range(2, inp[0].dim())]).cpu())
    )
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    device = next(probe.parameters()).device
    try:
        for _ in range(num_means):
            probe(x[torch.randint(len(x), (batch,), generator=gen)].to(device))
    finally:
        hook.remove()
    stacked = torch.stack(means)  # (NUM_BATCH_MEANS, C)
    lo, hi = stacked.quantile(0.05, dim=0), stacked.quantile(0.95, dim=0)
    outside = (ema < lo) | (ema > hi)
    return {"ema": ema[:4].tolist(), "batch_means": stacked[:, :4].tolist(),
            "outside_fraction": float(outside.float().mean()), "outside": outside}


class PreciseStart(Callback):
    """The control run: before the first step, the EMA's start values become the PreciseBN
    statistics of the initialized model (instead of torch's 0 and 1)."""

    def __init__(self, x: Tensor, seed: int) -> None:
        self.x, self.seed = x, seed

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if epoch == 0:
            bn.population_stats(model, self.x, batch_size=PRECISE_BATCH,
                                num_samples=PRECISE_SAMPLES, seed=self.seed)


class MomentumSweep(Callback):
    """Beside torch's own EMA, one EMA of the per-step batch statistics per torch momentum in
    ``momenta``, with torch's update (``new = (1 - m) old + m batch``, the unbiased batch
    variance), all started from the BN layers' running statistics when training starts (after
    any callback listed before this one). The hooks run during training steps only: they are
    removed at the end of every epoch, so copies of the model made then carry none.
    ``install(model, m)`` writes momentum ``m``'s statistics into ``model``'s BN layers."""

    def __init__(self, momenta: tuple[float, ...]) -> None:
        self.momenta = momenta
        self.stats: dict[float, dict[str, tuple[Tensor, Tensor]]] = {}
        self.handles: list[Any] = []

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        layers = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
        if not self.stats:
            self.stats = {m: {n: (layer.running_mean.detach().clone(),
                                  layer.running_var.detach().clone())
                              for n, layer in layers.items()} for m in self.momenta}
        for name, layer in layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        @torch.no_grad()
        def update(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if not module.training:
                return
            x = inputs[0].detach()
            dims = [0, *range(2, x.dim())]
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=True)
            for m, stats in self.stats.items():
                old_mean, old_var = stats[name]
                old_mean.mul_(1 - m).add_(mean, alpha=m)
                old_var.mul_(1 - m).add_(var, alpha=m)
        return update

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def install(self, model: nn.Module, momentum: float) -> None:
        for name, layer in model.named_modules():
            if is_batchnorm(layer):
                mean, var = self.stats[momentum][name]
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)


def _distance(report: Any) -> list[float]:
    """PreciseBNReport's distances of the replaced (EMA) statistics from PreciseBN's, averaged
    over the BN layers: [rms mean shift in sigmas, rms log std ratio]."""
    return [float(np.mean([r.mean_shift for r in report.layers.values()])),
            float(np.mean([r.std_log_ratio for r in report.layers.values()]))]


def _run(ctx: RunContext, scale: Scale, batch: int, seed: int,
         control: bool = False) -> dict[str, Any]:
    """One training run, measured after every epoch: which validation samples the model gets
    wrong with its EMA statistics and with PreciseBN's, and Fig. 2's view at a few epochs.
    ``control``: the EMA starts from PreciseBN statistics (:class:`PreciseStart`), and the run
    also measures the EMA of every momentum in ``MOMENTA`` (:class:`MomentumSweep`). The normal
    batch's run also returns its final state (for Fig. 4)."""
    data = study_data(ctx).subset(scale.num_train, scale.num_val)
    model = new_model(ctx, data, scale, seed)
    warmup = 0.0 if batch == NORMAL_BATCH else max(1.0, scale.epochs / 10)
    config = TrainConfig(epochs=scale.epochs, batch_size=batch,
                         lr=BASE_LR * batch / NORMAL_BATCH, warmup_epochs=warmup)
    checkpoints = sorted({0, scale.epochs // 4, scale.epochs - 1})
    out: dict[str, Any] = {"ema_wrong": [], "precise_wrong": [], "fig2": {}, "distance": []}
    sweep = MomentumSweep(MOMENTA) if control else None
    if sweep is not None:
        out["sweep"] = {str(m): {"wrong": [], "distance": []} for m in MOMENTA}

    def measure(epoch: int, m: nn.Module) -> None:
        out["ema_wrong"].append(evaluate_wrong(m, data.val_x, data.val_y))
        precise = copy.deepcopy(m)
        report = bn.population_stats(precise, data.train_x, batch_size=PRECISE_BATCH,
                                     num_samples=PRECISE_SAMPLES, seed=seed + epoch)
        # How far the EMA statistics are from PreciseBN's, averaged over the BN layers.
        out["distance"].append(_distance(report))
        out["precise_wrong"].append(evaluate_wrong(precise, data.val_x, data.val_y))
        if sweep is not None:
            for mom in MOMENTA:
                other = copy.deepcopy(m)
                sweep.install(other, mom)
                out["sweep"][str(mom)]["wrong"].append(evaluate_wrong(other, data.val_x,
                                                                      data.val_y))
                out["sweep"][str(mom)]["distance"].append(_distance(bn.population_stats(
                    other, data.train_x, batch_size=PRECISE_BATCH,
                    num_samples=PRECISE_SAMPLES, seed=seed + epoch)))
        if epoch in checkpoints:
            out["fig2"][str(epoch + 1)] = _batch_means_view(
                m, data.train_x, NORMAL_BATCH, seed, 10 if ctx.tiny else NUM_BATCH_MEANS)

    start = [PreciseStart(data.train_x, seed), sweep] if sweep is not None else []
    train(model, data.train_x, data.train_y, config, seed=seed,
          callbacks=[*start, EpochEnd(measure)], progress=ctx.progress,
          desc=f"batch {batch}{' control' if control else ''} seed {seed}")
    for key in ("ema", "precise"):
        out[key] = [100.0 * float(w.float().mean()) for w in out[f"{key}_wrong"]]
    if batch == NORMAL_BATCH and not control:
        out["state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    return out


def fig4_samples(num_train: int) -> list[int]:
    """Fig. 4's numbers of PreciseBN samples: 10, 100, 1000, ... below N, and N."""
    return [n for n in (10, 100, 1000) if n < num_train] + [num_train]


def _fig4(ctx: RunContext, scale: Scale, seed: int, trained: dict[str, Any]) -> dict[str, Any]:
    """Fig. 4: which validation samples the final normal-batch model gets wrong with PreciseBN
    statistics from n training samples (batches of up to ``PRECISE_BATCH``), per n."""
    data = study_data(ctx).subset(scale.num_train, scale.num_val)
    model = new_model(ctx, data, scale, seed)
    model.load_state_dict(trained)
    out = {}
    for n in fig4_samples(len(data.train_x)):
        m = copy.deepcopy(model)
        bn.population_stats(m, data.train_x, batch_size=min(PRECISE_BATCH, n), num_samples=n,
                            seed=seed)
        out[str(n)] = evaluate_wrong(m, data.val_x, data.val_y)
    return out


def early_gap(curve: dict[str, list[float]]) -> float:
    """Mean of (EMA error - PreciseBN error) over the first half of the epochs (at least one)."""
    half = max(1, len(curve["ema_mean"]) // 2)
    pairs = zip(curve["ema_mean"][:half], curve["precise_mean"][:half], strict=True)
    return sum(e - p for e, p in pairs) / half


def _epochs_gap(wrong: dict[str, Any], first: int, last: int) -> np.ndarray:
    """Per seed and validation sample: EMA's minus PreciseBN's 0/1 error, averaged over the
    epochs ``first .. last-1`` (``wrong["ema"]``: per seed, an ``(epochs, samples)`` array)."""
    ema = np.stack([np.asarray(w, dtype=np.float64)[first:last].mean(0) for w in wrong["ema"]])
    pre = np.stack([np.asarray(w, dtype=np.float64)[first:last].mean(0)
                    for w in wrong["precise"]])
    return ema - pre


def _early(wrong: dict[str, Any]) -> np.ndarray:
    epochs = len(wrong["ema"][0])
    return _epochs_gap(wrong, 0, max(1, epochs // 2))


def _mean_error(wrong: list[Any], first: int, last: int) -> float:
    """Mean error (%) over seeds, samples and the epochs ``first .. last-1``."""
    return 100 * float(np.mean([np.asarray(w, dtype=np.float64)[first:last] for w in wrong]))


def late_start(epochs: int) -> int:
    """The lambda sweep's "late in training": the last quarter of the epochs (at least one)."""
    return epochs - max(1, epochs // 4)


def lambda_verdicts(sweep: dict[str, list[Any]], precise: list[Any]) -> list[SummaryRow]:
    """The momentum (lambda) sweep's claims, from ``sweep[str(momentum)]`` (per seed, the
    ``(epochs, samples)`` 0/1 errors with that momentum's EMA statistics) and ``precise`` (the
    same with PreciseBN statistics of the same weights): the smallest momentum (longest memory)
    lags PreciseBN in the first half of training, and the largest is noisier than
    ``MIDDLE_MOMENTUM`` in the last quarter (at least the last epoch: the learning rate is low,
    the weights change little, so lag matters least and noise most)."""
    moms = sorted(sweep, key=float)
    small, large, middle = moms[0], moms[-1], str(MIDDLE_MOMENTUM)
    epochs = len(np.asarray(precise[0]))
    half = max(1, epochs // 2)
    late = late_start(epochs)
    d_small = _epochs_gap({"ema": sweep[small], "precise": precise}, 0, half)
    d_large = _epochs_gap({"ema": sweep[large], "precise": sweep[middle]}, late, epochs)
    return [
        SummaryRow(
            f"Lambda sweep (large batch): a small momentum ({small}, lambda "
            f"{1 - float(small):.2f}) lags PreciseBN early in training",
            f"{_mean_error(sweep[small], 0, half):.1f} vs {_mean_error(precise, 0, half):.1f}"
            f" (epochs 1-{half})", "small momentum: EMA lags the changing weights",
            exceeds(f"momentum {small}: mean (EMA - PreciseBN) val error over epochs 1-{half} > "
                    f"{EARLY_MARGIN} pt, whole 95% interval",
                    paired_bootstrap(d_small, np.zeros_like(d_small)), EARLY_MARGIN)),
        SummaryRow(
            f"Lambda sweep (large batch): a large momentum ({large}, lambda "
            f"{1 - float(large):.2f}) is worse than the middle one ({middle}) late in "
            f"training (noise)",
            f"{_mean_error(sweep[large], late, epochs):.1f} vs "
            f"{_mean_error(sweep[middle], late, epochs):.1f} (epochs {late + 1}-{epochs})",
            "large momentum: EMA noisy (few batches)",
            exceeds(f"mean val error, momentum {large} - momentum {middle}, over epochs "
                    f"{late + 1}-{epochs} > 0 pt, whole 95% interval",
                    paired_bootstrap(d_large, np.zeros_like(d_large)), 0.0)),
    ]


def verdicts(numbers: dict[str, Any], wrong: dict[str, dict[str, Any]]) -> list[SummaryRow]:
    """Claims of Sec. 3 judged from per-sample errors: ``wrong[batch]["ema"|"precise"]`` (per
    seed, the ``(epochs, samples)`` 0/1 array of validation samples the model gets wrong after
    each epoch with that statistic) and ``wrong["fig2"]["first"|"last"]`` (per seed, which
    channels' EMA mean lies outside the per-batch means at the first/last checkpoint). Every
    effect comes with a paired bootstrap over samples (channels) and seeds; the displayed
    numbers are the means in ``numbers``."""
    rows = []
    curves = numbers["curves"]
    large_batch = numbers["large_batch"]
    large, normal = curves[str(large_batch)], curves[str(NORMAL_BATCH)]
    gap_large, gap_normal = early_gap(large), early_gap(normal)
    d_large = _early(wrong[str(large_batch)])
    d_normal = _early(wrong[str(NORMAL_BATCH)])
    rows.append(SummaryRow(
        f"Large batch ({large_batch}): EMA worse than PreciseBN early in training",
        f"EMA - PreciseBN = {gap_large:+.1f} pt (first half)",
        "~55-67% vs ~45% (batch 8192, epochs 5-30)",
        exceeds(f"mean (EMA - PreciseBN) val error over the first half of epochs > "
                f"{EARLY_MARGIN} pt, whole 95% interval",
                paired_bootstrap(d_large, np.zeros_like(d_large)), EARLY_MARGIN),
    ))
    rows.append(SummaryRow(
        "EMA's early deficit is larger with the large batch",
        f"{gap_large:+.1f} vs {gap_normal:+.1f} pt",
        "8k: much noisier EMA than 256",
        exceeds("first-half (EMA - PreciseBN) gap: large batch - normal batch > 0, whole 95% "
                "interval", paired_bootstrap(d_large, d_normal), 0.0),
    ))
    epochs = len(normal["ema_mean"])
    first, last = epochs // 4, max(epochs // 4 + 1, (3 * epochs) // 4)
    d_mid = _epochs_gap(wrong[str(NORMAL_BATCH)], first, last)
    mid = float(d_mid.mean() * 100)
    rows.append(SummaryRow(
        f"Normal batch ({NORMAL_BATCH}): EMA about as good as PreciseBN mid-training",
        f"EMA - PreciseBN = {mid:+.1f} pt (epochs {first + 1}-{last})",
        "curves overlap for batch 256",
        equivalent(f"|EMA - PreciseBN| val error over epochs {first + 1}-{last} (the learning "
                   f"rate still high) <= {EQUAL_MARGIN} pt (equivalence margin), whole 90% "
                   f"interval", paired_bootstrap(d_mid, np.zeros_like(d_mid), confidence=0.90),
                   EQUAL_MARGIN),
    ))
    fig2 = numbers["fig2_outside"]
    out_first = np.stack([np.asarray(o, dtype=np.float64) for o in wrong["fig2"]["first"]])
    out_last = np.stack([np.asarray(o, dtype=np.float64) for o in wrong["fig2"]["last"]])
    rows.append(SummaryRow(
        "Fig. 2: EMA mean falls outside the per-batch means, most of all early",
        f"outside: {100 * fig2[0]:.0f}% of channels early, {100 * fig2[-1]:.0f}% late",
        "often outside early",
        exceeds("fraction of channels with the EMA mean outside the 5-95% range of the "
                "per-batch means: first checkpoint - last checkpoint > 0 pt, whole 95% interval",
                paired_bootstrap(out_first, out_last, units="channels"), 0.0),
    ))
    if "control" in wrong:
        d_control = _early(wrong["control"])
        gap_control = float(d_control.mean() * 100)
        rows.append(SummaryRow(
            "Large batch, EMA started from PreciseBN statistics (control): still worse early "
            "(lag and noise, not the EMA's start values)",
            f"EMA - PreciseBN = {gap_control:+.1f} pt (first half)", "(the paper's mechanism)",
            exceeds(f"control run: mean (EMA - PreciseBN) over the first half > {EARLY_MARGIN} "
                    f"pt, whole 95% interval",
                    paired_bootstrap(d_control, np.zeros_like(d_control)), EARLY_MARGIN)))
    if "fig4" in wrong:
        sizes = sorted(wrong["fig4"], key=int)
        n_all, few = sizes[-1], sizes[0]
        suffice = "1000" if "1000" in wrong["fig4"] else sizes[-2]
        err = {k: 100 * float(np.mean(np.stack([np.asarray(w, dtype=float)
                                                for w in wrong["fig4"][k]]))) for k in sizes}
        fig4 = {k: np.stack([np.asarray(w, dtype=bool) for w in wrong["fig4"][k]])
                for k in sizes}
        rows.append(SummaryRow(
            f"Fig. 4: PreciseBN with {suffice} samples is as good as with all {n_all}",
            f"{err[suffice]:.1f} vs {err[n_all]:.1f}", "10^3-10^4 samples suffice",
            equivalent(f"|err(n={suffice}) - err(n={n_all})| <= {SUFFICE_MARGIN} pt "
                       f"(equivalence margin), whole 90% interval",
                       paired_bootstrap(fig4[suffice], fig4[n_all], confidence=0.90),
                       SUFFICE_MARGIN)))
        rows.append(SummaryRow(
            f"Fig. 4: {few} samples are too few for PreciseBN",
            f"{err[few]:.1f} vs {err[n_all]:.1f}", "error rises below ~10^2-10^3 samples",
            exceeds(f"err(n={few}) - err(n={n_all}) > 0, whole 95% interval",
                    paired_bootstrap(fig4[few], fig4[n_all]), 0.0)))
    if "sweep" in wrong:
        rows += lambda_verdicts(wrong["sweep"], wrong["control"]["precise"])
    return rows


def _plot(ctx: RunContext, numbers: dict[str, Any]) -> list[str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for batch, style in ((NORMAL_BATCH, "-"), (numbers["large_batch"], "--")):
        c = numbers["curves"][str(batch)]
        epochs = range(1, len(c["ema_mean"]) + 1)
        ax.plot(epochs, c["ema_mean"], style, color="tab:red", label=f"EMA, batch {batch}")
        ax.plot(epochs, c["precise_mean"], style, color="tab:blue",
                label=f"PreciseBN, batch {batch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%)")
    ax.set_yscale("log")
    # Plain numbers on the log axis: "10^1" does not tell a reader 2% from 5%.
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100], ["1", "2", "5", "10", "20", "50", "100"])
    ax.minorticks_off()
    ax.set_title("Fig. 3 analog: EMA vs PreciseBN population statistics")
    ax.legend()
    curves = save_plot(ctx, fig, "ema_vs_precise.png")

    views = numbers["fig2_views"]
    fig, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 3.2), squeeze=False)
    for ax, (epoch, view) in zip(axes[0], views.items(), strict=True):
        means = torch.tensor(view["batch_means"])
        for ch in range(means.shape[1]):
            ax.scatter([ch] * len(means), means[:, ch], s=4, alpha=0.3, color="tab:blue")
            ax.scatter([ch], [view["ema"][ch]], marker="x", s=60, color="tab:red")
        ax.set_title(f"epoch {epoch}")
        ax.set_xlabel("channel")
    axes[0][0].set_ylabel("per-batch means (dots), EMA (x)")
    fig.suptitle("Fig. 2 analog: EMA mean vs per-batch means")
    means = save_plot(ctx, fig, "ema_batch_means.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = sorted(numbers["fig4"], key=int)
    ax.errorbar([int(n) for n in sizes], [numbers["fig4"][n]["mean"] for n in sizes],
                yerr=[numbers["fig4"][n]["std"] for n in sizes], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("PreciseBN samples")
    ax.set_ylabel("validation error (%)")
    ax.set_title("Fig. 4 analog: PreciseBN error vs samples")
    fig4 = save_plot(ctx, fig, "precise_samples.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    sweep = numbers["lambda_sweep"]
    epochs = range(1, len(sweep["precise"]) + 1)
    for mom, curve in sweep["ema"].items():
        ax.plot(epochs, curve, marker=".", label=f"EMA, momentum {mom} (lambda "
                f"{1 - float(mom):.2f})")
    ax.plot(epochs, sweep["precise"], "k--", label="PreciseBN")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%)")
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100], ["1", "2", "5", "10", "20", "50", "100"])
    ax.minorticks_off()
    ax.set_title(f"Lambda sweep: EMA momentum, batch {numbers['large_batch']} (control run)")
    ax.legend(fontsize=8)
    return [curves, means, fig4, save_plot(ctx, fig, "ema_momentum_sweep.png")]


@register_study("ema-vs-precise",
                "Sec. 3, Fig. 2-3: EMA vs PreciseBN statistics per epoch, normal and large batch")
def run(ctx: RunContext) -> StudyResult:
    data = study_data(ctx)  # generated here once, before worker processes read it
    scale = scale_for(ctx, quick_epochs=8, full_epochs=20,
                      mnist1d_train_samples=FULL_MNIST1D_SAMPLES)  # the narrow ResNet
    if not ctx.tiny:
        # All of the training set: the large batch gets enough steps per epoch.
        scale = dataclasses.replace(scale, num_train=len(data.train_x))
    if scale.num_train < 2 * NORMAL_BATCH:
        raise ValueError(f"ema-vs-precise needs >= {2 * NORMAL_BATCH} training samples, "
                         f"got {scale.num_train}")
    large = min(LARGE_BATCH, scale.num_train // 2)
    jobs = [(b, False, s) for b in (NORMAL_BATCH, large) for s in ctx.seeds]
    jobs += [(large, True, s) for s in ctx.seeds]
    results = ctx.run_all(
        [Task({"study": "ema-vs-precise", "v": 4, "data": data_key(ctx), "batch": b,
               "control": c, "seed": s, "scale": scale.as_dict(),
               "precise": [PRECISE_SAMPLES, PRECISE_BATCH],
               # Only the control run keeps the lambda sweep (the other runs' keys as before).
               **({"lambda_sweep": list(MOMENTA)} if c else {})},
              _run, (scale, b, s, c)) for b, c, s in jobs], desc="ema-vs-precise: training")
    runs: dict[str, list[dict[str, Any]]] = {}
    wrong: dict[str, dict[str, Any]] = {}
    for (batch, control, _), r in zip(jobs, results, strict=True):
        name = "control" if control else str(batch)
        runs.setdefault(name, []).append(r)
        for key in ("ema", "precise"):
            wrong.setdefault(name, {}).setdefault(key, []).append(
                np.stack([np.asarray(w) for w in r[f"{key}_wrong"]]))
    finals = [(s, r["state"]) for (b, c, s), r in zip(jobs, results, strict=True)
              if b == NORMAL_BATCH and not c]
    fig4 = ctx.run_all(
        [Task({"study": "ema-vs-precise", "run": "fig4", "v": 1, "data": data_key(ctx),
               "seed": s, "scale": scale.as_dict(), "precise": PRECISE_BATCH},
              _fig4, (scale, s, state)) for s, state in finals], desc="ema-vs-precise: Fig. 4")
    wrong["fig4"] = {n: [f[n] for f in fig4] for n in fig4[0]}
    control_runs = runs["control"]
    wrong["sweep"] = {m: [np.stack([np.asarray(w) for w in r["sweep"][m]["wrong"]])
                          for r in control_runs] for m in control_runs[0]["sweep"]}
    views = [r["fig2"] for r in runs[str(NORMAL_BATCH)]]
    marks_fig2 = list(views[0])
    wrong["fig2"] = {"first": [v[marks_fig2[0]]["outside"] for v in views],
                     "last": [v[marks_fig2[-1]]["outside"] for v in views]}
    curves: dict[str, Any] = {}
    for batch, rs in runs.items():
        ema = [mean_std([r["ema"][e] for r in rs]) for e in range(scale.epochs)]
        pre = [mean_std([r["precise"][e] for r in rs]) for e in range(scale.epochs)]
        curves[str(batch)] = {"ema_mean": [m for m, _ in ema], "ema_std": [s for _, s in ema],
                              "precise_mean": [m for m, _ in pre],
                              "precise_std": [s for _, s in pre],
                              "per_seed": [{"ema": r["ema"], "precise": r["precise"],
                                            "distance": r["distance"]} for r in rs]}
    for r in runs[str(NORMAL_BATCH)]:
        for view in r["fig2"].values():
            view.pop("outside", None)
    normal_runs = runs[str(NORMAL_BATCH)]
    first = normal_runs[0]["fig2"]
    outside = [sum(r["fig2"][e]["outside_fraction"] for r in normal_runs) / len(normal_runs)
               for e in first]
    fig4_err = {n: mean_std([100 * float(np.asarray(w, dtype=float).mean()) for w in ws])
                for n, ws in wrong["fig4"].items()}
    sweep_numbers = {
        "momenta": list(MOMENTA),
        "ema": {m: [_mean_error([w[e : e + 1] for w in ws], 0, 1) for e in range(scale.epochs)]
                for m, ws in wrong["sweep"].items()},
        "precise": curves["control"]["precise_mean"],
        "distance": {m: [np.mean([r["sweep"][m]["distance"][e] for r in control_runs],
                                 axis=0).tolist() for e in range(scale.epochs)]
                     for m in wrong["sweep"]}}
    numbers = {"lambda_sweep": sweep_numbers, "curves": curves, "large_batch": large,
               "fig2_outside": outside, "fig2_views": first,
               "fig2_epochs": list(first), "scale": scale.as_dict(),
               "fig4": {n: {"mean": m, "std": sd} for n, (m, sd) in fig4_err.items()}}
    rows = []
    marks = sorted({max(1, e) for e in (1, scale.epochs // 4, scale.epochs // 2, scale.epochs)})
    for name in (str(NORMAL_BATCH), str(large), "control"):
        rs = runs[name]
        for e in marks:
            rows.append([f"{large}, EMA from PreciseBN" if name == "control" else name, e,
                         fmt([r["ema"][e - 1] for r in rs]),
                         fmt([r["precise"][e - 1] for r in rs]),
                         f"{np.mean([r['distance'][e - 1][0] for r in rs]):.3f}",
                         f"{np.mean([r['distance'][e - 1][1] for r in rs]):.3f}"])
    table = Table("validation error (%) at selected epochs, and the distance of the EMA "
                  "statistics from PreciseBN's (PreciseBNReport, mean over BN layers and seeds: "
                  "rms mean shift in sigmas, rms log std ratio)",
                  ["SGD batch", "epoch", "EMA", "PreciseBN", "mean shift", "log std ratio"],
                  rows)
    fig2_table = Table("Fig. 2 view: channels of one BN layer whose EMA mean is outside the "
                       "5-95% range of 100 per-batch means (normal batch)",
                       ["epoch", "outside (%)"],
                       [[e, 100 * f] for e, f in zip(first, outside, strict=True)], digits=0)
    fig4_table = Table("Fig. 4 view: final normal-batch model, validation error (%) with "
                       "PreciseBN statistics from n training samples", ["n", "error"],
                       [[n, fmt([100 * float(np.asarray(w, dtype=float).mean()) for w in ws])]
                        for n, ws in wrong["fig4"].items()])
    half = max(1, scale.epochs // 2)
    late = late_start(scale.epochs)
    sweep_rows = [[m, f"{1 - float(m):.2f}", _mean_error(ws, 0, half),
                   _mean_error(ws, late, scale.epochs),
                   np.mean([d[0] for d in sweep_numbers["distance"][m][:half]]),
                   np.mean([d[0] for d in sweep_numbers["distance"][m][late:]])]
                  for m, ws in wrong["sweep"].items()]
    sweep_rows.append(["PreciseBN", "-", _mean_error(wrong["control"]["precise"], 0, half),
                       _mean_error(wrong["control"]["precise"], late, scale.epochs), 0.0, 0.0])
    sweep_table = Table(
        f"Momentum (lambda) sweep: batch {large}, EMAs of the control run's batch statistics "
        f"(all started from PreciseBN statistics) with torch momentum m = 1 - lambda: mean "
        f"validation error (%) over epochs 1-{half} and {late + 1}-{scale.epochs}, and the "
        f"rms mean shift (sigmas) of the EMA from PreciseBN's statistics of the same weights",
        ["momentum", "lambda", f"error, epochs 1-{half}", f"error, epochs {late + 1}-"
         f"{scale.epochs}", f"mean shift, 1-{half}", f"mean shift, {late + 1}-{scale.epochs}"],
        sweep_rows, digits=2)
    paper_table = Table("Fig. 3 (ResNet-50, ImageNet; read off the plot)",
                        ["SGD batch", "epochs 5-30", "end of training"],
                        [[256, "EMA noisier, worse than PreciseBN", "EMA = PreciseBN"],
                         [8192, "EMA ~55-67% vs PreciseBN ~45%", "EMA slightly worse"]])
    setup = (
        f"{data_name(ctx)}, {scale.num_train} training / {scale.num_val} validation samples, "
        f"a 1-D ResNet (widths {list(scale.widths)}, BatchNorm momentum 0.1 = lambda 0.9), "
        f"{scale.epochs} epochs of SGD (momentum 0.9, cosine LR, lr {BASE_LR} x batch/"
        f"{NORMAL_BATCH}, warmup for the large batch) with SGD batch {NORMAL_BATCH} "
        f"({scale.num_train // NORMAL_BATCH} steps/epoch) and {large} "
        f"({scale.num_train // large} steps/epoch). After every epoch: validation error "
        f"with the EMA statistics, and with PreciseBN over {PRECISE_SAMPLES} training samples "
        f"in batches of {PRECISE_BATCH}. Control: a third run with the large batch whose EMA "
        f"starts from PreciseBN statistics of the initialized model (not torch's 0 and 1), so "
        f"that its early deficit is lag and noise, not start-up bias. Fig. 4: the final "
        f"normal-batch model with PreciseBN from n = {', '.join(wrong['fig4'])} samples. "
        f"Momentum (lambda) sweep: during the control run, EMAs with torch momenta "
        f"{', '.join(map(str, MOMENTA))} (lambda = 1 - momentum) of the same per-step batch "
        f"statistics, started from the same PreciseBN statistics, each evaluated after every "
        f"epoch against PreciseBN of the same weights (no retraining per momentum). "
        f"Seeds: {list(ctx.seeds)}. The paper: {paper.FIG3_NOTES}"
    )
    return StudyResult(setup=setup, tables=[table, fig2_table, fig4_table, sweep_table],
                       paper_tables=[paper_table],
                       plots=_plot(ctx, numbers), summary=verdicts(numbers, wrong),
                       numbers=numbers)
