"""Run code on several local processes, as torchrun would, and stop every one of them.

:func:`launch` runs a script on ``world_size`` processes with the environment torchrun would give
them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...), for scripts that
initialize with ``init_process_group("gloo")``: a way to try a SyncBatchNorm or shuffled model on
2-4 CPU processes of one machine. :func:`run_command` runs one command line (e.g. ``torchrun``)
to completion. Both start every process in a session of its own and, when they time out or are
interrupted, stop it with SIGTERM, then SIGKILL its process group and every process it started
(torch elastic's workers live in sessions of their own), so no worker outlives them.
:func:`free_port` picks a port for ``MASTER_PORT``; :func:`cpu_threads` sets torch's CPU threads
for a block; :func:`end_process_group` ends a rank's process group so that gloo cannot abort the
process at exit.

Only the standard library and torch. The reproduction harness (``rethinkbn_studies``), the
tests and the benchmarks use this module; it is not imported by ``rethinkbn.distributed``'s
``__init__`` (import it as ``rethinkbn.distributed.launch``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

__all__ = ["cpu_threads", "end_process_group", "free_port", "launch", "run_command"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Within the block torch uses ``n`` CPU threads (None: unchanged); restored on exit.

    Small models gain little from more than one intra-op thread (it costs more in
    synchronization than it gains), and on a shared 2-core machine it oversubscribes the cores.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_ENDS = [0]  # how many times this process has ended a group: each end meets under keys of its own


def end_process_group(timeout_s: float = 300.0) -> None:
    """Wait until every rank gets here, then destroy the default process group.

    Call it in place of ``dist.barrier(); dist.destroy_process_group()`` at the end of a script.
    A gloo worker thread frees a collective's tensors just *after* it reports the collective
    done, and a finished ``barrier`` holds on to the collectives issued before it; when the
    interpreter has begun to shut down by then, freeing a tensor that Python once held aborts
    the process ("terminate called without an active exception"; about one run in ten of
    ``examples/ddp_train.py`` on a loaded 2-core machine). So the ranks meet here through the
    process group's store (no collective, so nothing is left for a worker thread to free), which
    also means that no rank destroys the group while a peer's last collective is in flight.
    Rank 0, which hosts the store under ``env://`` without torchrun, leaves last. Raises
    TimeoutError when a rank does not arrive within ``timeout_s``; does nothing when no process
    group is initialized.
    """
    if not dist.is_initialized():
        return
    _ENDS[0] += 1
    key = f"rethinkbn/end_process_group/{_ENDS[0]}"
    store = distributed_c10d._get_default_store()
    world = dist.get_world_size()
    deadline = time.monotonic() + timeout_s

    def wait_for(counter: str) -> None:
        while int(store.add(counter, 0)) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"end_process_group: not every one of the {world} ranks "
                                   f"arrived within {timeout_s:g} s")
            time.sleep(0.001)

    store.add(f"{key}/arrived", 1)
    wait_for(f"{key}/arrived")
    store.add(f"{key}/left", 1)
    if dist.get_rank() == 0:
        wait_for(f"{key}/left")
    dist.destroy_process_group()
