"""Sec. 4's NBS sweep where the models cannot memorize (full mode only): 16,384 MNIST-1D
training samples, 3 BasicBlocks per stage (issue 20, item 5).

The main sweep's models (1,000 samples, 1 block per stage) fit their training set (training
error with mini-batch statistics 2-4% at NBS 2 and 4, more than 10 pt below the validation
error: ``common.GHOST_EPOCHS``), a regime unlike the paper's ImageNet ResNet-50. This
arm trains on 16x the samples for a few passes over them, so that training and validation error
stay close, and asks the same questions there. Its configuration, fixed before any of its runs
(nothing tuned toward the paper):

- **Data**: the embedded MNIST-1D generator with the study's correlated-noise scale
  (``common.MNIST1D_CORR_NOISE``), :data:`LARGE_GENERATED` samples generated (the generator's
  80/20 split: :data:`LARGE_TRAIN` training, 4,096 validation samples), the first ``num_val``
  validation samples used, as many as the study's. A generation of its own, not the study's
  samples plus more: the generator draws class after class from one seed, so generations of
  different sizes share samples, and the study's validation samples could be in this training
  set.
- **Model**: the shared ResNet (the study's widths) with :data:`LARGE_BLOCKS` BasicBlocks per
  stage (21 BN layers, the depth of ``precise-batch``'s deep network), ghost BN with NBS in
  :data:`LARGE_NBS` (the sweep's smallest and largest, and 32 between them).
- **Recipe**: the shared models' (``common.ghost_model_task``: SGD batch 128, lr 0.2, cosine
  schedule, the same initialization and sample order per seed), for :data:`LARGE_EPOCHS` epochs
  (see there: chosen by cost alone).
- **Evaluation**: the main sweep's (``nbs._evaluate``): per NBS, validation error with
  population statistics (whole-batch PreciseBN over all training samples), with mu_B over
  groups of the training NBS and over ``nbs.LARGE_GROUP``-sample groups, training error with
  population statistics (the fit check) and with mu_B, and the between-sample share per layer
  (:func:`rethinkbn.population.variance_decomposition`).
- **Verdicts**: the main sweep's claims that need no FrozenBN runs (``nbs.sweep_verdicts``),
  with the same preconditions and margins (the fit check of "pop rises", the floor of "small NBS
  regularizes"). No FrozenBN pairs: their claims stay the main sweep's.
- **Seeds**: the report's (``--seeds``, 3 by default in full mode); the design asks for at least
  2, and the section says so when fewer ran.

With ``--tiny`` (the tests) the arm runs on the study's data and scale, with 3 blocks per stage.
It runs only on MNIST-1D data (another ``--data`` has no generator to draw more samples from).
"""

from __future__ import annotations

import dataclasses

from ..contract.base import RunContext, Task
from ..toolkit.common import GHOST_SGD_BATCH, Scale, ghost_model_task

__all__ = ["LARGE_BLOCKS", "LARGE_EPOCHS", "LARGE_GENERATED", "LARGE_NBS", "LARGE_TRAIN", "NAME",
           "large_context", "large_scale", "runs_in", "seeds_note", "setup_sentence",
           "training_tasks"]

LARGE_GENERATED = 20_480
LARGE_TRAIN = 16_384
LARGE_BLOCKS = 3
LARGE_NBS = (2, 32, GHOST_SGD_BATCH)
# The training length, chosen by cost alone before any run of the arm: 20 epochs = 2,560 steps
# (4.6x the sweep's 560 full-mode steps; each sample seen 20 times, against 80 in the sweep).
# Timing runs (seed 0, one epoch = 128 steps, one thread, CPU time on the 2-core machine the
# reports are made on, 2026-12-07, under load; nothing but their cost was used): 57 / 52 / 36 ms
# per step at NBS 2 / 32 / 128, and 6.5 s to evaluate a model (nbs._evaluate: PreciseBN over
# 16,384 samples, the mechanism pass, the mini-batch evaluations). The arm's 9 runs (3 NBS x 3
# seeds) thus cost about 20 x 128 x 0.145 s x 3 + 9 x 6.5 s = 1,170 s of CPU: about 10 minutes
# added to a cold full run at --jobs 2 (none to a warm one). One more run, after the choice:
# the arm's plumbing at full scale with 1 epoch, seed 0, --jobs 2 (not a result of the arm).
LARGE_EPOCHS = 20
# The seeds the design asks for at least.
MIN_SEEDS = 2
NAME = f"{LARGE_TRAIN} samples, {LARGE_BLOCKS} blocks per stage"


def runs_in(ctx: RunContext) -> bool:
    """Whether the arm runs: full mode on MNIST-1D data (``--tiny`` included)."""
    return not ctx.quick and ctx.data_spec.startswith("mnist1d")


def large_context(ctx: RunContext) -> RunContext:
    """The context the arm's runs see: ``ctx`` with ``--data mnist1d:``:data:`LARGE_GENERATED`
    (so that ``common.study_data`` and the cache keys name the arm's data); ``ctx`` itself with
    ``--tiny``. ``ctx.dataset`` is kept: the models take only their input and output shapes
    from it, the same for every MNIST-1D generation."""
    if ctx.tiny:
        return ctx
    return dataclasses.replace(ctx, data_spec=f"mnist1d:{LARGE_GENERATED}")


def large_scale(ctx: RunContext, shared: Scale) -> Scale:
    """The arm's scale: :data:`LARGE_TRAIN` training samples, the study's validation count and
    widths (``shared``: the main sweep's scale), :data:`LARGE_EPOCHS` epochs; ``shared`` itself
    with ``--tiny``."""
    if ctx.tiny:
        return shared
    return Scale(LARGE_TRAIN, shared.num_val, LARGE_EPOCHS, shared.widths)


def training_tasks(ctx: RunContext, scale: Scale) -> list[tuple[int, int, Task]]:
    """``(nbs, seed, task)`` of every training run of the arm (``ctx``: :func:`large_context`):
    the shared NBS model's run (:func:`ghost_model_task`) with :data:`LARGE_BLOCKS` blocks."""
    return [(n, s, ghost_model_task(ctx, scale, n, s, blocks=LARGE_BLOCKS))
            for n in LARGE_NBS for s in ctx.seeds]


def seeds_note(seeds: tuple[int, ...]) -> str:
    """The sentence that says the arm ran on fewer seeds than its design asks for (empty when
    it did not)."""
    if len(seeds) >= MIN_SEEDS:
        return ""
    return (f" Only {len(seeds)} seed ran: the arm's design asks for at least {MIN_SEEDS} "
            f"(`--seeds {MIN_SEEDS}` or more), so its intervals hold no seed-to-seed variation.")


def setup_sentence(ctx: RunContext, scale: Scale, bn_layers: int) -> str:
    """The setup paragraph's sentence on the arm (``ctx``: the study's context; ``scale``: the
    arm's; ``bn_layers``: its models' BN layers)."""
    steps = scale.epochs * (scale.num_train // GHOST_SGD_BATCH)
    data = ("the study's data (--tiny)" if ctx.tiny else
            f"MNIST-1D generated at {LARGE_GENERATED} samples with the same correlated noise "
            f"(a generation of its own, so that no validation sample of the study is among its "
            f"training samples)")
    return (f"**Large arm** ({NAME}): {data}, {scale.num_train} training / {scale.num_val} "
            f"validation samples; the same ResNet with {LARGE_BLOCKS} blocks per stage "
            f"({bn_layers} BN layers), trained with the same recipe for {scale.epochs} epochs "
            f"({steps} steps), NBS in {list(LARGE_NBS)}, evaluated as the sweep's models (no "
            f"FrozenBN runs); configuration fixed before its runs (module "
            f"`rethinkbn_studies.studies.nbs_large`). Seeds: {list(ctx.seeds)}."
            + seeds_note(ctx.seeds))
