"""Study ``domain-shift`` (Sec. 5, Table 4): population statistics from the test domain.

A ResNet trained on clean, augmented data is evaluated on corrupted versions of the validation
set (:mod:`.corruptions`, all five families at severity :data:`SEVERITY`), with two sets of
population statistics each:

- the training domain's: PreciseBN over the (augmented) training data;
- the target domain's: :func:`~rethinkbn.population.recompute_stats` over held-out samples of
  that domain (the first half of the corrupted validation set), kept in a
  :class:`~rethinkbn.population.StatsBank` and switched in with ``bank.use(model, domain)``;
  every error is measured on the other half.

The clean-domain rows of the paper: the clean evaluation half with the training statistics
(train-augmented), with statistics of un-augmented clean held-out samples, and with the
statistics of the contrast domain.

Training augmentation (drawn once per sample): a random circular shift of up to
:data:`MAX_SHIFT` positions along the last axis and an amplitude scale in [0.8, 1.2]; it shifts
the training statistics a little away from clean data, as ImageNet's crops and flips do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rethinkbn.population import Snapshot, StatsBank, recompute_stats

from . import paper
from .base import RunContext, StudyResult, SummaryRow, Table, mean_std, register_study, verdict
from .common import Scale, fmt, new_model, pyplot, save_plot, scale_for
from .corruptions import CORRUPTIONS, corrupt
from .data import DataSplit
from .train import TrainConfig, evaluate_error, train

__all__ = ["SEVERITY", "augment", "run", "run_seed", "verdicts"]

SEVERITY = 3
MAX_SHIFT = 3
SGD_BATCH = 128
LR = 0.2
STATS_BATCH = 100
TRAIN_STATS = "train-augmented"
CLEAN_STATS = "clean, un-augmented"


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each sample circularly shifted by ``U{-MAX_SHIFT..MAX_SHIFT}`` along the last axis and
    scaled by ``U(0.8, 1.2)``; a new tensor, deterministic given ``generator``."""
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (x.size(0),), generator=generator)
    gains = 0.8 + 0.4 * torch.rand(x.size(0), generator=generator, dtype=torch.float64)
    out = torch.stack([row.roll(int(s), dims=-1) for row, s in zip(x, shifts, strict=True)])
    return out * gains.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _batches(x: Tensor) -> list[Tensor]:
    return [x[i:i + STATS_BATCH] for i in range(0, len(x), STATS_BATCH)]


def run_seed(ctx: RunContext, data: DataSplit, scale: Scale, seed: int) -> dict[str, Any]:
    """Train on augmented clean data, build the statistics bank, measure every error (%)."""
    device = ctx.device
    g = torch.Generator().manual_seed(seed)
    train_x = augment(data.train_x[: scale.num_train], g)
    train_y = data.train_y[: scale.num_train]
    val_x, val_y = data.val_x[: scale.num_val], data.val_y[: scale.num_val]
    half = len(val_x) // 2
    stats_x, eval_x, eval_y = val_x[:half], val_x[half:], val_y[half:]
    domains = {
        name: (corrupt(stats_x, name, SEVERITY, generator=g),
               corrupt(eval_x, name, SEVERITY, generator=g))
        for name in CORRUPTIONS
    }
    model = new_model(ctx, data, scale, seed)
    config = TrainConfig(epochs=scale.epochs, batch_size=SGD_BATCH, lr=LR, warmup_epochs=1)
    train(model, train_x, train_y, config, seed=seed, progress=ctx.progress, desc=f"seed {seed}")

    def population(x: Tensor) -> Snapshot:
        """PreciseBN statistics over all of ``x``, in batches of STATS_BATCH."""
        return recompute_stats(model, _batches(x), num_samples=len(x), device=device,
                               progress=False)

    bank = StatsBank()
    bank[TRAIN_STATS] = population(train_x)
    bank[CLEAN_STATS] = population(stats_x)
    for name, (held_out, _) in domains.items():
        bank[name] = population(held_out)

    def error(stats_name: str, x: Tensor) -> float:
        with bank.use(model, stats_name):
            return evaluate_error(model, x, eval_y)

    shifted = {
        name: {"source": error(TRAIN_STATS, test_x), "target": error(name, test_x)}
        for name, (_, test_x) in domains.items()
    }
    clean = {
        TRAIN_STATS: error(TRAIN_STATS, eval_x),
        CLEAN_STATS: error(CLEAN_STATS, eval_x),
        "contrast": error("contrast", eval_x),
    }
    return {"shifted": shifted, "clean": clean}


MIN_GAIN_PT = 1.0


def verdicts(shifted: dict[str, dict[str, float]], clean: dict[str, float]) -> list[SummaryRow]:
    """Summary rows from mean errors: ``shifted[domain][source|target]`` and ``clean[stats]``."""
    gains = {n: v["source"] - v["target"] for n, v in shifted.items()}
    helped = [n for n, d in gains.items() if d >= MIN_GAIN_PT]
    paper_domains = ("contrast", "gaussian_noise")
    rows = [
        SummaryRow(
            "Sec. 5: target-domain population stats beat training-domain stats on shifted "
            "domains (contrast, noise)",
            ", ".join(f"{n.replace('_', ' ')} {shifted[n]['source']:.1f} -> "
                      f"{shifted[n]['target']:.1f}"
                      for n in paper_domains),
            "contrast 40.8 -> 33.1, noise 64.4 -> 52.5",
            verdict(f"err(source) - err(target) >= {MIN_GAIN_PT} pt for contrast and noise",
                    all(gains[n] >= MIN_GAIN_PT for n in paper_domains),
                    ", ".join(f"{n} {gains[n]:+.1f}" for n in paper_domains))),
        SummaryRow(
            f"Sec. 5: recomputed statistics help on most corruption families (severity "
            f"{SEVERITY})",
            f"{len(helped)} of {len(gains)} families improve by >= {MIN_GAIN_PT} pt",
            "3 of 3 (contrast, noise, jpeg)",
            verdict("a majority of the families improve", 2 * len(helped) > len(gains),
                    ", ".join(f"{n} {d:+.1f}" for n, d in gains.items()))),
    ]
    aug, unaug, con = clean[TRAIN_STATS], clean[CLEAN_STATS], clean["contrast"]
    rows.append(SummaryRow(
        "Sec. 5: on clean data, un-augmented stats ~ train-augmented stats; contrast-domain "
        "stats are much worse",
        f"{aug:.1f} / {unaug:.1f} / {con:.1f}", "23.4 / 23.8 / 39.7",
        verdict("|err(un-aug) - err(train-aug)| <= 1 pt and err(contrast stats) - "
                "err(train-aug) >= 3 pt", abs(unaug - aug) <= 1.0 and con - aug >= 3.0,
                f"{unaug - aug:+.1f} / {con - aug:+.1f} pt")))
    return rows


def _plot(ctx: RunContext, shifted: dict[str, dict[str, float]]) -> list[str]:
    plt = pyplot()
    names = list(shifted)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = torch.arange(len(names)).float()
    ax.bar(xs - 0.2, [shifted[n]["source"] for n in names], 0.4, label="training-domain stats")
    ax.bar(xs + 0.2, [shifted[n]["target"] for n in names], 0.4, label="target-domain stats")
    ax.set_xticks(xs.tolist(), [n.replace("_", " ") for n in names])
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"Corrupted test domains (severity {SEVERITY})")
    ax.legend()
    return [save_plot(ctx, fig, "domain_shift.png")]


@register_study("domain-shift", "Sec. 5, Table 4: population statistics re-estimated on each "
                                "corrupted test domain vs the training domain's")
def run(ctx: RunContext) -> StudyResult:
    data = ctx.dataset()
    scale = scale_for(ctx, quick_epochs=8, full_epochs=30)
    runs = []
    seeds = list(ctx.seeds)
    for seed in ctx.progress(seeds, desc="domain-shift runs", total=len(seeds), leave=True):
        key = {"study": "domain-shift", "v": 1, "data": ctx.data_spec, "seed": seed,
               "severity": SEVERITY, "sgd_batch": SGD_BATCH, "lr": LR,
               "scale": scale.as_dict()}
        runs.append(ctx.cache.get_or_run(
            key, lambda s=seed: run_seed(ctx, data, scale, s)))
    names = list(CORRUPTIONS)
    shifted = {n: {k: mean_std([r["shifted"][n][k] for r in runs])[0]
                   for k in ("source", "target")} for n in names}
    clean = {k: mean_std([r["clean"][k] for r in runs])[0] for k in runs[0]["clean"]}
    numbers = {"per_seed": runs, "shifted": shifted, "clean": clean, "severity": SEVERITY,
               "scale": scale.as_dict()}
    ours = Table(
        f"validation error (%), corruptions at severity {SEVERITY}",
        ["test domain", "stats from the training domain", "stats from the test domain"],
        [[n.replace("_", " "), fmt([r["shifted"][n]["source"] for r in runs]),
          fmt([r["shifted"][n]["target"] for r in runs])] for n in names])
    ours_clean = Table(
        "clean validation error (%) with statistics from ...",
        ["statistics from", "error"],
        [[k, fmt([r["clean"][k] for r in runs])] for k in runs[0]["clean"]])
    theirs = Table("Table 4 (ResNet-50, ImageNet-C; error %)",
                   ["test domain", "stats from ImageNet", "stats from the test domain"],
                   [[n, a, b] for n, (a, b) in paper.TABLE4.items()])
    theirs_clean = Table("Clean ImageNet val (error %) with statistics from ...",
                         ["statistics from", "error"],
                         [[k, v] for k, v in paper.TABLE4_CLEAN.items()])
    setup = (
        f"{data.name}: {scale.num_train} training samples (augmented: shift <= {MAX_SHIFT}, "
        f"gain 0.8-1.2), ResNet widths {list(scale.widths)}, {scale.epochs} epochs, SGD batch "
        f"{SGD_BATCH} ({scale.epochs * (scale.num_train // SGD_BATCH)} steps: one training run "
        f"per seed, the cheapest of the studies), lr {LR}. The {scale.num_val} validation "
        f"samples are split in two halves: "
        f"statistics of a domain are recomputed (PreciseBN, batches of {STATS_BATCH}) on the "
        f"first half, errors are measured on the second. Corruptions: "
        f"{', '.join(names)} at severity {SEVERITY}. Seeds: {list(ctx.seeds)}."
    )
    notes = (
        "Our 'jpeg' analog is uniform quantization. Corruptions that only rescale or shift a "
        "whole sample (contrast, brightness) are exactly the shifts that BatchNorm statistics "
        "can undo; blur and quantization change the shape of the signal, which new statistics "
        "can only partly compensate."
    )
    return StudyResult(setup=setup, tables=[ours, ours_clean], paper_tables=[theirs, theirs_clean],
                       plots=_plot(ctx, shifted),
                       summary=verdicts(shifted, clean), numbers=numbers, notes=notes)
