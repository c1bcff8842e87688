"""Runs the selected studies and writes the report: the engine behind ``rethinkbn reproduce``."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..contract.base import (
    ProgressFactory,
    RunContext,
    Study,
    check_count,
    get_study,
    registered_studies,
)
from ..contract.report import StudyOutcome, environment, write_outputs
from ..contract.variation import load as load_variation
from ..toolkit.data import DataSplit, check_data_spec, data_fingerprint, load_data
from .cache import RunCache
from .processes import cpu_threads
from .tasks import process_pool

__all__ = ["DatasetLoader", "LineProgress", "default_jobs", "git_commit", "reproduce",
           "reproduce_command", "run_studies", "tqdm_progress", "verdict_counts"]


def default_jobs() -> int:
    """``--jobs``'s default: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class DatasetLoader:
    """``ctx.dataset`` of the harness: the ``--data`` split, loaded once per process (picklable,
    so that a worker process loads it again from the cache directory, not the tensors)."""

    def __init__(self, spec: str, cache_dir: Path | None) -> None:
        self.spec, self.cache_dir = spec, cache_dir
        self.loaded: DataSplit | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "cache_dir": self.cache_dir, "loaded": None}

    def __call__(self) -> DataSplit:
        if self.loaded is None:
            self.loaded = load_data(self.spec, cache_dir=self.cache_dir)
        return self.loaded


class LineProgress:
    """A progress "bar" for logs (stderr not a terminal): one line per tenth of ``total`` (and
    the last), ``[rethinkbn] <desc>: <done>/<total> runs done, <elapsed> s``, on ``log``."""

    def __init__(self, desc: str | None, total: int, log: TextIO) -> None:
        self.desc, self.total, self.log = desc or "runs", total, log
        self.done, self.start, self.shown = 0, time.perf_counter(), 0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more runs done; print a line when another tenth (or all) is done."""
        self.done += n
        step = max(1, self.total // 10)
        if self.done >= self.total or self.done - self.shown >= step:
            self.shown = self.done
            print(f"[rethinkbn] {self.desc}: {self.done}/{self.total} runs done, "
                  f"{time.perf_counter() - self.start:.0f} s", file=self.log, flush=True)

    def close(self) -> None:
        """Nothing to tidy: every line is already written."""


def tqdm_progress(
    iterable: Any = None, *, desc: str | None = None, total: int | None = None,
    leave: bool = False,
) -> Any:
    """Progress bars on stderr: tqdm on a terminal; otherwise (a file or pipe) the bars over a
    known number of runs print :class:`LineProgress` lines instead, and the others nothing."""
    if not sys.stderr.isatty():
        if iterable is None and total is not None:
            return LineProgress(desc, total, sys.stderr)
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                disable=None)


def verdict_counts(outcomes: Sequence[StudyOutcome]) -> str:
    """The verdicts of ``outcomes`` counted by label, then the failed studies, in one phrase
    (``"3 reproduced, 1 not reproduced; 1 study failed"``), for the run's last line."""
    from collections import Counter

    labels = Counter(r.verdict.label for o in outcomes if o.result for r in o.result.summary)
    parts = ", ".join(f"{n} {label}" for label, n in labels.items()) or "no verdicts"
    failed = sum(1 for o in outcomes if o.error)
    return parts + (f"; {failed} stud{'y' if failed == 1 else 'ies'} failed" if failed else "")


def _eta(done: list[float], left: int) -> str:
    """``"; about N s left"``: the studies left at the mean time of those done (none at the end
    or before any is done)."""
    if not done or not left:
        return ""
    return f"; about {sum(done) / len(done) * left:.0f} s left"


def check_writable_dir(path: Path, flag: str) -> None:
    """Raise ``ValueError`` unless ``path`` is (or can be made) a directory this process can
    write in: it is created if missing and a probe file is written and removed (file
    permissions alone do not tell, e.g. for root or a read-only mount)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: expected a directory, got an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None


def reproduce_command(only: Sequence[str] | None, *, quick: bool, seeds: int | None,
                      device: str, data: str, ranks: int, threads: int | None,
                      jobs: int, tiny: bool = False) -> str:
    """The ``rethinkbn reproduce`` command line that gives these settings (for the report: a
    run says how to make it again; ``rethinkbn variation`` reruns it). Output and cache folders
    are left out: they do not change the numbers."""
    parts = ["rethinkbn reproduce"]
    parts += ["--tiny"] if tiny else []
    parts += ["--quick"] if quick else []
    parts += [f"--only {','.join(only)}"] if only else []
    parts += [f"--seeds {seeds}"] if seeds is not None else []
    parts += [f"--device {device}"] if device != "cpu" else []
    parts += [f"--data {data}"] if data != "mnist1d" else []
    parts += [f"--ranks {ranks}"] if ranks != 1 else []
    parts += [f"--threads {threads}"] if threads != 1 and threads is not None else []
    parts += [f"--jobs {jobs}"]
    return " ".join(parts)


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (``-dirty`` when it has uncommitted
    changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def reproduce(
    only: Sequence[str] | None = None,
    *,
    quick: bool = False,
    seeds: int | None = None,
    out_dir: Path | str = "rethinkbn-report",
    cache_dir: Path | str | None = None,
    device: str = "cpu",
    data: str = "mnist1d",
    progress: ProgressFactory = tqdm_progress,
    log: Any = None,
    tiny: bool = False,
    ranks: int = 1,
    threads: int | None = 1,
    jobs: int = 1,
) -> tuple[Path, list[StudyOutcome]]:
    """Run the studies ``only`` (all registered ones when None) and write the report.

    ``seeds``: how many seeds (default 1 in quick mode, 3 in full mode); the seeds are
    ``0 .. seeds-1``. Finished training runs are cached in ``cache_dir`` (default
    ``<out_dir>/cache``), so an interrupted reproduction resumes where it stopped. A study that
    raises is reported as failed and the others still run; Ctrl-C stops everything (what
    finished stays cached). A study named twice in ``only`` runs once (first order kept); an
    empty ``only`` is a ``ValueError``. With a ``data`` folder, every cache key holds the
    folder's content fingerprint (:func:`~rethinkbn_studies.toolkit.data.data_fingerprint`, in
    the report and results.json), so changed files are recomputed. ``tiny`` is for tests (see
    :class:`RunContext`). ``ranks``: real gloo processes for the ``leakage`` study's
    device-dependent variants (1: virtual devices only; only studies registered with
    ``uses_ranks`` take it, and each study's ``check`` validates it). Every option is checked
    before any work (``ValueError``, ``KeyError`` for an unknown study; ``--out`` and
    ``--cache`` must be writable directories). ``threads``: torch's CPU threads while the
    studies run (None: unchanged); the caller's setting is restored afterwards. ``jobs``:
    independent training runs at once, each in a spawned process with one torch thread
    (``--jobs``; 1: all in this process). Returns the report's path and the outcomes.

    Stages: :func:`select_studies` (names and counts checked), :func:`build_context` (the
    data, cache and device checked, every study's ``check``, the folders writable),
    :func:`run_studies` (the loop over the studies, in one process pool), then the
    environment (:func:`run_environment`) and ``write_outputs`` (report.md, results.json).
    """
    log = sys.stderr if log is None else log
    studies = select_studies(only, tiny=tiny, seeds=seeds, threads=threads, ranks=ranks,
                             jobs=jobs)
    n_seeds = seeds if seeds is not None else (1 if tiny else 3)
    ctx = build_context(studies, quick=quick, seeds=n_seeds, out_dir=Path(out_dir),
                        cache_dir=cache_dir, device=device, data=data, progress=progress,
                        tiny=tiny, ranks=ranks, jobs=jobs)
    with cpu_threads(threads), process_pool(jobs) as pool:
        ctx = dataclasses.replace(ctx, pool=pool)
        started = datetime.datetime.now(datetime.timezone.utc)
        start = time.perf_counter()
        ctx.dataset()  # a bad --data fails here, once, before any study starts
        outcomes = run_studies(ctx, studies, log)
        wall = time.perf_counter() - start
        env = run_environment(ctx, started, reproduce_command(
            [s.name for s in studies] if only else None, quick=quick, seeds=seeds,
            device=device, data=data, ranks=ranks, threads=threads, jobs=jobs, tiny=tiny))
        return write_outputs(ctx.out_dir, outcomes, env, wall), outcomes


def select_studies(only: Sequence[str] | None, *, tiny: bool, seeds: int | None,
                   threads: int | None, ranks: int, jobs: int) -> list[Study]:
    """The studies :func:`reproduce` runs, after checking the options that need no data:
    ``only`` (an empty list is a ``ValueError``, an unknown name a ``KeyError``, a repeated
    one runs once), ``seeds`` and ``threads`` (positive ints), ``ranks`` (> 1 only with a study
    that uses it) and ``jobs`` (a positive int)."""
    if only is not None and not list(only):
        raise ValueError("--only: no study named; expected comma-separated names (see "
                         "`rethinkbn studies`)")
    # A study named twice runs once, in the order first named.
    studies = [get_study(n) for n in dict.fromkeys(only)] if only else registered_studies()
    check_count(seeds if seeds is not None else (1 if tiny else 3), "--seeds", "reproduce")
    check_count(threads, "--threads", "reproduce", allow_none=True)
    if ranks != 1 and not any(s.uses_ranks for s in studies):
        users = [s.name for s in registered_studies() if s.uses_ranks]
        raise ValueError(f"--ranks {ranks}: only {', '.join(users)} uses it, and it is not "
                         f"selected ({', '.join(s.name for s in studies)})")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive int, got {jobs!r}")
    return studies


def build_context(studies: Sequence[Study], *, quick: bool, seeds: int, out_dir: Path,
                  cache_dir: Path | str | None, device: str, data: str,
                  progress: ProgressFactory, tiny: bool, ranks: int,
                  jobs: int) -> RunContext:
    """The :class:`RunContext` of a reproduction (no pool yet), after checking ``data``, the
    device, every study's ``check`` and that ``out_dir`` (and ``cache_dir``, when given) are
    writable directories. A ``--data`` folder's runs are keyed by what its files hold
    (:func:`~rethinkbn_studies.toolkit.data.data_fingerprint`), not by its path."""
    check_data_spec(data)
    cache_root = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available; use --device cpu")
    cache = RunCache(cache_root, data_fingerprint=data_fingerprint(data))
    ctx = RunContext(quick=quick, seeds=tuple(range(seeds)), out_dir=out_dir, device=dev,
                     cache=cache, progress=progress, dataset=DatasetLoader(data, cache.root),
                     data_spec=data, tiny=tiny, ranks=ranks, jobs=jobs, data_dir=cache.root)
    for study in studies:
        if study.check is not None:
            study.check(ctx)
    check_writable_dir(out_dir, "--out")
    load_variation(out_dir)  # a broken variation.json fails now, not after the studies
    if cache_dir is not None:
        check_writable_dir(cache_root, "--cache")
    return ctx


def run_studies(ctx: RunContext, studies: Sequence[Study], log: TextIO) -> list[StudyOutcome]:
    """Run every study of ``studies`` on ``ctx`` in turn, with a line on ``log`` before and
    after each (its time, the elapsed time and an estimate of what is left). A study that
    raises is a failed outcome (its traceback on ``log``) and the others still run."""
    outcomes: list[StudyOutcome] = []
    start = time.perf_counter()
    for k, study in enumerate(studies, 1):
        print(f"[rethinkbn] study {k} of {len(studies)}, {study.name}: "
              f"{study.description}", file=log, flush=True)
        t0 = time.perf_counter()
        try:
            result = study.run(ctx)
            outcomes.append(StudyOutcome(study, result, time.perf_counter() - t0))
        except Exception as err:  # one broken study must not cost the others' report
            traceback.print_exc(file=log)
            message = f"{type(err).__name__}: {err}"
            outcomes.append(StudyOutcome(study, None, time.perf_counter() - t0, message))
        times = [o.seconds for o in outcomes]
        print(f"[rethinkbn] study {k} of {len(studies)}, {study.name}, "
              f"{'failed' if outcomes[-1].error else 'done'} in {outcomes[-1].seconds:.0f} s "
              f"(elapsed {time.perf_counter() - start:.0f} s"
              f"{_eta(times, len(studies) - k)})", file=log, flush=True)
    return outcomes


def run_environment(ctx: RunContext, started: datetime.datetime,
                    command: str) -> dict[str, Any]:
    """results.json's ``environment`` of a finished run on ``ctx``: versions and settings
    (:func:`~rethinkbn_studies.contract.report.environment`), the data's fingerprint, ranks,
    jobs, the cache's hits and misses, when it started, the ``command`` and the commit."""
    env = environment(ctx.device, ctx.seeds, ctx.quick, ctx.data_spec)
    env["data_fingerprint"] = ctx.cache.data_fingerprint
    env["ranks"] = ctx.ranks
    env["jobs"] = ctx.jobs
    env["cache"] = {"dir": str(ctx.cache.root), "hits": ctx.cache.hits,
                    "misses": ctx.cache.misses}
    env["started"] = started.isoformat(timespec="seconds")
    env["command"] = command
    env["commit"] = git_commit()
    return env
