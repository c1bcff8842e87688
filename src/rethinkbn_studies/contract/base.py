"""The plug-in contract of the reproduction harness: studies, their context and their results.

A study is a function ``run(ctx: RunContext) -> StudyResult`` registered under a name::

    from rethinkbn_studies.contract.base import (RunContext, StudyResult, Table,
                                                 register_study, verdict)

    @register_study("my-study", "Sec. 9: what it measures, in one line")
    def run(ctx: RunContext) -> StudyResult:
        data = ctx.dataset()                        # a DataSplit (MNIST-1D unless --data)
        for seed in ctx.seeds:
            numbers = ctx.cache.get_or_run(         # trained once, reused on every rerun
                {"study": "my-study", "variant": "a", "seed": seed, "quick": ctx.quick},
                lambda: train_and_measure(seed),
            )
        ...
        return StudyResult(setup=..., tables=[...], paper_tables=[...], plots=[...],
                           summary=[SummaryRow(claim, ours, paper, verdict(...))],
                           numbers={...})

The module that holds the study lives in ``rethinkbn_studies/studies/`` and must be listed in
``rethinkbn_studies.STUDY_MODULES`` so that the registry imports it. Its ``run`` reads best as a
few named stages (the shipped studies: ``measure`` into a small typed record of the runs,
``summarize`` into ``numbers``, the tables, ``verdicts``). The harness
(``rethinkbn_studies.infra.harness.reproduce``) calls each selected study, writes ``report.md``,
the plots and ``results.json``; the study itself writes only its plot files
(``ctx.plot_path("name.png")``) and cached runs (``ctx.cache``).

Verdicts are never typed in: a study computes them from its measured numbers with :func:`verdict`,
passing the criterion as text (shown in the report next to the verdict) and the boolean that the
numbers give for it. Keep that computation in a pure function of the numbers so a test can feed it
numbers and watch the verdict flip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rethinkbn.population import markdown_table

from ..infra.tasks import Task, run_tasks

if TYPE_CHECKING:
    from ..infra.cache import RunCache
    from ..toolkit.data import DataSplit

__all__ = [
    "AGREES",
    "DISAGREES",
    "EXPLAINED",
    "INCONCLUSIVE",
    "NOT_TESTABLE",
    "ProgressFactory",
    "RunContext",
    "Study",
    "StudyResult",
    "Task",
    "SummaryRow",
    "Table",
    "Verdict",
    "explain",
    "get_study",
    "mean_std",
    "register_study",
    "registered_studies",
    "verdict",
]

AGREES = "agrees"
DISAGREES = "disagrees"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable"
"""The claim's precondition is absent in our runs (stated in ``Verdict.precondition``): the
claim is neither confirmed nor refuted here, and a fixed-in-advance check said so."""
OUTCOMES = (AGREES, INCONCLUSIVE, DISAGREES, NOT_TESTABLE)


class ProgressFactory(Protocol):
    """Makes a progress bar: ``ctx.progress(iterable, desc="...", total=n, leave=False)``.

    Returns an iterable with ``update(n)``, ``set_postfix_str(s)`` and ``close()`` (tqdm's
    interface); tests pass a factory that prints nothing.
    """

    def __call__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        desc: str | None = None,
        total: int | None = None,
        leave: bool = False,
    ) -> Any: ...


@dataclass(frozen=True)
class Verdict:
    """Whether our small-scale number agrees with the paper, and the criterion that decided it.

    ``criterion`` is the rule in words (``"EMA error - PreciseBN error >= 0.5 pt in the first
    half of training"``); ``detail`` shows the measured values the rule was applied to.

    Verdicts that know their noise (:mod:`rethinkbn_studies.contract.verdicts`) also carry
    ``outcome`` (``"agrees"``, ``"disagrees"`` or ``"inconclusive"``), the ``effect``, its
    ``interval`` at ``confidence`` and the ``test`` that gave it; without them the outcome follows
    ``agrees``. ``rule`` (``"exceeds"``, ``"stays_below"`` or ``"equivalent"``) and ``threshold``
    (the threshold, or the equivalence margin) say how the interval was judged, so that the report
    can say what would change the verdict (:meth:`what_would_change`).
    """

    agrees: bool
    criterion: str
    detail: str = ""
    outcome: str | None = None
    effect: float | None = None
    interval: tuple[float, float] | None = None
    confidence: float | None = None
    test: str = ""
    threshold: float | None = None
    rule: str = ""
    precondition: str = ""
    """For a ``"not testable"`` verdict: the unmet precondition, with the numbers that show it."""

    def __post_init__(self) -> None:
        if self.rule not in ("", "exceeds", "stays_below", "equivalent"):
            raise ValueError(f"Verdict: rule must be 'exceeds', 'stays_below', 'equivalent' or "
                             f"'', got {self.rule!r}")
        if self.outcome not in (None, *OUTCOMES):
            raise ValueError(f"Verdict: outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if (self.outcome == NOT_TESTABLE) != bool(self.precondition):
            raise ValueError("Verdict: a 'not testable' verdict states its unmet precondition, "
                             f"and only it; got outcome {self.outcome!r}, precondition "
                             f"{self.precondition!r}")
        if self.outcome is not None and self.agrees != (self.outcome == AGREES):
            raise ValueError(f"Verdict: agrees={self.agrees} contradicts {self.outcome!r}")

    @property
    def label(self) -> str:
        if self.outcome is not None:
            return self.outcome
        return AGREES if self.agrees else DISAGREES

    def line(self) -> str:
        """The report's verdict line: ``**agrees** — criterion (detail; test)``."""
        parts = [p for p in (self.detail, self.test) if p]
        if self.precondition:
            parts.insert(0, f"precondition unmet: {self.precondition}")
        tail = f" ({'; '.join(parts)})" if parts else ""
        return f"**{self.label}** — {self.criterion}{tail}"

    def to_json(self) -> dict[str, Any]:
        """The verdict for results.json: outcome, criterion, detail, and, when known, the
        effect, its uncertainty and the test."""
        out: dict[str, Any] = {"verdict": self.label, "criterion": self.criterion,
                               "detail": self.detail}
        if self.outcome is not None:
            low, high = self.interval if self.interval is not None else (None, None)
            out.update(effect=self.effect, uncertainty={"low": low, "high": high,
                                                        "confidence": self.confidence},
                       test=self.test, rule=self.rule or None, threshold=self.threshold)
        if self.precondition:
            out["precondition"] = self.precondition
        return out

    def what_would_change(self) -> str:
        """What would change this verdict, computed from its effect, interval and threshold:
        the measured margin (how far the interval's nearer edge is from the threshold) against
        the uncertainty (the interval's half-width), and for an inconclusive verdict about how
        many times more samples/seeds would decide it (the width shrinks as 1/sqrt(n))."""
        if self.label == NOT_TESTABLE:
            return f"not testable until its precondition holds ({self.precondition})"
        if self.interval is None or self.effect is None or self.threshold is None:
            return "no uncertainty stated"
        low, high = self.interval
        half = (high - low) / 2
        edges = ((-self.threshold, self.threshold) if self.rule == "equivalent"
                 else (self.threshold,))
        # The threshold nearest to the effect decides; the margin is the effect's distance to it.
        t = min(edges, key=lambda e: abs(self.effect - e))
        margin = abs(self.effect - t)
        head = (f"effect {self.effect:+.2f} vs threshold {t:+.2f}: margin {margin:.2f} pt, "
                f"uncertainty ±{half:.2f} pt")
        if self.label == INCONCLUSIVE:
            if margin == 0:
                return f"{head}; the effect sits on the threshold, more data cannot decide it"
            return (f"{head}; decided with about {max(1.0, (half / margin) ** 2):.1f}x the "
                    f"samples/seeds if the effect stays")
        gap = min(abs(low - t), abs(high - t))
        return (f"{head}; a shift of {gap:.2f} pt (or an interval {gap:.2f} pt wider on that "
                f"side) would make it inconclusive")


def check_count(value: object, name: str, owner: str, allow_none: bool = False) -> None:
    """The harness's positive-int check, by the library's rule (the library's helper is private):
    ``TypeError`` for a non-int (``bool`` included), ``ValueError`` below 1."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def verdict(criterion: str, holds: bool, detail: str = "") -> Verdict:
    """A verdict whose outcome is ``holds``, computed by the caller from measured numbers."""
    return Verdict(agrees=bool(holds), criterion=criterion, detail=detail)


NOT_IN_PAPER = "not in the paper"
"""The paper column of a row that tests our own ablation or mechanism, not a claim of the paper."""


@dataclass(frozen=True)
class SummaryRow:
    """One row of the report's opening table: the paper's claim, our number, theirs, the verdict.

    ``ours`` and ``paper`` are short display strings (``"12.3 ± 0.4 vs 10.1 ± 0.2"``).
    """

    claim: str
    ours: str
    paper: str
    verdict: Verdict
    paper_claim: bool = True
    """False for our own ablations and mechanism checks: the headline counts them apart. A row
    whose paper column is :data:`NOT_IN_PAPER` is never one of the paper's claims."""
    explanation: str = ""
    """For a row that disagrees: a sentence computed from the run's numbers that names the
    measured quantity explaining the disagreement (set by :func:`explain`); the report prints it
    after the verdict, after :data:`EXPLAINED`."""

    def __post_init__(self) -> None:
        if self.paper == NOT_IN_PAPER:
            object.__setattr__(self, "paper_claim", False)


EXPLAINED = "What explains it:"
"""The report's marker before a disagreeing row's :attr:`SummaryRow.explanation`."""


def explain(rows: list[SummaryRow], texts: dict[str, str]) -> list[SummaryRow]:
    """``rows`` with ``texts[row.claim]`` as the explanation of every row whose verdict
    disagrees; the other rows, and a disagreeing row without a text, unchanged. ``texts``: per
    claim, the sentence computed from the run's numbers (see :attr:`SummaryRow.explanation`).
    No side effects (new rows are returned)."""
    return [replace(r, explanation=texts[r.claim])
            if r.verdict.label == DISAGREES and texts.get(r.claim) else r for r in rows]


@dataclass
class Table:
    """A small table for the report: a title, column names and rows of cells (str or number).

    Floats are shown with ``digits`` decimals; ``(mean, std)`` tuples as ``mean ± std``.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]
    digits: int = 1

    def cell(self, value: Any) -> str:
        if isinstance(value, tuple) and len(value) == 2:
            mean, std = value
            return f"{mean:.{self.digits}f} ± {std:.{self.digits}f}"
        if isinstance(value, float):
            return f"{value:.{self.digits}f}"
        return str(value)

    def to_markdown(self) -> str:
        body = [[self.cell(v) for v in row] for row in self.rows]
        return markdown_table(f"*{self.title}*\n", self.columns, body, right_aligned=False)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class StudyResult:
    """What a study hands back to the harness.

    - ``setup``: a paragraph (markdown) saying what was trained and measured, at what scale.
    - ``tables`` / ``paper_tables``: our tables and the paper's, shown side by side.
    - ``plots``: file names (relative to the output directory) of PNGs the study wrote.
    - ``summary``: rows for the report's opening table, each with its computed verdict.
    - ``numbers``: every measured number, JSON-serializable; goes into ``results.json``.
    - ``notes``: optional markdown after the verdicts: why small scale may differ, caveats.
    """

    setup: str
    tables: list[Table]
    paper_tables: list[Table]
    plots: list[str]
    summary: list[SummaryRow]
    numbers: dict[str, Any]
    notes: str = ""


@dataclass(frozen=True)
class RunContext:
    """Everything a study may use; built by the harness from the command line.

    - ``quick``: the small budget (all studies together <= 10 minutes on 2 CPU cores).
    - ``seeds``: the seeds to run (one in quick mode by default, >= 3 in full mode).
    - ``out_dir``: the output directory; write plots with :meth:`plot_path`.
    - ``device``: where to train.
    - ``cache``: the on-disk run cache (:class:`~rethinkbn_studies.infra.cache.RunCache`); wrap
      every training run in ``ctx.cache.get_or_run(config, fn)`` so Ctrl-C loses nothing.
    - ``progress``: a tqdm-like factory (:class:`ProgressFactory`).
    - ``dataset``: ``ctx.dataset()`` returns the :class:`~rethinkbn_studies.toolkit.data.DataSplit`
      selected by ``--data`` (MNIST-1D by default), generated once and cached.
    - ``data_spec``: the ``--data`` value, to put into cache keys.
    - ``tiny``: for tests only: the smallest configuration that runs every code path in seconds
      (a handful of samples and epochs); results are meaningless.
    - ``jobs``: how many independent training runs :meth:`run_all` may run at once, each in a
      process of its own with one torch thread (``--jobs``; 1: one after the other, here).
    - ``pool``: the harness's process pool for ``jobs > 1`` (None otherwise); studies never
      touch it, they call :meth:`run_all`.
    - ``data_dir``: where generated datasets are cached (the run cache's folder; None: none),
      for studies that generate a variant of the data (``common.study_data``).
    - ``ranks``: real processes for studies that simulate devices (``--ranks``). Only
      ``leakage`` uses it: with ``ranks > 1`` its device-dependent variants also train on that
      many gloo processes (torchrun) beside the virtual devices; 1 means virtual devices only.
    """

    quick: bool
    seeds: tuple[int, ...]
    out_dir: Path
    device: torch.device
    cache: RunCache
    progress: ProgressFactory
    dataset: Callable[[], DataSplit]
    data_spec: str = "mnist1d"
    tiny: bool = False
    ranks: int = 1
    jobs: int = 1
    pool: Any = field(default=None, compare=False, repr=False)
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("ranks", "jobs"):
            check_count(getattr(self, name), name, "RunContext")

    def run_all(self, tasks: Sequence[Task], desc: str = "runs") -> list[Any]:
        """The results of ``tasks``, in order: each task's cached result, else
        ``task.fn(ctx, *task.args)`` (stored in the cache as soon as it finishes).

        With ``jobs > 1`` the missing runs go to the harness's process pool (``task.fn`` must
        then be a module-level function and ``task.args`` picklable; the worker's context has
        no progress bars and no cache); otherwise they run here, one after the other. One
        progress bar ``desc`` counts the runs that were not cached. Two tasks with the same
        config run once. Ctrl-C cancels what has not started; what finished stays cached.
        """
        return run_tasks(self, list(tasks), desc)

    def plot_path(self, name: str) -> Path:
        """Where a study writes its plot ``name`` (put ``name`` into ``StudyResult.plots``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name


@dataclass(frozen=True)
class Study:
    """A registered study: its CLI name, a one-line description, and its run function.

    ``check(ctx)``, when given, raises ``ValueError`` for options the study cannot run with; the
    harness calls it for every selected study before any work. ``uses_ranks``: the study reads
    ``ctx.ranks`` (``--ranks`` > 1 with no such study selected is an error).
    """

    name: str
    description: str
    run: Callable[[RunContext], StudyResult]
    check: Callable[[RunContext], None] | None = None
    uses_ranks: bool = False

    @property
    def order(self) -> int:
        """Position of the study's module in ``STUDY_MODULES`` (the report's order)."""
        from .. import STUDY_MODULES

        module = getattr(self.run, "__module__", "").rsplit(".", 1)[-1]
        return STUDY_MODULES.index(module) if module in STUDY_MODULES else len(STUDY_MODULES)


_REGISTRY: dict[str, Study] = {}


def register_study(
    name: str, description: str, *, check: Callable[[RunContext], None] | None = None,
    uses_ranks: bool = False,
) -> Callable[[Callable[[RunContext], StudyResult]], Callable[[RunContext], StudyResult]]:
    """Decorator: register ``run`` as the study ``name`` (shown by ``rethinkbn studies``);
    ``check`` and ``uses_ranks``: see :class:`Study`.

    Studies are listed and run in the order of their modules in ``STUDY_MODULES`` (then in
    registration order). Registering a name twice is an error.
    """
    if not name or not name.replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"study names are lowercase words joined by '-', got {name!r}")

    def decorate(
        run: Callable[[RunContext], StudyResult],
    ) -> Callable[[RunContext], StudyResult]:
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise ValueError(f"study {name!r} is already registered by {_REGISTRY[name].run!r}")
        _REGISTRY[name] = Study(name=name, description=description, run=run, check=check,
                                uses_ranks=uses_ranks)
        return run

    return decorate


def registered_studies() -> list[Study]:
    """Every registered study, in report order (imports the study modules first)."""
    from .. import load_studies

    load_studies()
    return sorted(_REGISTRY.values(), key=lambda s: s.order)


def get_study(name: str) -> Study:
    """The study ``name``; a clear error listing the known names otherwise."""
    studies = {s.name: s for s in registered_studies()}
    if name not in studies:
        raise KeyError(f"unknown study {name!r}; expected one of: {', '.join(studies)}")
    return studies[name]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value) of a list of numbers."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("mean_std of an empty list")
    std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
    return float(t.mean()), std
