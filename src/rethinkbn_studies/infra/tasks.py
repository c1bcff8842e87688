"""A study's training runs: each cached, the missing ones run here or in a process pool.

:meth:`RunContext.run_all <rethinkbn_studies.contract.base.RunContext.run_all>` hands its
:class:`Task` list to :func:`run_tasks`; the harness opens the pool (:func:`process_pool`) once
for every study. This module knows the cache, not the studies' contract: the context it takes
is any dataclass with ``cache``, ``progress``, ``pool`` and ``jobs`` (a ``RunContext``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .cache import RunCache, config_key

__all__ = ["Task", "no_progress", "process_pool", "run_tasks"]


@dataclass(frozen=True)
class Task:
    """One independent run for :meth:`RunContext.run_all`: its cache ``config`` (everything that
    changes the result, seed included) and ``fn(ctx, *args)``, which computes it."""

    config: dict[str, Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


def no_progress(iterable: Any = None, **kwargs: Any) -> Any:
    """The progress factory of worker processes: draws nothing."""
    return iterable


def _worker_init() -> None:
    torch.set_num_threads(1)


def _call(ctx: Any, task: Task) -> Any:
    return task.fn(ctx, *task.args)


def run_tasks(ctx: Any, tasks: list[Task], desc: str) -> list[Any]:
    """:meth:`RunContext.run_all`: cached results, the missing ones run here or in the pool,
    under one progress bar ``desc`` over the missing runs (none when all are cached)."""
    keys = [config_key(t.config) for t in tasks]
    results: dict[str, Any] = {}
    missing: dict[str, Task] = {}
    for key, task in zip(keys, tasks, strict=True):
        if key in results or key in missing:
            continue
        stored = ctx.cache.get(task.config)
        if stored is None:
            missing[key] = task
        else:
            ctx.cache.hits += 1
            results[key] = stored
    bar = ctx.progress(None, desc=desc, total=len(missing), leave=False) if missing else None

    def finished(key: str, result: Any) -> None:
        results[key] = result
        ctx.cache.put(missing[key].config, result)
        ctx.cache.misses += 1
        if bar is not None and hasattr(bar, "update"):
            bar.update(1)

    futures: dict[Future[Any], str] = {}
    try:
        if ctx.pool is None or ctx.jobs == 1:
            for key, task in missing.items():
                finished(key, _call(ctx, task))
        else:
            worker = dataclasses.replace(ctx, progress=no_progress, cache=RunCache(None),
                                         pool=None)
            futures = {ctx.pool.submit(_call, worker, t): k for k, t in missing.items()}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(futures[future], future.result())
    finally:
        for future in futures:
            future.cancel()
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    return [results[k] for k in keys]


@contextmanager
def process_pool(jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``jobs`` spawned processes with one torch thread each (None for 1 job); shut
    down on exit, cancelling what has not started."""
    if jobs == 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
