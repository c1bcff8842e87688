"""Processes and threads for the harness: the library's :mod:`rethinkbn.distributed.launch`.

The harness, the ``leakage`` study's real ranks (``torchrun``) and its worker pool use
:func:`run_command`, :func:`launch`, :func:`cpu_threads` and :func:`free_port` from there: the
tests and benchmarks of the library import them from the library, never from the harness.
"""

from __future__ import annotations

from rethinkbn.distributed.launch import cpu_threads, free_port, launch, run_command

__all__ = ["cpu_threads", "free_port", "launch", "run_command"]
