"""Study ``leakage`` (Sec. 6, Tables 3 and 6): information leaks through per-device statistics.

The task is :mod:`.roi`: images with a few objects, many correlated RoIs per image, a fixed
foreground fraction. A small detector runs a convolutional backbone over each image, crops the
RoIs from its feature map and classifies each crop with a head ``fc-norm-ReLU-fc-norm-ReLU-fc``
whose norm is the subject. A training step holds ``images_per_step`` images spread over devices
of ``images_per_device`` images each; the RoIs of a device are contiguous rows of the step's RoI
batch, so:

- per-device BN  = :class:`~rethinkbn.layers.GhostBatchNorm` with ``norm_batch_size`` = the RoIs
  of one device (``images_per_device * rois_per_image``), contiguous groups;
- + shuffle      = that head inside :class:`~rethinkbn.distributed.ShuffledModule` over
  ``images_per_step / images_per_device`` virtual devices (training only, Fig. 9);
- SyncBN         = BatchNorm over all RoIs of the step (GhostBatchNorm without groups; on real
  ranks :class:`~rethinkbn.distributed.SyncBatchNorm`);
- no norm, GroupNorm.

Population statistics come from :func:`~rethinkbn.population.precise_bn` over training steps
normalized as in training. Evaluation is one test image at a time: with population statistics
(eval mode; every RoI is independent then) and with that image's own mini-batch statistics
(:func:`~rethinkbn.population.batch_stats_inference` with ``norm_batch_size = rois_per_image``,
i.e. groups of one image's RoIs). The metric is the RoI classification error (%), 11 classes.

With ``ranks=2`` the per-device, shuffle and SyncBN variants are trained by
:mod:`.leakage_worker` on two real gloo processes (``torchrun``), each holding half of every
step's devices: the same step as the virtual one, with the real shuffle (``all_to_all``) and the
real SyncBatchNorm. The trained weights come back and are evaluated here, beside the virtual run.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rethinkbn.distributed import ShuffledModule, SyncBatchNorm
from rethinkbn.layers import GhostBatchNorm, is_batchnorm
from rethinkbn.population import batch_stats_inference, precise_bn

from ..contract import paper
from ..contract.base import RunContext, StudyResult, SummaryRow, Table, Task, register_study
from ..contract.verdicts import (
    Interval,
    all_hold,
    equivalent,
    exceeds,
    paired_bootstrap,
    stays_below,
)
from ..infra.cache import load_result
from ..infra.processes import run_command
from ..toolkit.common import fmt, over_seeds, pyplot, save_plot
from ..toolkit.roi import (
    BACKGROUND,
    RoiBatch,
    RoiImages,
    RoiTaskConfig,
    crop,
    make_images,
    sample_rois,
)
from ..toolkit.train import TrainConfig, sgd

__all__ = [
    "RANK_VARIANTS",
    "VARIANTS",
    "LeakageScale",
    "RoiNet",
    "Variant",
    "build_model",
    "check_context",
    "check_ranks",
    "evaluate",
    "recompute_roi_population",
    "run",
    "run_variant",
    "step_batches",
    "train_model",
    "train_on_ranks",
    "verdicts",
]


@dataclass(frozen=True)
class Variant:
    """A head normalization: ``norm`` in {"per-device", "sync", "none", "group"}."""

    label: str
    norm: str
    images_per_device: int | None = None
    shuffle: bool = False


VARIANTS: dict[str, Variant] = {
    "bn-1img": Variant("per-device BN", "per-device", 1),
    "bn-2img": Variant("per-device BN", "per-device", 2),
    "bn-shuffle-1img": Variant("per-device BN + shuffle", "per-device", 1, True),
    "bn-shuffle-2img": Variant("per-device BN + shuffle", "per-device", 2, True),
    "syncbn": Variant("SyncBN", "sync"),
    "no-norm": Variant("no norm", "none"),
    "groupnorm": Variant("GroupNorm", "group"),
}
# The variants whose normalization depends on devices: run on real ranks with ``ranks=2``.
RANK_VARIANTS = ("bn-1img", "bn-2img", "bn-shuffle-1img", "syncbn")


@dataclass(frozen=True)
class LeakageScale:
    """How big the study runs (every field goes into the run cache's key)."""

    num_train_images: int
    num_test_images: int
    epochs: int
    images_per_step: int = 8
    lr: float = 0.05
    weight_decay: float = 1e-4
    hidden: int = 64
    precise_batches: int = 100
    task: RoiTaskConfig = field(default_factory=RoiTaskConfig)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"]["gain_range"] = list(self.task.gain_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeakageScale:
        task = dict(d["task"])
        task["gain_range"] = tuple(task["gain_range"])
        return cls(**{**d, "task": RoiTaskConfig(**task)})


def scale_for(ctx: RunContext) -> LeakageScale:
    """Tiny (tests): a few steps; quick: 1024 images x 4 epochs; full: 2048 images x 8 epochs."""
    if ctx.tiny:
        return LeakageScale(num_train_images=32, num_test_images=16, epochs=1, precise_batches=4)
    if ctx.quick:
        return LeakageScale(num_train_images=1024, num_test_images=400, epochs=4)
    return LeakageScale(num_train_images=2048, num_test_images=1000, epochs=8, precise_batches=200)


# ----------------------------------------------------------------------------- the model
class RoiNet(nn.Module):
    """Backbone over whole images, RoI crops of its feature map, a normalized head per RoI.

    The backbone has no normalization: what is studied is the head's batch (the paper's
    detectors keep the backbone's BN frozen, so nothing of one image leaks there).
    ``forward(images (N, 1, L), rois)`` returns logits ``(R, 11)``, one row per RoI.
    """

    def __init__(self, head: nn.Module, window: int, hidden: int, channels: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 5, padding=4, dilation=2),
            nn.ReLU(),
        )
        self.window = window
        self.head = head
        self.classifier = nn.Linear(hidden, BACKGROUND + 1)

    def forward(self, images: Tensor, rois: RoiBatch) -> Tensor:
        crops = crop(self.backbone(images), rois, self.window).flatten(1)
        return self.classifier(self.head(crops))


def _norm(variant: Variant, hidden: int, rois_per_device: int | None, distributed: bool
          ) -> nn.Module:
    if variant.norm == "per-device":
        return GhostBatchNorm(hidden, norm_batch_size=rois_per_device, grouping="contiguous")
    if variant.norm == "sync":
        # Virtual devices: one process holds the whole step, so BN over the batch is SyncBN.
        return SyncBatchNorm(hidden) if distributed else GhostBatchNorm(hidden)
    if variant.norm == "group":
        return nn.GroupNorm(8, hidden)
    if variant.norm == "none":
        return nn.Identity()
    raise ValueError(f"leakage: unknown head norm {variant.norm!r}")


def build_model(variant: Variant, scale: LeakageScale, seed: int, *, distributed: bool = False
                ) -> RoiNet:
    """A freshly initialized detector for ``variant`` (initialization fixed by ``seed``).

    ``distributed=True`` builds the real-rank form (SyncBatchNorm, shuffle across ranks); its
    parameters, buffers and state-dict keys equal the virtual form's.
    """
    task, hidden = scale.task, scale.hidden
    if variant.images_per_device is not None and scale.images_per_step % \
            variant.images_per_device:
        raise ValueError(
            f"leakage: {scale.images_per_step} images per step do not split into devices of "
            f"{variant.images_per_device} images"
        )
    per_device = rois_per_device(variant, scale)
    torch.manual_seed(seed)
    head: nn.Module = nn.Sequential(
        nn.Linear(task.window * 16, hidden),
        _norm(variant, hidden, per_device, distributed),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        _norm(variant, hidden, per_device, distributed),
        nn.ReLU(),
    )
    if variant.shuffle:
        assert variant.images_per_device is not None
        devices = scale.images_per_step // variant.images_per_device
        head = ShuffledModule(head, seed=seed, num_devices=None if distributed else devices)
    return RoiNet(head, task.window, hidden)


# ----------------------------------------------------------------------------- data and training
def task_images(scale: LeakageScale, seed: int) -> tuple[RoiImages, RoiImages, RoiBatch]:
    """Training images, test images and the test RoIs of ``seed`` (deterministic)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    train = make_images(scale.num_train_images, scale.task, g)
    test = make_images(scale.num_test_images, scale.task, g)
    test_rois = sample_rois(test, scale.task, torch.Generator().manual_seed(20_000 + seed))
    return train, test, test_rois


def _subset(images: RoiImages, index: Tensor) -> RoiImages:
    return RoiImages(images.images[index], images.starts[index], images.labels[index])


def _local(images: RoiImages, rois: RoiBatch, rank: int, world: int
           ) -> tuple[RoiImages, RoiBatch]:
    """The share of rank ``rank``: a contiguous block of the step's images and their RoIs."""
    n = len(images)
    lo, hi = rank * n // world, (rank + 1) * n // world
    keep = (rois.image >= lo) & (rois.image < hi)
    local_rois = RoiBatch(rois.image[keep] - lo, rois.starts[keep], rois.labels[keep])
    return _subset(images, torch.arange(lo, hi)), local_rois


def step_batches(images: RoiImages, scale: LeakageScale, seed: int, epoch: int,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, RoiBatch]]:
    """The steps of one epoch as ``(images, rois)``: a seeded order of the images, fresh RoIs.

    Every rank draws the whole step (same seed) and keeps its share, so ``world`` ranks together
    see exactly the step that one process sees.
    """
    g = torch.Generator().manual_seed(seed * 1_000 + epoch)
    order = torch.randperm(len(images), generator=g)
    k = scale.images_per_step
    for i in range(len(images) // k):
        step = _subset(images, order[i * k:(i + 1) * k])
        rois = sample_rois(step, scale.task, g)
        if world > 1:
            step, rois = _local(step, rois, rank, world)
        yield step.images, rois


def train_model(model: RoiNet, images: RoiImages, scale: LeakageScale, seed: int,
                rank: int = 0, world: int = 1, progress: Any = None) -> float:
    """SGD (momentum 0.9, cosine learning rate) on RoI cross-entropy; returns the last loss.

    With ``world > 1`` (inside an initialized process group) each rank trains on its share of
    every step and the gradients are averaged across ranks (equal shares, so the average is the
    gradient of the whole step's mean loss).
    """
    config = TrainConfig(epochs=scale.epochs, batch_size=scale.images_per_step, lr=scale.lr,
                         weight_decay=scale.weight_decay)
    return sgd(model, config, lambda epoch: step_batches(images, scale, seed, epoch, rank, world),
               lambda m, batch: F.cross_entropy(m(*batch), batch[1].labels),
               steps_per_epoch=len(images) // scale.images_per_step,
               after_backward=_average_gradients if world > 1 else None, progress=progress,
               desc="epochs")


def _average_gradients(model: nn.Module) -> None:
    """Each rank's gradient becomes the mean over ranks (equal shares: the whole step's)."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def has_batchnorm(variant: Variant) -> bool:
    """Whether the variant's head normalizes with batch statistics (so has mu_B to evaluate)."""
    return variant.norm in ("per-device", "sync")


def rois_per_device(variant: Variant, scale: LeakageScale) -> int | None:
    """The RoIs one device normalizes together (None: the whole step, i.e. SyncBN or no BN)."""
    if variant.images_per_device is None:
        return None
    return variant.images_per_device * scale.task.rois_per_image


def recompute_roi_population(model: RoiNet, variant: Variant, images: RoiImages,
                             scale: LeakageScale, seed: int, rank: int = 0,
                             world: int = 1) -> None:
    """PreciseBN over ``precise_batches`` training steps, normalized exactly as in training.

    Per-device BN normalizes each device's RoIs alone during the pass too
    (``pass_norm_batch_size`` = the RoIs of one device, :func:`rois_per_device`), so every
    layer's inputs are those it saw in training. The model is put in train mode with
    ``keep_modes=True`` so that the shuffle (a training-only module) also runs during the pass.
    Across ranks, precise_bn pools every rank's moments; it normalizes each rank's share alone,
    which is training's normalization for per-device BN but not for SyncBN (so
    :func:`train_on_ranks` estimates the SyncBN variant's statistics in one process).
    Side effects: the BN layers' running statistics are replaced; the model is left in eval mode.
    """
    # Only the steps used are drawn (the first steps of the epoch's seeded stream).
    batches = list(islice(step_batches(images, scale, seed + 7, 0, rank, world),
                          scale.precise_batches))
    model.train()
    try:
        precise_bn(model, batches, num_batches=len(batches), forward=lambda m, b: m(*b),
                   keep_modes=True, progress=False,
                   pass_norm_batch_size=rois_per_device(variant, scale))
    finally:
        model.eval()


@torch.no_grad()
def evaluate(model: RoiNet, test: RoiImages, rois: RoiBatch, scale: LeakageScale
             ) -> dict[str, Any]:
    """RoI error (%) with population statistics (``pop``) and with each test image's own
    statistics (``mu_B``), and which RoIs each got wrong (``pop_wrong``, ``mu_B_wrong``: bool
    per RoI, for the paired tests of :func:`verdicts`)."""
    model.eval()
    wrong = {"pop": model(test.images, rois).argmax(1) != rois.labels}
    wrong["mu_B"] = wrong["pop"]
    if any(is_batchnorm(m) for m in model.modules()):
        # RoIs are contiguous per image: groups of rois_per_image are one image each.
        with batch_stats_inference(model, norm_batch_size=scale.task.rois_per_image):
            wrong["mu_B"] = model(test.images, rois).argmax(1) != rois.labels
    out: dict[str, Any] = {k: 100.0 * float(w.float().mean()) for k, w in wrong.items()}
    out.update({f"{k}_wrong": w for k, w in wrong.items()})
    return out


def run_variant(name: str, scale: LeakageScale, seed: int, progress: Any = None
                ) -> dict[str, Any]:
    """Train, estimate population statistics and evaluate one variant on virtual devices."""
    variant = VARIANTS[name]
    train, test, test_rois = task_images(scale, seed)
    model = build_model(variant, scale, seed)
    loss = train_model(model, train, scale, seed, progress=progress)
    if has_batchnorm(variant):
        recompute_roi_population(model, variant, train, scale, seed)
    return {**evaluate(model, test, test_rois, scale), "train_loss": loss}


def _variant_task(ctx: RunContext, name: str, scale: LeakageScale, seed: int
                  ) -> dict[str, Any]:
    """:func:`run_variant` as a task of ``ctx.run_all``."""
    return run_variant(name, scale, seed, ctx.progress)


# ----------------------------------------------------------------------------- real ranks
def check_ranks(scale: LeakageScale, ranks: int, names: tuple[str, ...] = RANK_VARIANTS) -> None:
    """Raise ``ValueError`` unless every rank can hold whole devices of every variant ``names``.

    Each rank holds ``images_per_step / ranks`` images of a step, which must be a whole number
    of devices of each variant (1 or 2 images per device in :data:`RANK_VARIANTS`).
    """
    widest = max(VARIANTS[n].images_per_device or 1 for n in names)
    if ranks < 1 or scale.images_per_step % (ranks * widest):
        allowed = [r for r in range(1, scale.images_per_step + 1)
                   if scale.images_per_step % (r * widest) == 0]
        raise ValueError(
            f"--ranks {ranks} does not split the leakage study's step of "
            f"{scale.images_per_step} images into whole devices of {widest} images per rank; "
            f"expected one of {allowed}"
        )


def train_on_ranks(name: str, scale: LeakageScale, seed: int, ranks: int = 2,
                   timeout_s: float = 600.0) -> dict[str, Any]:
    """Train ``name`` on ``ranks`` real gloo processes (torchrun) and evaluate it here.

    Runs ``python -m torch.distributed.run --standalone --nproc_per_node=ranks`` on
    :mod:`rethinkbn_studies.studies.leakage_worker`, which trains with the real shuffle /
    SyncBatchNorm, runs precise_bn across ranks and saves rank 0's state dict; this process loads
    it into the virtual-device model and evaluates it like :func:`run_variant`. Raises
    ``RuntimeError`` with the workers' output if torchrun fails or runs past ``timeout_s`` (its
    workers are killed with it), and ``ValueError`` (:func:`check_ranks`) unless every rank holds
    whole devices.
    """
    variant = VARIANTS[name]
    check_ranks(scale, ranks, (name,))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", "-m", "rethinkbn_studies.studies.leakage_worker",
            "--variant", name, "--seed", str(seed), "--scale", json.dumps(scale.as_dict()),
            "--out", str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            done = run_command(cmd, timeout_s, env=env)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"leakage: torchrun for {name!r} ran past {timeout_s} s") from err
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"leakage: torchrun for {name!r} failed (exit {done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        try:  # the workers' file is read like a cache entry: nothing in it can run code
            saved, _ = load_result(out)
        except (ValueError, OSError) as err:
            raise RuntimeError(f"leakage: torchrun for {name!r} wrote {out}, which cannot be "
                               f"read ({type(err).__name__}: {err})") from err
    train, test, test_rois = task_images(scale, seed)
    model = build_model(variant, scale, seed)
    model.load_state_dict(saved["state_dict"])
    if variant.norm == "sync":
        # precise_bn normalizes each rank's share alone in its pass, whereas SyncBN normalized
        # the whole step in training: estimate its statistics here, on whole steps.
        recompute_roi_population(model, variant, train, scale, seed)
    return {**evaluate(model, test, test_rois, scale), "train_loss": saved["train_loss"]}


# ----------------------------------------------------------------------------- the study
def _m(numbers: dict[str, Any], name: str, key: str) -> float:
    return float(numbers["mean"][name][key])


EQUIV_PT = 2.0  # equivalence margin (error points) for "about equal" claims
NONINFERIOR_PT = 1.0  # "at least as good": worse by less than this many points
# The ablation: the 1-image-per-device model on tasks with one source of correlation removed.
ABLATIONS: dict[str, dict[str, Any]] = {
    "co-occurrence only": {"gain_range": (1.0, 1.0), "offset_std": 0.0},
    "illumination only": {"same_class_prob": 0.0},
}
ABLATION_VARIANT = "bn-1img"

Wrong = dict[str, dict[str, Any]]  # wrong[variant][pop | mu_B]: (seeds, RoIs) 0/1 errors


def per_image(wrong: Wrong, rois_per_image: int) -> Wrong:
    """Per-RoI 0/1 errors ``(seeds, RoIs)`` -> each test image's error fraction ``(seeds,
    images)``: the RoIs of one image are correlated (the subject of the study), so the
    bootstrap draws images, not RoIs (and no McNemar test, which would take RoIs as independent
    pairs)."""
    return {g: {k: np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1, rois_per_image)
                .mean(-1) for k, a in d.items()} for g, d in wrong.items()}


def _diff(wrong: Wrong, a: tuple[str, str], b: tuple[str, str]) -> Interval:
    """``err(a) - err(b)`` in points, paired over the same test RoIs and seeds."""
    return paired_bootstrap(wrong[a[0]][a[1]], wrong[b[0]][b[1]])


def ablation_scale(scale: LeakageScale, name: str) -> LeakageScale:
    """``scale`` with the task of the ablation ``name`` (:data:`ABLATIONS`)."""
    return replace(scale, task=replace(scale.task, **ABLATIONS[name]))


def split_wrong(per_seed: dict[str, list[dict[str, Any]]]
                ) -> tuple[Wrong, dict[str, list[dict[str, Any]]]]:
    """``(wrong, numbers)``: the per-RoI errors ``wrong[group][key]`` as ``(seeds, RoIs)``
    arrays, and the runs without them (plain JSON numbers)."""
    wrong = {g: {k.removesuffix("_wrong"): np.stack([np.asarray(r[k], dtype=bool) for r in rs])
                 for k in rs[0] if k.endswith("_wrong")} for g, rs in per_seed.items()}
    plain = {g: [{k: v for k, v in r.items() if not k.endswith("_wrong")} for r in rs]
             for g, rs in per_seed.items()}
    return wrong, plain


def ablation_note(wrong: Wrong, ablation: Wrong) -> str:
    """What the ablation says, from its numbers: which source of correlation carries the gap
    err(pop) - err(mu_B) of the 1-image-per-device model (a gap whose interval excludes 0)."""
    gaps = {"both": _diff(wrong, (ABLATION_VARIANT, "pop"), (ABLATION_VARIANT, "mu_B"))}
    gaps.update({a: _diff(ablation, (a, "pop"), (a, "mu_B")) for a in ablation})
    shown = "; ".join(f"{a}: {i.text()}" for a, i in gaps.items())
    carriers = [a for a in ablation if gaps[a].low > 0]
    said = (f"a gap beyond its uncertainty remains with {' and with '.join(carriers)}"
            if carriers else "no ablated task keeps a gap beyond its uncertainty")
    return (f"The leak has two possible sources in this task: per-image illumination (gain/"
            f"offset) and label co-occurrence. Gap err(pop) - err(mu_B) of the 1-image model: "
            f"{shown}; {said}.")


def verdicts(wrong: Wrong, ablation: Wrong | None = None,
             ranks: tuple[int, Wrong] | None = None) -> list[SummaryRow]:
    """The summary rows, computed from errors ``wrong[variant][pop | mu_B]`` of shape
    ``(seeds, images)`` (each test image's error fraction over its RoIs, :func:`per_image`) on
    the same test images for every variant; ``ablation[task][pop | mu_B]``
    for :data:`ABLATION_VARIANT` on the ablated tasks; ``ranks = (world, wrong)`` of the
    variants trained on real ranks. Every effect is a paired bootstrap over test images and
    seeds."""
    def err(name: str, key: str = "pop") -> float:
        return 100.0 * float(np.mean(wrong[name][key]))

    rows = []
    one, two = ("bn-1img", "pop"), ("bn-1img", "mu_B")
    leak = _diff(wrong, one, two)
    rows.append(SummaryRow(
        "Sec. 6: per-device BN, 1 image/device: population stats worse than the image's "
        "own mu_B (the leak)",
        f"RoI err {err('bn-1img'):.1f} (pop) vs {err('bn-1img', 'mu_B'):.1f} (mu_B)",
        "AP 30.7 (pop) vs 41.5 (mu_B)",
        exceeds("err(pop) - err(mu_B) > 0", leak, 0.0)))
    gap = {n: np.asarray(wrong[n]["pop"], float) - np.asarray(wrong[n]["mu_B"], float)
           for n in ("bn-1img", "bn-2img")}
    less = paired_bootstrap(gap["bn-1img"], gap["bn-2img"])
    rows.append(SummaryRow(
        "Sec. 6: 2 images/device leak less than 1 image/device",
        f"pop - mu_B gap {100 * gap['bn-2img'].mean():+.1f} (2 img) vs "
        f"{100 * gap['bn-1img'].mean():+.1f} (1 img)",
        "gap -1.2 AP (2 img) vs -10.8 AP (1 img)",
        exceeds("gap(1 img) - gap(2 img) > 0, gap = err(pop) - err(mu_B)", less, 0.0)))
    shuf, sync, no_shuf = ("bn-shuffle-1img", "pop"), ("syncbn", "pop"), ("bn-1img", "pop")
    rows.append(SummaryRow(
        "Sec. 6: shuffle removes the leak: 1 image/device + shuffle beats no shuffle",
        f"RoI err {err('bn-shuffle-1img'):.1f} (shuffle) vs {err('bn-1img'):.1f} (no shuffle)",
        "AP 41.7 vs 30.7",
        exceeds("err(no shuffle) - err(shuffle) > 0", _diff(wrong, no_shuf, shuf), 0.0)))
    rows.append(SummaryRow(
        "Sec. 6: 1 image/device + shuffle ~ SyncBN",
        f"RoI err {err('bn-shuffle-1img'):.1f} (shuffle) vs {err('syncbn'):.1f} (SyncBN)",
        "AP 41.7 vs 41.7",
        equivalent(f"|err(shuffle) - err(SyncBN)| <= {EQUIV_PT} pt (equivalence margin)",
                   _diff(wrong, shuf, sync), EQUIV_PT)))
    alt = min(("no-norm", "groupnorm"), key=err)
    rows.append(SummaryRow(
        "Sec. 6: SyncBN in the head is at least as good as no norm and GroupNorm",
        f"RoI err {err('syncbn'):.1f} (SyncBN) vs {err('no-norm'):.1f} (no norm) vs "
        f"{err('groupnorm'):.1f} (GN)", "AP 41.7 vs 41.1 vs 41.4",
        stays_below(f"err(SyncBN) - err(best of no norm, GN = {alt}) < {NONINFERIOR_PT} pt "
                    "(non-inferiority margin)", _diff(wrong, sync, (alt, "pop")),
                    NONINFERIOR_PT)))
    if ablation is not None:
        co = "co-occurrence only"
        rows.append(SummaryRow(
            "Sec. 6 mechanism: the leak is label co-occurrence (no per-image gain/offset in "
            "the task), 1 image/device",
            f"RoI err {100 * np.mean(ablation[co]['pop']):.1f} (pop) vs "
            f"{100 * np.mean(ablation[co]['mu_B']):.1f} (mu_B)",
            "- (the paper's explanation, Sec. 6)",
            exceeds("err(pop) - err(mu_B) > 0 without the illumination nuisance",
                    _diff(ablation, (co, "pop"), (co, "mu_B")), 0.0)))
    if ranks is not None:
        world, real = ranks
        parts = [equivalent(f"{n} {k}", paired_bootstrap(real[n][k], wrong[n][k]), EQUIV_PT)
                 for n in real for k in ("pop", "mu_B")]
        rows.append(SummaryRow(
            f"{world} real gloo ranks (torchrun) reproduce the virtual devices (per-device BN, "
            "shuffle, SyncBN)",
            "largest |difference| " + f"{max(abs(p.effect or 0.0) for p in parts):.1f} pt",
            "- (our check, not a paper claim)",
            all_hold(f"every variant's err(real) - err(virtual) (pop and mu_B) within "
                     f"+-{EQUIV_PT} pt (equivalence margin)", parts)))
    return rows


def _plot(ctx: RunContext, numbers: dict[str, Any]) -> list[str]:
    plt = pyplot()
    names = list(VARIANTS)
    pop = [_m(numbers, n, "pop") for n in names]
    # Without BN in the head there are no statistics to take from the test image: no bar.
    mub = [_m(numbers, n, "mu_B") if has_batchnorm(VARIANTS[n]) else float("nan")
           for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = torch.arange(len(names)).float()
    ax.bar(xs - 0.2, pop, 0.4, label="population statistics")
    ax.bar(xs + 0.2, mub, 0.4, label="mini-batch statistics of the test image (mu_B)")
    ticks = []
    for n in names:
        v = VARIANTS[n]
        ipd = f"\n{v.images_per_device} img/device" if v.images_per_device else ""
        ticks.append(v.label.replace(" + ", "\n+ ") + ipd)
    ax.set_xticks(xs.tolist(), ticks, fontsize=7)
    ax.set_ylabel("RoI error (%), lower is better")
    ax.set_title("Information leakage: head normalization in training vs statistics at test")
    ax.set_ylim(0, 1.3 * max(pop + [m for m in mub if m == m]))  # room for the legend
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    return [save_plot(ctx, fig, "leakage.png")]


def _describe(name: str) -> str:
    """``"per-device BN + shuffle, 1 img/device"`` for the variant ``name``."""
    v = VARIANTS[name]
    return v.label + (f", {v.images_per_device} img/device" if v.images_per_device else "")


def _mode_line(ranks: int) -> str:
    """Which device mode ran (``--ranks``), for the setup paragraph."""
    if ranks == 1:
        return ("**Mode: virtual devices only** (one process; `--ranks 2` also trains the "
                "per-device, shuffle and SyncBN variants on real gloo processes).")
    return (f"**Mode: virtual devices and {ranks} real gloo ranks** (torchrun): "
            f"{'; '.join(_describe(n) for n in RANK_VARIANTS)} also trained on {ranks} "
            "processes, each holding "
            f"1/{ranks} of every step, with the real shuffle (all_to_all) and SyncBatchNorm; "
            "the rows above are the virtual devices, the comparison table below the real ranks.")


def check_context(ctx: RunContext) -> None:
    """``--ranks`` must split every step into whole devices (:func:`check_ranks`)."""
    check_ranks(scale_for(ctx), ctx.ranks)


@dataclass(frozen=True)
class LeakageRuns:
    """Everything the study measured: per variant (and per ablation of ``ABLATION_VARIANT``)
    its errors per seed (``"pop"``, ``"mu_B"``, ...), and the per-test-image 0/1 errors that
    the verdicts judge (:func:`per_image`); with ``ranks > 1`` the same for the variants of
    ``RANK_VARIANTS`` trained on real gloo ranks."""

    scale: LeakageScale
    per_seed: dict[str, list[dict[str, Any]]]
    ablated: dict[str, list[dict[str, Any]]]
    wrong: dict[str, Any]
    wrong_ablated: dict[str, Any]
    ranks: int = 1
    real: dict[str, list[dict[str, Any]]] | None = None
    real_wrong: dict[str, Any] | None = None

    def ranks_wrong(self) -> tuple[int, dict[str, Any]] | None:
        """``(ranks, real ranks' per-image errors)`` for :func:`verdicts`, None without ranks."""
        return None if self.real_wrong is None else (self.ranks, self.real_wrong)


def _base_key(scale: LeakageScale) -> dict[str, Any]:
    return {"study": "leakage", "v": 2, "scale": scale.as_dict()}


def measure(ctx: RunContext, scale: LeakageScale) -> LeakageRuns:
    """The variants and the ablation on virtual devices, in one ``run_all`` (so that the pool
    stays busy across both), cached."""
    jobs: list[tuple[str, str | None, int]] = [(n, None, s) for n in VARIANTS for s in ctx.seeds]
    jobs += [(ABLATION_VARIANT, a, s) for a in ABLATIONS for s in ctx.seeds]
    tasks = []
    for name, ablation, seed in jobs:
        s = scale if ablation is None else ablation_scale(scale, ablation)
        tasks.append(Task({**_base_key(scale), "scale": s.as_dict(), "variant": name,
                           "seed": seed}, _variant_task, (name, s, seed)))
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in VARIANTS}
    ablated: dict[str, list[dict[str, Any]]] = {a: [] for a in ABLATIONS}
    for (name, ablation, _), result in zip(jobs, ctx.run_all(tasks, desc="leakage runs"),
                                           strict=True):
        (per_seed[name] if ablation is None else ablated[ablation]).append(result)
    rpi = scale.task.rois_per_image
    wrong, per_seed = split_wrong(per_seed)
    wrong_ablated, ablated = split_wrong(ablated)
    return LeakageRuns(scale, per_seed, ablated, per_image(wrong, rpi),
                       per_image(wrong_ablated, rpi))


def measure_ranks(ctx: RunContext, runs: LeakageRuns) -> LeakageRuns:
    """``runs`` with the variants of ``RANK_VARIANTS`` also trained on ``ctx.ranks`` real
    gloo ranks (cached). One run after the other, not through ``run_all``: each run already
    keeps ``ranks`` processes (torchrun) busy."""
    scale, ranks = runs.scale, ctx.ranks
    real: dict[str, list[dict[str, Any]]] = {n: [] for n in RANK_VARIANTS}
    rank_jobs = [(n, s) for n in RANK_VARIANTS for s in ctx.seeds]
    for name, seed in ctx.progress(rank_jobs, desc=f"leakage runs on {ranks} ranks",
                                   total=len(rank_jobs), leave=True):
        real[name].append(ctx.cache.get_or_run(
            {**_base_key(scale), "variant": name, "seed": seed, "ranks": ranks},
            functools.partial(train_on_ranks, name, scale, seed, ranks)))
    real_wrong, real = split_wrong(real)
    return replace(runs, ranks=ranks, real=real,
                   real_wrong=per_image(real_wrong, scale.task.rois_per_image))


def summarize(runs: LeakageRuns) -> dict[str, Any]:
    """The study's numbers for results.json: per variant and ablation the errors per seed and
    their means (and standard deviations), and the real ranks' when trained."""
    keys = ("pop", "mu_B")
    mean, std = over_seeds(runs.per_seed, keys)
    numbers: dict[str, Any] = {"per_seed": runs.per_seed, "mean": mean, "std": std,
                               "ablation": {"per_seed": runs.ablated,
                                            "mean": over_seeds(runs.ablated, keys)[0]},
                               "scale": runs.scale.as_dict()}
    if runs.real is not None:
        numbers["ranks"] = {"world": runs.ranks, "per_seed": runs.real,
                            "mean": over_seeds(runs.real, keys)[0]}
    return numbers


def tables(runs: LeakageRuns) -> list[Table]:
    """Our tables: the variants, the ablation, and with real ranks their comparison with the
    virtual devices."""
    per_seed, ablated = runs.per_seed, runs.ablated
    rows = []
    for name, variant in VARIANTS.items():
        rs = per_seed[name]
        ipd = str(variant.images_per_device) if variant.images_per_device else "-"
        rows.append([variant.label, ipd, fmt([r["pop"] for r in rs]),
                     fmt([r["mu_B"] for r in rs]) if has_batchnorm(variant) else "-"])
    out = [Table("RoI classification error (%), one test image at a time",
                 ["head normalization", "images per device", "pop", "mu_B of 1 image"], rows)]
    out.append(Table(
        f"ablation, {_describe(ABLATION_VARIANT)}: RoI error (%) on tasks with one source of "
        "correlation between an image's RoIs removed; gap = pop - mu_B, paired bootstrap over "
        "test images and seeds",
        ["task", "pop", "mu_B of 1 image", "gap (pt), 95% CI"],
        [["both (the study's task)", fmt([r["pop"] for r in per_seed[ABLATION_VARIANT]]),
          fmt([r["mu_B"] for r in per_seed[ABLATION_VARIANT]]),
          _diff(runs.wrong, (ABLATION_VARIANT, "pop"), (ABLATION_VARIANT, "mu_B")).text()]]
        + [[a, fmt([r["pop"] for r in ablated[a]]), fmt([r["mu_B"] for r in ablated[a]]),
            _diff(runs.wrong_ablated, (a, "pop"), (a, "mu_B")).text()] for a in ABLATIONS]))
    if runs.real is not None:
        ranks, real = runs.ranks, runs.real
        out.append(Table(
            f"virtual devices vs {ranks} real gloo ranks (torchrun): RoI error (%); same seeds "
            "and steps, so only the order of floating-point reductions differs",
            ["variant", "pop, virtual", f"pop, {ranks} ranks", "mu_B, virtual",
             f"mu_B, {ranks} ranks"],
            [[_describe(n), *(fmt([r[k] for r in by[n]]) for k in ("pop", "mu_B")
                               for by in (per_seed, real))]
             for n in RANK_VARIANTS]))
    return out


def setup_text(ctx: RunContext, scale: LeakageScale) -> str:
    """The report's setup paragraph, with the mode (virtual devices, real ranks)."""
    t = scale.task
    return (
        f"A 1-D detection-like task ({t.image_length}-sample images, {t.objects_per_image} "
        f"MNIST-1D digits each, per-image gain/offset, objects of one image share a class with "
        f"p={t.same_class_prob}); {t.rois_per_image} RoIs per image of width {t.window}, "
        f"{t.num_foreground} foreground. {scale.num_train_images} training images, "
        f"{scale.epochs} epochs, {scale.images_per_step} images per step; the per-device "
        f"variants split a step into devices of 1 or 2 images (virtual devices). Population "
        f"statistics: PreciseBN over {scale.precise_batches} training steps. Test: "
        f"{scale.num_test_images} images, one at a time. Seeds: {list(ctx.seeds)}."
        + " " + _mode_line(ctx.ranks)
    )


PAPER_TABLE = Table("Tables 3 and 6 (Mask R-CNN, COCO; AP box / AP mask, higher is better)",
                    ["head normalization", "images per GPU", "inference stats", "AP box / mask"],
                    [[h, i, s, f"{a:.1f} / {b:.1f}"] for h, i, s, (a, b) in paper.TABLE6])


@register_study("leakage", "Sec. 6, Tables 3/6: per-device BN leaks through correlated RoIs; "
                           "shuffle and SyncBN fix it", check=check_context, uses_ranks=True)
def run(ctx: RunContext) -> StudyResult:
    """Stages: the virtual-device runs (:func:`measure`), with ``--ranks`` > 1 the real ranks
    (:func:`measure_ranks`), the numbers, tables, verdicts (:func:`verdicts`) and plots."""
    scale = scale_for(ctx)
    check_ranks(scale, ctx.ranks)  # before any training, not after the virtual runs
    runs = measure(ctx, scale)
    if ctx.ranks > 1:
        runs = measure_ranks(ctx, runs)
    numbers = summarize(runs)
    notes = "Lower is better here (RoI error); the paper reports AP (higher is better). " + \
        ablation_note(runs.wrong, runs.wrong_ablated)
    return StudyResult(setup=setup_text(ctx, scale), tables=tables(runs),
                       paper_tables=[PAPER_TABLE], plots=_plot(ctx, numbers),
                       summary=verdicts(runs.wrong, runs.wrong_ablated, runs.ranks_wrong()),
                       numbers=numbers, notes=notes)
