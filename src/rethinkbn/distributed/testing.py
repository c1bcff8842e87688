"""Real multi-process gloo worlds for tests and benchmarks (no mocks of torch.distributed).

:class:`GlooWorld` spawns ``world_size`` CPU processes once, joins them into a gloo process group
with a bounded timeout, and then runs any number of picklable functions on every rank::

    with GlooWorld(3) as world:
        results = world.run(check_something, 42)   # check_something(42) on ranks 0, 1, 2

Starting processes costs seconds, so one world serves many checks. A function must be importable
by the children (defined at module level in an importable module, e.g. a pytest test module).
Results travel back serialized with ``torch.save``, so tensors are fine.

:func:`launch` runs a script on ``world_size`` processes with the environment torchrun would give
them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...), for benchmarks and
examples that initialize with ``init_process_group("gloo")``. :func:`run_command` runs one command
line (e.g. ``torchrun``) to completion. Both start every process in a session of its own and,
when they time out or are interrupted, stop it with SIGTERM, then SIGKILL its process group and
every process it started (torch elastic's workers live in sessions of their own), so no worker
outlives them.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["GlooWorld", "Outcome", "free_port", "launch", "run_command"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    finally:
        dist.destroy_process_group()


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


def _process_start(pid: int) -> str | None:
    """``pid``'s start time from ``/proc`` (None when it is gone or there is no ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (read from ``/proc``; empty where there is none), with
    its start time, so that a pid the system reuses later is never mistaken for one of them."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        start = _process_start(child)
        if start is not None and child not in found:
            found[child] = start
            todo.extend(parents.get(child, []))
    return found


def _stop(proc: subprocess.Popen[str], grace_s: float) -> None:
    """Stop ``proc`` (started in a session of its own) and every process it started.

    SIGTERM first, then up to ``grace_s`` seconds to exit: torchrun needs that time to stop its
    workers, which torch elastic starts in sessions of their own (SIGKILL would stop torchrun
    before it forwards anything). Then SIGKILL for whatever is left: ``proc``'s process group
    and every descendant seen before the SIGTERM (found through ``/proc``, whatever its session).
    """
    if proc.poll() is None:
        family = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: kill now
            pass
        family.update(_descendants(proc.pid))
    else:
        family = {}
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has exited already
        pass
    for pid, start in family.items():
        if _process_start(pid) == start:  # still the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def _read(file: Any) -> str:
    file.seek(0)
    return file.read()


def run_command(
    command: Sequence[str],
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    grace_s: float = 45.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to completion; its exit code and text stdout / stderr.

    The command runs in a new session. When it runs past ``timeout_s`` or the caller is
    interrupted (Ctrl-C), it gets SIGTERM and ``grace_s`` seconds to stop what it started
    (torchrun stops its workers, in torch's default 30 s), then it and every process it started
    are killed, whatever their session. Past the timeout this raises
    ``subprocess.TimeoutExpired``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(command), stdout=out, stderr=err, text=True, env=env,
                                cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        finally:
            _stop(proc, grace_s)
        return subprocess.CompletedProcess(list(command), proc.returncode, _read(out),
                                           _read(err))


def launch(
    script: str | os.PathLike[str],
    world_size: int,
    args: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> list[str]:
    """Run ``python script *args`` as ranks ``0..world_size-1``; returns each rank's stdout.

    Raises ``RuntimeError`` with the failing ranks' stderr if a rank exits non-zero (the other
    ranks, which would wait for it, are killed at once and listed too), and
    ``subprocess.TimeoutExpired`` (after killing every rank) past ``timeout_s``. Output goes to
    temporary files, not pipes: a rank that writes much while another is waited on cannot block.
    """
    port = free_port()
    procs: list[subprocess.Popen[str]] = []
    with ExitStack() as files:
        logs = [(files.enter_context(tempfile.TemporaryFile("w+")),
                 files.enter_context(tempfile.TemporaryFile("w+"))) for _ in range(world_size)]
        try:
            for rank, (out, err) in enumerate(logs):
                env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"}
                procs.append(subprocess.Popen(
                    [sys.executable, os.fspath(script), *args], env=env, text=True,
                    stdout=out, stderr=err, start_new_session=True,
                ))
            deadline = time.monotonic() + timeout_s
            while None in (codes := [p.poll() for p in procs]):
                # A rank that failed leaves the others waiting for it until their own timeout.
                if any(code not in (None, 0) for code in codes):
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(os.fspath(script), timeout_s)
                time.sleep(0.05)
        finally:
            for p in procs:
                _stop(p, grace_s=5.0)
        outputs = [(_read(out), _read(err)) for out, err in logs]
    pairs = enumerate(zip(procs, outputs, strict=True))
    failed = [(r, p.returncode, err) for r, (p, (_, err)) in pairs if p.returncode != 0]
    if failed:
        detail = "\n".join(f"--- rank {r} (exit {code}) ---\n{err}" for r, code, err in failed)
        raise RuntimeError(f"launch({script}, world_size={world_size}) failed:\n{detail}")
    return [out for out, _ in outputs]
