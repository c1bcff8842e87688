"""Real multi-process gloo worlds for the tests (no mocks of torch.distributed).

:class:`GlooWorld` spawns ``world_size`` CPU processes once, joins them into a gloo process group
with a bounded timeout, and then runs any number of picklable functions on every rank::

    with GlooWorld(3) as world:
        results = world.run(check_something, 42)   # check_something(42) on ranks 0, 1, 2

Starting processes costs seconds, so one world serves many checks. A function must be importable
by the children (defined at module level in an importable module, e.g. a pytest test module).
Results travel back serialized with ``torch.save``, so tensors are fine.

Scripts run as ranks (benchmarks, examples) use :func:`rethinkbn.distributed.launch.launch`.
"""

from __future__ import annotations

import io
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rethinkbn.distributed.launch import end_process_group, free_port

__all__ = ["GlooWorld", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """What one rank's call produced: its return value, or the traceback of what it raised."""

    rank: int
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, tasks: Any, results: Any
) -> None:
    # One thread per process: the machines running tests are small and shared.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        while (task := tasks.get()) is not None:
            task_id, payload = task
            try:
                fn, args = _loads(payload)
                results.put((task_id, rank, _dumps(fn(*args)), None))
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises
                results.put((task_id, rank, None, traceback.format_exc()))
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process_group(timeout_s)  # every rank got the stop: none is left in a collective


class GlooWorld:
    """``world_size`` spawned CPU processes in one gloo process group.

    ``timeout_s`` is the process group's collective timeout: a collective that some rank never
    joins fails after that long instead of hanging. ``run`` waits at most ``run_timeout_s``.
    """

    def __init__(
        self, world_size: int, timeout_s: float = 30.0, run_timeout_s: float = 120.0
    ) -> None:
        if world_size < 1:
            raise ValueError(f"GlooWorld: world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.run_timeout_s = run_timeout_s
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        self._next_id = 0
        self._broken: str | None = None
        try:
            for p in self._procs:
                p.start()
        except BaseException:  # the ranks already started must not wait for the others
            self.close()
            raise

    def run_outcomes(self, fn: Callable[..., Any], *args: Any) -> list[Outcome]:
        """Call ``fn(*args)`` on every rank; one :class:`Outcome` per rank, in rank order."""
        if self._broken:
            raise RuntimeError(f"GlooWorld is unusable after an earlier failure:\n{self._broken}")
        task_id, self._next_id = self._next_id, self._next_id + 1
        payload = _dumps((fn, args))
        for q in self._tasks:
            q.put((task_id, payload))
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + self.run_timeout_s
        while len(outcomes) < self.world_size:
            try:
                tid, rank, value, error = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    why = f"ranks {dead} died" if dead else f"no answer in {self.run_timeout_s} s"
                    self._broken = f"{fn.__name__}: {why}"
                    self.close()
                    raise RuntimeError(f"GlooWorld.run({fn.__name__}): {why}") from None
                continue
            if tid == task_id:
                outcomes[rank] = Outcome(rank, None if value is None else _loads(value), error)
        ordered = [outcomes[r] for r in range(self.world_size)]
        if not all(o.ok for o in ordered):
            # A failed collective leaves the group in an unknown state.
            self._broken = "\n".join(f"rank {o.rank}:\n{o.error}" for o in ordered if o.error)
        return ordered

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Call ``fn(*args)`` on every rank and return the per-rank results (rank order).

        Raises ``RuntimeError`` with every failing rank's traceback if any rank raised.
        """
        outcomes = self.run_outcomes(fn, *args)
        errors = [o for o in outcomes if not o.ok]
        if errors:
            detail = "\n".join(f"--- rank {o.rank} ---\n{o.error}" for o in errors)
            raise RuntimeError(f"GlooWorld.run({fn.__name__}) failed on some ranks:\n{detail}")
        return [o.value for o in outcomes]

    def close(self) -> None:
        """Stop the processes (politely, then by force after a few seconds)."""
        started = [(q, p) for q, p in zip(self._tasks, self._procs, strict=True) if p.pid]
        for q, p in started:
            if p.is_alive():
                q.put(None)
        for _, p in started:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> GlooWorld:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
