"""`diagnose`: the paper's lessons about the "batch" in BatchNorm, measured on the user's model.

Wu & Johnson (2021) show that several independent choices hide in the batch of BatchNorm, each of
which can silently cost accuracy. :func:`diagnose` measures each of them, per BatchNorm layer and
for the model, and turns every number into a verdict with a stated threshold
(:class:`Thresholds`); no sentence of its report is typed in, each is derived from a number.

1. **EMA vs population** (Sec. 3): the running (EMA) statistics against exact population
   statistics of the current weights (``precise_bn``'s distances), and the metric with each.
2. **Normalization batch** (Sec. 4): the normalization batch size (NBS) of every layer in
   training, the values per channel it normalizes with, and the train/test inconsistency: each
   layer's normalized output in training behaviour against the same input normalized with
   population statistics, and the model's outputs and metric in both.
3. **Domain shift** (Sec. 5): the distance between the statistics of ``train_data`` and
   ``eval_data``, and the metric with training-domain vs recomputed statistics.
4. **Setup smells**: BatchNorm normalizing with batch statistics during evaluation, frozen
   statistics far from the data's, samples of one normalization batch that share a group id
   (Sec. 6), a layer called several times in one forward.

It uses only the public API (``precise_bn``, ``StatsBank``, ``capture_stats``/``install_stats``),
and ``precise_bn``'s own unwrapping of DDP and ``torch.compile`` wrappers (so that its layer names
are precise_bn's), and never changes the model.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_positive_int
from .distributed import PerDeviceBatchNorm, ShuffledModule
from .layers import DomainBatchNorm, FrozenBatchNorm, is_batchnorm
from .population import (
    PreciseBNReport,
    Snapshot,
    StatsBank,
    capture_stats,
    install_stats,
    precise_bn,
)
from .population._state import unwrap

__all__ = ["Diagnosis", "Finding", "LayerDiagnosis", "Thresholds", "diagnose"]

ForwardFn = Callable[[nn.Module, Any], Any]
MetricFn = Callable[[Any, Any], "float | Tensor"]
SEVERITIES = ("problem", "warning", "ok", "skipped")


@dataclass(frozen=True)
class Thresholds:
    """The thresholds the verdicts are computed with, and why.

    - ``shift`` / ``log_std``: a layer's statistics differ from a reference when the RMS over
      channels of ``(mu - mu_ref) / sigma_ref`` exceeds ``shift`` or that of
      ``log(sigma / sigma_ref)`` exceeds ``log_std``: 0.1 moves every normalized activation by a
      tenth of its spread, as much noise as the mean of 100 values per channel adds. Used for EMA
      vs population (1) and frozen statistics vs the data (4).
    - ``domain_shift``: the same two distances between the training and evaluation domains (3);
      larger, because a model's activations on held-out data of the same domain already differ
      a little from those on its training data.
    - ``min_values``: fewer values per channel in one normalization batch than this is a trap
      (2): with ``n`` values the batch mean is off by ``1/sqrt(n)`` sigma and the batch std by a
      relative ``1/sqrt(2(n-1))``: 0.18 sigma and 13% below 32 values.
    - ``train_test_gap``: a layer's normalized output in training behaviour differs from the same
      input normalized with population statistics by more than this RMS (in sigma) (2).
    - ``metric``: a change of the metric larger than this (absolute, in the metric's units)
      matters; a recommendation that would change the metric less is not made.
    - ``group_mixing``: samples of a normalization batch are correlated when its distinct group
      ids are fewer than this fraction of those of a random shuffle of the same samples (4).
    """

    shift: float = 0.1
    log_std: float = 0.1
    domain_shift: float = 0.25
    min_values: int = 32
    train_test_gap: float = 0.1
    metric: float = 0.01
    group_mixing: float = 0.75


@dataclass(frozen=True)
class Finding:
    """One verdict: ``check`` (what was measured), its ``severity`` (problem / warning / ok, or
    skipped: not testable, the message says why), the ``layer`` (qualified name; None for the
    model), the measured ``value`` against ``threshold``, a ``message`` derived from them and a
    ``recommendation``. A NaN or Inf measurement is a ``non-finite:<check>`` problem of its
    own, never an "ok"."""

    check: str
    severity: str
    layer: str | None
    value: float
    threshold: float
    message: str
    recommendation: str = ""

    @property
    def rank(self) -> tuple[int, float]:
        """Sort key: severity first, then how far past its threshold the value is."""
        excess = abs(self.value) / self.threshold if self.threshold else 0.0
        return SEVERITIES.index(self.severity), -(excess if math.isfinite(excess) else 0.0)


@dataclass(frozen=True)
class LayerDiagnosis:
    """One BatchNorm layer's numbers (NaN where not measured).

    ``norm_batch_size`` is the normalization batch size it normalizes with in training (None:
    fixed statistics) and ``nbs_rule`` how it follows from the per-device batch;
    ``values_per_channel`` = ``norm_batch_size`` x spatial positions. ``ema_shift`` /
    ``ema_log_std``: running vs population statistics of ``train_data``; ``train_test_gap``: RMS
    of ``z_train - z_pop`` over the values of the comparison pass (``z`` the normalized input,
    with the statistics the layer uses in training, resp. population statistics);
    ``domain_shift`` / ``domain_log_std``: statistics of ``train_data`` vs ``eval_data``:
    ``(mu_train - mu_eval) / sigma_eval`` and ``log(sigma_train / sigma_eval)`` (RMS over
    channels, as the EMA distances).
    """

    kind: str
    mode: str
    calls_per_forward: int
    norm_batch_size: int | None
    nbs_rule: str
    values_per_channel: int | None
    ema_shift: float
    ema_log_std: float
    train_test_gap: float
    domain_shift: float = math.nan
    domain_log_std: float = math.nan


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found: ``findings`` (most important first), the per-layer table,
    the model's metrics by data and configuration, the relative RMS of the outputs in training
    behaviour vs eval mode, the samples of the statistics pass over ``train_data``, the
    per-device training batch (the smallest rank's under torch.distributed) and the thresholds
    used.

    ``str()`` is the terminal summary; :meth:`to_markdown`, :meth:`to_dict` and :meth:`save` give
    the report, the JSON and the files.
    """

    findings: list[Finding]
    layers: dict[str, LayerDiagnosis]
    metrics: dict[str, float]
    output_gap: float
    num_samples: int
    batch_size: int
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def problems(self) -> list[Finding]:
        """The findings to act on: problems and warnings."""
        return [f for f in self.findings if f.severity in ("problem", "warning")]

    def summary(self) -> str:
        """One line per finding, most important first, in a fixed-width table."""
        rows = [(f.severity, f.check, f.layer or "(model)", _fmt(f.value), _fmt(f.threshold),
                 f.message) for f in self.findings]
        head = ("severity", "check", "layer", "value", "threshold", "finding")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
        lines = [f"rethinkbn diagnose: {len(self.problems)} finding(s) to act on, "
                 f"{len(self.layers)} BatchNorm layers, {self.num_samples} samples"]
        for row in [head, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                         + "  " + row[5])
        lines += [f"  -> {f.layer or 'model'}: {f.recommendation}" for f in self.problems
                  if f.recommendation]
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null)."""
        return _json_safe({
            "format": "rethinkbn.Diagnosis/1",
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "thresholds": asdict(self.thresholds),
            "metrics": self.metrics,
            "output_gap": self.output_gap,
            "findings": [asdict(f) for f in self.findings],
            "layers": {name: asdict(row) for name, row in self.layers.items()},
        })

    def to_markdown(self, plot: str | None = None) -> str:
        """The report: findings, recommendations, metrics and the per-layer table."""
        out = ["# BatchNorm diagnosis", "",
               f"{self.num_samples} samples per pass; per-device training batch "
               f"{self.batch_size}. Thresholds: {asdict(self.thresholds)}.", "",
               "## Findings", "", "| severity | check | layer | value | threshold | finding |",
               "|---|---|---|---:|---:|---|"]
        out += [f"| {f.severity} | {f.check} | {f.layer or '(model)'} | {_fmt(f.value)} | "
                f"{_fmt(f.threshold)} | {f.message} |" for f in self.findings]
        recs = [f"- **{f.layer or 'model'}** ({f.check}): {f.recommendation}"
                for f in self.problems if f.recommendation]
        out += ["", "## Recommendations", "", *(recs or ["- none"]), "", "## Model", ""]
        out += [f"- {k}: {_fmt(v)}" for k, v in self.metrics.items()]
        out += [f"- output gap, training behaviour vs eval mode (relative RMS): "
                f"{_fmt(self.output_gap)}", "", "## Layers", ""]
        cols = list(LayerDiagnosis.__dataclass_fields__)
        out += ["| layer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        out += ["| " + " | ".join([name, *(_fmt(getattr(r, c)) for c in cols)]) + " |"
                for name, r in self.layers.items()]
        if plot:
            out += ["", f"![per-layer distances]({plot})"]
        return "\n".join(out) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``report.md``, ``diagnosis.json`` and ``layer_distances.png`` (the plot only when
        matplotlib is installed) to ``out_dir``; returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "diagnosis.json"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot = _plot(self, out / "layer_distances.png")
        if plot is not None:
            written.append(plot)
        report = out / "report.md"
        report.write_text(self.to_markdown(plot.name if plot else None))
        return [report, *written]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _plot(diagnosis: Diagnosis, path: Path) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(diagnosis.layers)
    series = {
        "EMA vs population: mean shift (sigma)": "ema_shift",
        "EMA vs population: |log std ratio|": "ema_log_std",
        "train/test gap at the training NBS (sigma)": "train_test_gap",
        "train vs eval domain: mean shift (sigma)": "domain_shift",
        "train vs eval domain: |log std ratio|": "domain_log_std",
    }
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 1e-4  # a log axis: smaller distances are drawn at the floor
    for label, key in series.items():
        values = [abs(getattr(diagnosis.layers[n], key)) for n in names]
        if any(math.isfinite(v) for v in values):
            ax.plot(range(len(names)), [max(v, floor) for v in values], marker="o", label=label)
    t = diagnosis.thresholds
    ax.axhline(t.shift, color="grey", ls="--", lw=1, label=f"threshold {t.shift} (EMA, gap)")
    if any(math.isfinite(r.domain_shift) for r in diagnosis.layers.values()):
        ax.axhline(t.domain_shift, color="grey", ls=":", lw=1,
                   label=f"threshold {t.domain_shift} (domain)")
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("distance")
    ax.set_title("Per-layer BatchNorm distances")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------- data helpers
def _model_input(batch: Any, input_key: Any) -> Any:
    if isinstance(batch, Mapping):
        if input_key is None:
            raise TypeError(f"diagnose: the batch is a mapping with keys {sorted(map(str, batch))}"
                            "; pass input_key= (the model input) or forward=")
        return batch[input_key]
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _first_tensor(obj: Any) -> Tensor | None:
    leaves = torch.utils._pytree.tree_leaves(obj)
    return next((t for t in leaves if isinstance(t, Tensor) and t.dim() > 0), None)


def _num_samples(batch: Any, input_key: Any) -> int:
    x = _model_input(batch, input_key)
    x = x if isinstance(x, Tensor) and x.dim() > 0 else _first_tensor(batch)
    if x is None:
        raise TypeError(f"diagnose: cannot tell the batch size of a {type(batch).__name__}; "
                        "expected a tensor (N, ...) or a tuple/list/dict holding one")
    return int(x.size(0))


def _counted_run(layers: Mapping[str, nn.Module], run: Callable[[Any], Any], batch: Any,
                 input_key: Any) -> tuple[int, Any]:
    """``run(batch)`` and the batch's size; for a batch holding no tensor to read (an object
    given with ``forward=``: a dataclass, a graph batch), dim 0 of the input of the first
    BatchNorm call of that forward, as ``precise_bn`` counts such batches."""
    try:
        return _num_samples(batch, input_key), run(batch)
    except TypeError as error:
        unknown = error
    seen: list[int] = []

    def count(_layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not seen and isinstance(x, Tensor) and x.dim() > 0:
            seen.append(int(x.size(0)))

    handles = [layer.register_forward_pre_hook(count) for layer in layers.values()]
    try:
        out = run(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise TypeError(f"{unknown}, and no BatchNorm layer saw a tensor input in its forward")
    return seen[0], out


def _samples_where_layers_see_them(model: nn.Module, layers: Mapping[str, nn.Module],
                                   run: Callable[[Any], Any], batch: Any, input_key: Any) -> int:
    """The batch size of ``batch`` before any forward of a comparison: for an object batch, an
    eval-mode forward without gradients counts it (see :func:`_counted_run`; every mode and
    buffer as it was after it)."""
    try:
        return _num_samples(batch, input_key)
    except TypeError:
        pass
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _counted_run(layers, run, batch, input_key)[0]
    finally:
        for m, mode in modes.items():
            m.training = mode


def _moved(batch: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return batch
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_sum(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    if _world(group)[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


# ---------------------------------------------------------------------------- model state
@dataclass
class _Saved:
    """Everything diagnose may touch, to put back bit for bit."""

    flags: list[tuple[nn.Module, bool]]
    buffers: list[tuple[Tensor, Tensor]]
    stats: Snapshot
    steps: list[tuple[ShuffledModule, int]] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> _Saved:
        return cls([(m, m.training) for m in model.modules()],
                   [(b, b.detach().clone()) for b in model.buffers()], capture_stats(model),
                   [(m, m.step) for m in model.modules() if isinstance(m, ShuffledModule)])

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)
        for module, step in self.steps:  # a training forward advances the shuffle's step
            module.step = step

    def restore(self) -> None:
        self.restore_buffers()
        for module, flag in self.flags:
            module.training = flag


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer by qualified name (named_modules lists a shared one once, as
    precise_bn's report does; the root is ``"<model>"``)."""
    return {name or "<model>": m for name, m in model.named_modules() if is_batchnorm(m)}


def _is_fixed(layer: nn.Module, trains: bool) -> bool:
    """Whether the layer normalizes with fixed statistics in training (FrozenBN or eval mode)."""
    return isinstance(layer, FrozenBatchNorm) or not trains


def _nbs(layer: nn.Module, sizes: list[int], trains: bool) -> tuple[int | None, str]:
    """The layer's normalization batch size in training and how it follows from the per-rank
    first batches ``sizes`` (one per rank): the smallest rank's batch, or their sum for a layer
    synced over all of them."""
    batch = min(sizes)
    if _is_fixed(layer, trains):
        return None, "fixed statistics (frozen)"
    devices = getattr(layer, "num_devices", None)
    if isinstance(layer, PerDeviceBatchNorm) and devices:
        return max(batch // devices, 1), f"batch {batch} over {devices} virtual devices"
    ghost = getattr(layer, "norm_batch_size", None)
    if ghost is not None:
        return min(ghost, batch), f"ghost groups of {ghost} in a batch of {batch}"
    if hasattr(layer, "process_group"):
        _, size = _world(getattr(layer, "process_group", None))
        if size > 1 and size == len(sizes):
            per_rank = f"batch {batch}" if len(set(sizes)) == 1 else f"batches {sizes}"
            return sum(sizes), f"synced: {per_rank} over {size} ranks"
        if size > 1:
            return batch * size, f"synced: batch {batch} x {size} ranks"
    if isinstance(layer, DomainBatchNorm):
        return batch, f"per domain, at most the batch of {batch}"
    return batch, f"per-device batch of {batch}"


# ---------------------------------------------------------------------------- the comparison passes
EMA, POPULATION, DOMAIN, TRAINING = ("EMA statistics", "population statistics",
                                     "eval-domain statistics", "training behaviour")
BANK_NAMES = {POPULATION: "population", DOMAIN: "eval domain"}


@dataclass
class _Context:
    """What every comparison pass needs: the model, its layers and the ways to restore it."""

    model: nn.Module
    layers: dict[str, nn.Module]
    train_modes: dict[str, bool]
    bank: StatsBank
    saved: _Saved
    run: Callable[[Any], Any]
    metric: MetricFn | None
    num_samples: int
    input_key: Any
    device: torch.device | str | None
    show: bool
    group: dist.ProcessGroup | None
    shufflers: dict[str, tuple[ShuffledModule, bool]] = field(default_factory=dict)


@dataclass
class _Measured:
    """What a comparison pass saw; rank-local until :meth:`merged`."""

    per_batch: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: int = 0
    skipped: int = 0  # samples of batches left out: some rank's batch was too small to train on
    trained: int = 0  # batches run in training behaviour
    first_batch: int = 0  # this rank's first batch size (rank-local, not merged)
    out_diff: float = 0.0
    out_ref: float = 0.0
    gap: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum of squares, count]
    calls: dict[str, int] = field(default_factory=dict)  # most calls in one forward
    batch_stats_in_eval: set[str] = field(default_factory=set)

    def merged(self, group: dist.ProcessGroup | None) -> _Measured:
        """The union over the ranks (every rank gets the same)."""
        if _world(group)[1] == 1:
            return self
        parts: list[Any] = [None] * _world(group)[1]
        dist.all_gather_object(parts, self, group=group)
        out = _Measured(first_batch=self.first_batch)
        for p in parts:
            for key, rows in p.per_batch.items():
                out.per_batch.setdefault(key, []).extend(rows)
            out.samples += p.samples
            out.skipped += p.skipped
            out.trained += p.trained
            out.out_diff += p.out_diff
            out.out_ref += p.out_ref
            for name, (sq, n) in p.gap.items():
                row = out.gap.setdefault(name, [0.0, 0.0])
                row[0] += sq
                row[1] += n
            for name, k in p.calls.items():
                out.calls[name] = max(out.calls.get(name, 0), k)
            out.batch_stats_in_eval |= p.batch_stats_in_eval
        return out

    def mean(self, key: str) -> float | None:
        rows = self.per_batch.get(key)
        if not rows:
            return None
        return sum(n * v for n, v in rows) / sum(n for n, _ in rows)

    def paired(self, a: str, b: str) -> tuple[float, float] | None:
        """``(mean of metric[a] - metric[b], its standard error)`` over the batches both ran."""
        rows_a, rows_b = self.per_batch.get(a, []), self.per_batch.get(b, [])
        if not rows_a or len(rows_a) != len(rows_b) or not all(
                math.isfinite(v) for _, v in rows_a + rows_b):
            return None  # a non-finite metric is a finding of its own (_nonfinite_metrics)
        if len(rows_a) < 2:  # no spread to judge a difference by
            return sum(n * (va - vb) for (n, va), (_, vb) in zip(rows_a, rows_b,
                                                                 strict=True)) / sum(
                n for n, _ in rows_a), math.inf
        n = torch.tensor([k for k, _ in rows_a], dtype=torch.float64)
        d = torch.tensor([va - vb for (_, va), (_, vb) in zip(rows_a, rows_b, strict=True)],
                         dtype=torch.float64)
        delta = float((n * d).sum() / n.sum())
        # the sample-weighted mean's standard error, from the spread of the batches' differences
        se = float(((n * (d - delta)).square().sum()).sqrt() / n.sum())
        return delta, se


def _gap_hook(name: str, layer: nn.Module, pop: Mapping[str, Tensor], acc: _Measured) -> Any:
    """A forward hook measuring ``z_train - z_pop`` for one layer in training behaviour.

    With ``z_train = (y - bias) / weight`` (the layer's output, un-affined) and
    ``z_pop = (x - mu) / sigma`` (``sigma = sqrt(var + eps)``), the difference is one fused
    ``y * a - x * c + d`` per channel; channels with ``|weight| <= 1e-6`` are left out.
    """
    c = (pop["running_var"].double() + float(getattr(layer, "eps", 1e-5))).rsqrt()
    mu = pop["running_mean"].double()

    def hook(_m: nn.Module, args: tuple[Any, ...], y: Any) -> None:
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape
                and x.dim() >= 2 and x.size(1) == c.numel()):
            return
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        w = weight.detach().double() if isinstance(weight, Tensor) else torch.ones_like(c)
        b = bias.detach().double() if isinstance(bias, Tensor) else torch.zeros_like(c)
        keep = w.abs() > 1e-6
        a = torch.where(keep, 1 / w.where(keep, torch.ones_like(w)), torch.zeros_like(w))
        d = torch.where(keep, mu * c - b * a, torch.zeros_like(c))
        cc = torch.where(keep, c, torch.zeros_like(c))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dtype = torch.promote_types(x.dtype, torch.float32)
        diff = torch.addcmul(y.to(dtype) * a.to(dtype).view(shape), x.to(dtype),
                             cc.to(dtype).view(shape), value=-1) + d.to(dtype).view(shape)
        row = acc.gap.setdefault(name, [0.0, 0.0])
        row[0] += float(diff.square().sum(dtype=torch.float64))
        row[1] += x.numel() // x.size(1) * int(keep.sum())

    return hook


def _eval_forward(ctx: _Context, config: str, batch: Any, acc: _Measured,
                  watch: bool) -> Any:
    """Eval mode with the statistics of ``config``; with ``watch``, the BatchNorm calls are
    counted and those that normalize with batch statistics are noted."""
    calls: dict[str, int] = {}

    def pre(name: str) -> Any:
        def hook(layer: nn.Module, _args: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if layer.training or getattr(layer, "running_mean", None) is None:
                acc.batch_stats_in_eval.add(name)
        return hook

    handles = [layer.register_forward_pre_hook(pre(name))
               for name, layer in ctx.layers.items()] if watch else []
    for m in ctx.model.modules():
        m.training = False
    try:
        with torch.no_grad(), _hooks(handles):
            if config in BANK_NAMES:
                with ctx.bank.use(ctx.model, BANK_NAMES[config]):
                    return ctx.run(batch)
            return ctx.run(batch)
    finally:
        ctx.saved.restore_buffers()
        for name, k in calls.items():
            acc.calls[name] = max(acc.calls.get(name, 0), k)


def _training_forward(ctx: _Context, batch: Any, acc: _Measured) -> Any:
    """The model's outputs as in training (BatchNorm layers in their training modes, a
    ShuffledModule shuffling as in training, dropout off), each layer's ``z_train - z_pop``
    recorded; running buffers and shuffle steps restored afterwards."""
    pop = ctx.bank["population"]
    for m in ctx.model.modules():
        m.training = False
    for shuffler, trains in ctx.shufflers.values():
        shuffler.training = trains
    handles = []
    for name, layer in ctx.layers.items():
        layer.training = ctx.train_modes[name]
        if name in pop and not _is_fixed(layer, ctx.train_modes[name]) \
                and pop[name]["running_mean"].dim() == 1:
            handles.append(layer.register_forward_hook(_gap_hook(name, layer, pop[name], acc)))
    try:
        with torch.no_grad(), _hooks(handles):
            return ctx.run(batch)
    finally:
        ctx.saved.restore_buffers()


def _metric_value(ctx: _Context, out: Any, batch: Any, where: str) -> float:
    """``ctx.metric(out, batch)`` as a float; TypeError naming the metric for anything but a
    number or a one-element tensor."""
    value = ctx.metric(out, batch)  # type: ignore[misc]
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    name = getattr(ctx.metric, "__qualname__", None) or repr(ctx.metric)
    got = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
           else f"{value!r}" if value is None else f"a {type(value).__name__}")
    raise TypeError(f"diagnose: metric {name} returned {got} on a batch of {where}; expected the "
                    "batch's mean metric as a number (a float or a one-element tensor)")


def _compare(ctx: _Context, data: Iterable[Any], label: str, configs: list[str]) -> _Measured:
    """One pass over ``num_samples`` of ``data``, running each of ``configs`` on every batch
    (metric per batch and config under ``"<label>, <config>"``); the first config counts the
    BatchNorm calls. The buffers are put back after every forward, the modes by the caller.

    Under torch.distributed the ranks decide together, per batch, whether to go on (every rank
    has a batch and some rank has not yet seen ``num_samples``) and whether to run the batch
    (with training behaviour among ``configs``, every rank's batch holds 2 samples or more;
    else every rank leaves it out), so that their collectives (SyncBatchNorm's, a
    ShuffledModule's) always match.

    Raises ValueError, on every rank, when the pass ran no batch: ``data`` yielded nothing the
    second time (a one-shot stream) or only batches too small for training behaviour.
    """
    acc = _Measured()
    world = _world(ctx.group)[1]
    trains = TRAINING in configs
    iterator = iter(data)
    with tqdm(total=ctx.num_samples, unit="sample", desc=f"diagnose: {label}",
              disable=not ctx.show, leave=False) as bar:
        while True:
            needs = float(acc.samples < ctx.num_samples)
            if world == 1 and not needs:
                break
            batch = next(iterator, None)
            if batch is not None:
                batch = _moved(batch, ctx.device)
            n = 0 if batch is None else _samples_where_layers_see_them(
                ctx.model, ctx.layers, ctx.run, batch, ctx.input_key)
            if not acc.first_batch:
                acc.first_batch = n
            ended, small = float(batch is None), float(trains and batch is not None and n < 2)
            if world > 1:  # ranks stop and skip together: the training forward is collective
                ended, small, needs = _all_sum([ended, small, needs], ctx.group)
            if ended or not needs:
                break
            if small:  # torch's BatchNorm cannot train on one sample
                acc.skipped += n
                continue
            ref = None
            for i, config in enumerate(configs):
                if config == TRAINING:
                    out = _training_forward(ctx, batch, acc)
                    acc.trained += 1
                    got = _first_tensor(out)
                    if isinstance(ref, Tensor) and isinstance(got, Tensor) \
                            and got.shape == ref.shape:
                        acc.out_diff += float((got.double() - ref.double()).square().sum())
                        acc.out_ref += float(ref.double().square().sum())
                else:
                    out = _eval_forward(ctx, config, batch, acc, watch=i == 0)
                    if config == POPULATION:
                        ref = _first_tensor(out)
                if ctx.metric is not None:
                    key = f"{label}, {config}"
                    acc.per_batch.setdefault(key, []).append(
                        (n, _metric_value(ctx, out, batch, key)))
            acc.samples += n
            bar.update(n)
    merged = acc.merged(ctx.group)
    if merged.samples == 0:
        why = (f"its {merged.skipped} samples came in batches of fewer than 2 samples (on some "
               "rank), too few to run training behaviour" if merged.skipped else
               f"{label} yielded no batch the second time it was read")
        raise ValueError(
            f"diagnose: the comparison pass over {label} saw 0 samples: {why}; {label} is read "
            "twice (the statistics, then the comparisons) and each pass needs at least one "
            "batch (of 2 samples or more for training behaviour): pass a re-iterable (a list of "
            "batches, a DataLoader over a map-style Dataset), not a one-shot stream")
    return merged


# ---------------------------------------------------------------------------- verdicts
def _past(shift: float, log_std: float, t_shift: float, t_log: float) -> float:
    """How far past its thresholds a pair of distances is (> 1: past)."""
    return max(abs(shift) / t_shift, abs(log_std) / t_log)


def _matters(pair: tuple[float, float], t: Thresholds) -> bool:
    """A metric difference matters when past the threshold and twice its standard error."""
    delta, se = pair
    return abs(delta) > t.metric and abs(delta) > 2 * se


def _metric_text(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.4g} +- {pair[1]:.2g}"


NBS_ADVICE = ("train with a larger normalization batch (larger per-device batch, SyncBatchNorm, "
              "larger ghost groups), or FrozenBN for the last epochs "
              "(rethinkbn.freeze_with_precise_stats) so that training sees population statistics")
EMA_ADVICE = "run rethinkbn.precise_bn(model, train_loader) before evaluating"
DOMAIN_ADVICE = ("recompute the statistics on the target domain (rethinkbn.recompute_stats) and "
                 "keep one snapshot per domain in a rethinkbn.StatsBank")


def _ema_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                  t: Thresholds, untracked: set[str], bad: set[str]) -> list[Finding]:
    """EMA vs population. Layers in ``untracked`` keep no running statistics (not testable),
    those in ``bad`` have non-finite distances (a finding of their own): neither counts as
    within the thresholds."""
    tested = {n: r for n, r in rows.items() if n not in untracked}
    if not tested:
        return [Finding("ema", "skipped", None, math.nan, t.shift,
                        f"not testable: none of the {len(rows)} training BatchNorm layers keeps "
                        "running statistics (track_running_stats=False), so there is no EMA to "
                        "compare with the population")]
    finite = {n: r for n, r in tested.items() if n not in bad}
    stale = {n: r for n, r in finite.items() if _past(r.ema_shift, r.ema_log_std, t.shift,
                                                      t.log_std) > 1}
    out = [Finding("ema", "warning", n, max(abs(r.ema_shift), abs(r.ema_log_std)), t.shift,
                   f"EMA off the population by {r.ema_shift:.3g} sigma in mean, "
                   f"{r.ema_log_std:.3g} in log std (thresholds {t.shift}, {t.log_std})")
           for n, r in stale.items()]
    untested = (f"; {len(untracked)} of {len(rows)} layers keep no running statistics (not "
                "tested)" if untracked else "")
    if bad:
        out.append(Finding("ema", "problem", None, len(bad), 0,
                           f"{len(bad)} of {len(tested)} layers' EMA distances are NaN or Inf "
                           f"(see the non-finite findings){untested}", EMA_ADVICE))
    elif pair is not None:
        sev = "problem" if _matters(pair, t) and pair[0] > 0 else "ok"
        out.append(Finding("ema", sev, None, pair[0], t.metric,
                           f"metric with population minus with EMA statistics: "
                           f"{_metric_text(pair)}{untested}",
                           EMA_ADVICE if sev == "problem" else ""))
    elif stale:
        out.append(Finding("ema", "warning", None, len(stale), 0,
                           f"{len(stale)} of {len(tested)} layers have EMA statistics past the "
                           "thresholds (no metric given to tell whether it matters)" + untested,
                           EMA_ADVICE))
    else:
        worst = max((abs(r.ema_shift) for r in finite.values()), default=0.0)
        out.append(Finding("ema", "ok", None, worst, t.shift,
                           "EMA statistics within the thresholds in every layer" + (
                               " that keeps them" + untested if untracked else "")))
    return out


def _unless_nonfinite(finding: Finding, bad: set[str], what: str) -> Finding:
    """An "ok" model-level verdict is not ok when some layers' ``what`` are NaN or Inf."""
    if not bad or finding.severity != "ok":
        return finding
    return replace(finding, severity="problem",
                   message=f"{finding.message}; {what} NaN or Inf in {', '.join(sorted(bad))} "
                   "(see the non-finite findings)")


def _nbs_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                  output_gap: float, t: Thresholds, bad: set[str]) -> list[Finding]:
    out = []
    for n, r in rows.items():
        v = r.values_per_channel
        if v is not None and v < t.min_values:
            out.append(Finding(
                "nbs", "problem", n, v, t.min_values,
                f"normalizes {v} values per channel ({r.nbs_rule}): batch mean off by "
                f"~{1 / math.sqrt(v):.2g} sigma, std by ~{1 / math.sqrt(2 * max(v - 1, 1)):.0%}",
                NBS_ADVICE))
    gapped = {n: r for n, r in rows.items() if r.train_test_gap > t.train_test_gap}
    out += [Finding("train-test", "warning", n, r.train_test_gap, t.train_test_gap,
                    f"training-mode normalization (NBS {r.norm_batch_size}) differs from "
                    f"population statistics by {r.train_test_gap:.3g} sigma RMS")
            for n, r in gapped.items()]
    nbs = min((r.norm_batch_size for r in rows.values() if r.norm_batch_size is not None),
              default=None)
    if pair is not None:
        # Population statistics that cost accuracy are the paper's Sec. 4 problem; eval mode
        # doing better than training behaviour costs nothing at inference, and is worth a
        # warning only when the layers' own normalization gaps confirm the inconsistency.
        sev, advice = "ok", ""
        if _matters(pair, t) and pair[0] > 0:
            sev, advice = "problem", (
                "normalize test batches with their own statistics (rethinkbn."
                f"batch_stats_inference(model, norm_batch_size={nbs})) when test batches are "
                f"available, else {NBS_ADVICE}")
        elif _matters(pair, t) and gapped:
            sev, advice = "warning", NBS_ADVICE
        out.append(Finding("train-test", sev, None, pair[0], t.metric,
                           f"metric on train_data in training behaviour (NBS {nbs}) minus in "
                           f"eval mode: {_metric_text(pair)}; outputs differ by "
                           f"{output_gap:.3g} relative RMS; {len(gapped)} of {len(rows)} layers "
                           "past the gap threshold", advice))
        out[-1] = _unless_nonfinite(out[-1], bad, "train/test gaps")
    else:
        worst = max((r.train_test_gap for r in rows.values()
                     if math.isfinite(r.train_test_gap)), default=0.0)
        sev = "warning" if gapped else "ok"
        out.append(Finding("train-test", sev, None, worst, t.train_test_gap,
                           f"{len(gapped)} of {len(rows)} layers normalize differently in "
                           f"training (NBS {nbs}) and eval mode past the threshold; outputs "
                           f"differ by {output_gap:.3g} relative RMS",
                           NBS_ADVICE if gapped else ""))
        out[-1] = _unless_nonfinite(out[-1], bad, "train/test gaps")
    return out


def _domain_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                     t: Thresholds, bad: set[str]) -> list[Finding]:
    shifted = {n: r for n, r in rows.items()
               if _past(r.domain_shift, r.domain_log_std, t.domain_shift, t.domain_shift) > 1}
    out = [Finding("domain", "warning", n, max(abs(r.domain_shift), abs(r.domain_log_std)),
                   t.domain_shift,
                   f"eval_data's statistics differ from train_data's by {r.domain_shift:.3g} "
                   f"sigma in mean, {r.domain_log_std:.3g} in log std "
                   f"(threshold {t.domain_shift})") for n, r in shifted.items()]
    if pair is not None:
        sev = "problem" if _matters(pair, t) and pair[0] > 0 else (
            "warning" if shifted else "ok")
        out.append(Finding("domain", sev, None, pair[0], t.metric,
                           f"metric on eval_data with recomputed minus with training-domain "
                           f"statistics: {_metric_text(pair)}; {len(shifted)} of {len(rows)} "
                           "layers past the threshold", DOMAIN_ADVICE if sev != "ok" else ""))
    else:
        worst = max((max(abs(r.domain_shift), abs(r.domain_log_std)) for n, r in rows.items()
                     if n not in bad and math.isfinite(r.domain_shift)), default=0.0)
        out.append(Finding("domain", "warning" if shifted else "ok", None, worst,
                           t.domain_shift, f"{len(shifted)} of {len(rows)} layers' statistics "
                           "differ between train_data and eval_data past the threshold",
                           DOMAIN_ADVICE if shifted else ""))
    out[-1] = _unless_nonfinite(out[-1], bad, "domain distances")
    return out


def _smells(ctx: _Context, report: PreciseBNReport, seen: _Measured,
            mixing: tuple[float, int] | None, t: Thresholds) -> list[Finding]:
    out = [Finding("smell:batch-stats-in-eval", "problem", name, 1, 0,
                   "normalizes with batch statistics in eval mode (in training mode after "
                   "model.eval(), or without running statistics)",
                   "keep BatchNorm in eval mode for evaluation (check overrides of train()/eval() "
                   "and track_running_stats)") for name in sorted(seen.batch_stats_in_eval)]
    for name, layer in ctx.layers.items():
        r = report.layers.get(name)
        if r is not None and _is_fixed(layer, ctx.train_modes[name]):
            finite = math.isfinite(r.mean_shift) and math.isfinite(r.std_log_ratio)
            far = not finite or _past(r.mean_shift, r.std_log_ratio, t.shift, t.log_std) > 1
            out.append(Finding(
                "smell:frozen-stats", "warning" if finite and far else "problem" if far else "ok",
                name, r.mean_shift, t.shift,
                f"frozen statistics vs train_data's: {r.mean_shift:.3g} sigma in mean, "
                f"{r.std_log_ratio:.3g} in log std"
                + (" (another dataset's?)" if finite and far else ""),
                "recompute them on this data (rethinkbn.precise_bn(model, loader, "
                "include_frozen=True)) or unfreeze" if far else ""))
        calls = seen.calls.get(name, 0)
        if calls > 1:
            out.append(Finding("smell:reused-layer", "warning", name, calls, 1,
                               f"called {calls} times in one forward: its statistics pool "
                               f"{calls} different inputs",
                               "give each call site its own BatchNorm (or a DomainBatchNorm "
                               "when the calls are different domains)"))
    if mixing is not None:
        ratio, k = mixing
        sev = "problem" if ratio < t.group_mixing else "ok"
        out.append(Finding("smell:correlated-batch", sev, None, ratio, t.group_mixing,
                           f"normalization batches of {k} samples hold {ratio:.0%} of the "
                           "distinct group ids of a random shuffle of the same samples",
                           "shuffle samples across devices before BatchNorm "
                           "(rethinkbn.ShuffledModule / ShufflePlan), use SyncBatchNorm, or "
                           "sample batches across groups" if sev == "problem" else ""))
    return out


def _group_mixing(ids: list[Tensor], k: int, seed: int = 0) -> float | None:
    """Distinct ids per contiguous group of ``k`` samples, observed / after a random shuffle."""
    if k < 2 or not ids:
        return None

    def distinct(batches: list[Tensor]) -> float:
        return float(sum(int(torch.unique(b[i:i + k]).numel())
                         for b in batches for i in range(0, len(b) - k + 1, k)))

    flat = torch.cat(ids)
    gen = torch.Generator().manual_seed(seed)
    shuffled = flat[torch.randperm(len(flat), generator=gen)].split([len(b) for b in ids])
    base = distinct(list(shuffled))
    return distinct(ids) / base if base else None


NONFINITE_ADVICE = ("find where the values became NaN or Inf (a diverged training step, a float16 "
                    "overflow, a bad input) and recompute the statistics "
                    "(rethinkbn.precise_bn(model, train_loader))")
QUANTITIES = {"ema": "EMA vs population distance", "train-test": "train/test gap",
              "domain": "train vs eval domain distance"}


def _nonfinite_layer(name: str, row: LayerDiagnosis, running: Mapping[str, Tensor] | None,
                     measured: Mapping[str, bool]) -> list[Finding]:
    """One problem per measured quantity of a layer that came out NaN or Inf, naming the
    running buffers that hold non-finite values when they are the cause."""
    values = {"ema": (row.ema_shift, row.ema_log_std), "train-test": (row.train_test_gap,),
              "domain": (row.domain_shift, row.domain_log_std)}
    out = []
    for check, numbers in values.items():
        if not measured[check] or all(math.isfinite(v) for v in numbers):
            continue
        cause = ""
        if check == "ema" and running is not None:
            held = [f"{key} holds {int((~torch.isfinite(buf)).sum())} of {buf.numel()}"
                    for key, buf in running.items() if buf.is_floating_point()
                    and not bool(torch.isfinite(buf).all())]
            cause = f" ({', '.join(held)} values NaN or Inf)" if held else ""
        out.append(Finding(f"non-finite:{check}", "problem", name, math.nan, 0,
                           f"{QUANTITIES[check]} is {', '.join(f'{v:.3g}' for v in numbers)}"
                           f"{cause}: not a verdict", NONFINITE_ADVICE))
    return out


def _nonfinite_metrics(*passes: _Measured) -> list[Finding]:
    """One problem per configuration whose metric was NaN or Inf on some batch."""
    out, seen = [], set()
    for acc in passes:
        for key, rows in acc.per_batch.items():
            k = sum(not math.isfinite(v) for _, v in rows)
            if k and key not in seen:
                seen.add(key)
                out.append(Finding("non-finite:metric", "problem", None, k, 0,
                                   f"the metric is NaN or Inf on {k} of {len(rows)} batches of "
                                   f"{key}: the comparisons that use it give no verdict",
                                   "make the metric finite on every batch (an empty class, a "
                                   "division by zero?), or check the model's outputs"))
    return out


# ---------------------------------------------------------------------------- the entry point
def diagnose(
    model: nn.Module,
    train_data: Iterable[Any],
    eval_data: Iterable[Any] | None = None,
    *,
    forward: ForwardFn | None = None,
    metric: MetricFn | None = None,
    input_key: Any = None,
    group_ids: Callable[[Any], Tensor] | None = None,
    num_samples: int = 2048,
    device: torch.device | str | None = None,
    thresholds: Thresholds | None = None,
    progress: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Diagnosis:
    """Measure the paper's BatchNorm pitfalls on ``model`` (see the module docstring).

    Args:
        train_data: batches as the model is trained on them (the first batch's size is taken as
            the per-device training batch), re-iterable (it is read twice: a DataLoader or a
            list, not a generator); same conventions as :func:`precise_bn`:
            ``forward(model, batch)`` runs one (default ``model(x)`` with ``x`` the batch, its
            first element or ``batch[input_key]``), batches are moved to ``device``.
        eval_data: optional evaluation batches, of the training domain or another one.
        metric: ``metric(outputs, batch)`` -> the batch's mean metric, higher is better (e.g.
            accuracy); averaged over samples. A difference counts when it exceeds
            ``thresholds.metric`` and twice its standard error over the batches.
        group_ids: ``group_ids(batch)`` -> one id per sample (e.g. the video or image a sample
            comes from), to check that samples normalized together are not correlated.
        num_samples: samples of each statistics pass; the comparisons run on half as many.

    Cost, in no-grad forwards of ``N = num_samples`` samples: the population statistics of
    ``train_data`` (:func:`precise_bn`, N), then on N/2 samples of ``train_data`` eval mode and
    training behaviour (N; plus N/2 with the EMA when there is a ``metric`` and no
    ``eval_data``). With ``eval_data`` add its population statistics (N) and, on N/2 of its
    samples, eval mode with the EMA, training-domain and eval-domain statistics (3N/2 with
    ``metric``, N/2 without). ``benchmarks/bench_diagnose.py`` measures it in precise_bn
    passes.

    Side effects: none. Buffers, modes and hooks of every module are as before when it returns
    or raises (restored in ``finally``). Under torch.distributed every rank must call it; the
    statistics are merged across ranks by ``precise_bn`` and the comparisons gathered, so every
    rank returns the same diagnosis; progress shows on rank 0 only.
    """
    t = thresholds or Thresholds()
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: model must be an nn.Module, got {type(model).__name__}")
    check_positive_int(num_samples, "num_samples", "diagnose")
    for label, fn in (("forward", forward), ("metric", metric), ("group_ids", group_ids)):
        if fn is not None and not callable(fn):
            raise TypeError(f"diagnose: {label} must be callable, got {type(fn).__name__}")
    for label, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and iter(data) is data:  # type: ignore[comparison-overlap]
            raise TypeError(f"diagnose: {label} is a one-shot iterator "
                            f"({type(data).__name__}); it is read twice, pass a re-iterable "
                            "(a DataLoader, a list of batches)")
    # the model precise_bn sees (and names the layers of): no DDP or torch.compile wrapper
    model = unwrap(model)
    layers = _bn_layers(model)
    if not layers:
        raise ValueError(f"diagnose: {type(model).__name__} has no BatchNorm layer")
    show = (sys.stderr.isatty() if progress is None else progress) \
        and _world(process_group)[0] == 0
    # Training behaviour: the modes as they are when the model comes in train mode (an eval-mode
    # BatchNorm inside a training model is frozen); every BatchNorm training otherwise.
    train_modes = {n: (m.training if model.training else True) for n, m in layers.items()}
    # A shuffle before BatchNorm is part of how the model trains: training behaviour runs it.
    shufflers = {name or "<model>": (m, m.training if model.training else True)
                 for name, m in model.named_modules() if isinstance(m, ShuffledModule)}
    shuffled = {n: s for n in layers for s, (_, on) in shufflers.items()
                if on and (s == "<model>" or n.startswith(s + "."))}

    def run(batch: Any) -> Any:
        return forward(model, batch) if forward else model(_model_input(batch, input_key))

    first: list[int] = []
    ids: list[Tensor] = []

    def recording_forward(_m: nn.Module, batch: Any) -> Any:
        if group_ids is not None:
            ids.append(torch.as_tensor(group_ids(batch)).flatten().cpu())
        if first:
            return run(batch)
        n, out = _counted_run(layers, run, batch, input_key)
        first.append(n)
        return out

    common = {"num_samples": num_samples, "device": device, "include_frozen": True,
              "progress": show, "process_group": process_group, "input_key": input_key}
    saved = _Saved.of(model)
    try:
        with warnings.catch_warnings():  # a loader shorter than the budget is fine here
            warnings.filterwarnings("ignore", message=".*short of the budget",
                                    category=RuntimeWarning)
            # no layer keeps running statistics: the EMA check says it is not testable
            warnings.filterwarnings("ignore", message=".*nothing was run",
                                    category=RuntimeWarning)
            report = precise_bn(model, train_data, forward=recording_forward, **common)
            bank = StatsBank({"population": capture_stats(model)})
            eval_report = None
            if eval_data is not None:  # starting from train_data's statistics: the distances
                eval_report = precise_bn(model, eval_data, forward=forward, **common)
                bank["eval domain"] = capture_stats(model)
        install_stats(model, saved.stats)
        ctx = _Context(model, layers, train_modes, bank, saved, run, metric,
                       max(num_samples // 2, 1), input_key, device, show, process_group,
                       shufflers)
        on_train = _compare(ctx, train_data, "train_data",
                            [EMA, POPULATION, TRAINING] if eval_data is None and metric
                            else [POPULATION, TRAINING])
        on_eval = on_train if eval_data is None else _compare(
            ctx, eval_data, "eval_data", [EMA, POPULATION, DOMAIN] if metric else [EMA])
    finally:
        install_stats(model, saved.stats)
        saved.restore()
    # every rank's first batch, so that every rank states the same sizes
    local, (rank, world) = first[0] if first else on_train.first_batch, _world(process_group)
    sizes = [int(v) for v in _all_sum([float(local if r == rank else 0)
                                       for r in range(world)], process_group)]
    batch = min(sizes)
    table = {}
    bad: dict[str, set[str]] = {"ema": set(), "train-test": set(), "domain": set()}
    nonfinite: list[Finding] = []
    for name, layer in layers.items():
        r = report.layers.get(name)
        nbs, rule = _nbs(layer, sizes, train_modes[name])
        if nbs is not None and name in shuffled:
            rule += f", after ShuffledModule '{shuffled[name]}''s shuffle (measured with it)"
        positions = r.count / r.samples if r is not None and r.samples else math.nan
        values = int(nbs * positions) if nbs is not None and math.isfinite(positions) else None
        e = eval_report.layers.get(name) if eval_report is not None else None
        sq, n = on_train.gap.get(name, (0.0, 0.0))
        table[name] = row = LayerDiagnosis(
            type(layer).__name__, "frozen" if nbs is None else "trains", on_eval.calls.get(name, 0),
            nbs, rule, values, r.mean_shift if r else math.nan,
            r.std_log_ratio if r else math.nan, math.sqrt(sq / n) if n else math.nan,
            e.mean_shift if e else math.nan, e.std_log_ratio if e else math.nan)
        found = _nonfinite_layer(name, row, saved.stats.get(name), measured={
            "ema": r is not None, "train-test": bool(n), "domain": e is not None})
        nonfinite += found
        for f in found:
            bad[f.check.removeprefix("non-finite:")].add(name)
    nonfinite += _nonfinite_metrics(on_train, on_eval)
    output_gap = math.sqrt(on_train.out_diff / on_train.out_ref) if on_train.out_ref else math.nan
    if (on_train.out_ref or on_train.out_diff) and not math.isfinite(output_gap):
        bad["train-test"].add("the model's outputs")
        nonfinite.append(Finding("non-finite:train-test", "problem", None, math.nan, 0,
                                 f"the output gap is {output_gap}: the model's outputs are NaN "
                                 "or Inf in training behaviour or with population statistics",
                                 NONFINITE_ADVICE))
    trainable = {n: r for n, r in table.items() if r.norm_batch_size is not None}
    unshuffled = {n: r for n, r in trainable.items() if n not in shuffled}
    k = min((r.norm_batch_size for r in unshuffled.values() if r.norm_batch_size is not None),
            default=None)
    ratio = _group_mixing(ids, k) if k is not None and group_ids is not None else None
    eval_label = "eval_data" if eval_data is not None else "train_data"
    findings = nonfinite + _smells(ctx, report, on_eval, None if ratio is None else (ratio, k), t)
    if group_ids is not None and trainable and not unshuffled:
        findings.append(Finding(
            "smell:correlated-batch", "skipped", None, math.nan, t.group_mixing,
            "not testable on the loader's batches: every training BatchNorm layer normalizes "
            f"after the shuffle of ShuffledModule {sorted(set(shuffled.values()))}, which "
            "already mixes the samples of a normalization batch"))
    untracked = {n for n in trainable if n not in saved.stats}
    findings += _ema_findings(trainable, on_eval.paired(f"{eval_label}, {POPULATION}",
                                                        f"{eval_label}, {EMA}"), t,
                              untracked, bad["ema"] & set(trainable))
    findings += _nbs_findings(trainable, on_train.paired(f"train_data, {TRAINING}",
                                                         f"train_data, {POPULATION}"),
                              output_gap, t,
                              bad["train-test"] & {*trainable, "the model's outputs"})
    if eval_data is not None:
        findings += _domain_findings(trainable, on_eval.paired(f"eval_data, {DOMAIN}",
                                                               f"eval_data, {POPULATION}"), t,
                                     bad["domain"] & set(trainable))
    if metric is None:
        findings.append(Finding(
            "metric", "skipped", None, math.nan, t.metric,
            "no metric given: the model-level checks (the metric with EMA vs population "
            "statistics, in training behaviour vs eval mode, across domains) were skipped; the "
            "verdicts rest on the layers' statistics alone"))
    metrics = {key: on_train.mean(key) for key in on_train.per_batch}
    metrics.update({key: on_eval.mean(key) for key in on_eval.per_batch})
    findings.sort(key=lambda f: f.rank)
    return Diagnosis(findings, table, metrics, output_gap, report.num_samples or on_train.samples,
                     batch, t)
