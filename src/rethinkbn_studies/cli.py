"""The commands ``rethinkbn reproduce``, ``rethinkbn studies`` and ``rethinkbn variation``, which
run this harness.

The library's command (:mod:`rethinkbn.cli`) never imports this package: it finds these
commands through the entry point group ``rethinkbn.commands`` (``pyproject.toml``), calls
:func:`add_reproduce` / :func:`add_studies` with its sub-command parsers, and runs the handler
each sets as ``run``. Importing this module imports neither the harness nor the ``studies``
extra: the handlers check the extra first (one line naming what is missing), then import.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# The last line of the commands' help: their page of the documentation site.
DOCS_EPILOG = "Documentation: docs/reproduction.md in the repository (the docs site)."


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    """Add the ``reproduce`` sub-command to ``sub``; its handler is :func:`run_reproduce`."""
    rep = sub.add_parser(
        "reproduce",
        help="reproduce the paper's studies at small scale and write a report",
        description="Train small ResNets and write report.md, PNG plots and results.json. "
        "Finished training runs are cached in <out>/cache; rerun to resume after Ctrl-C.",
        epilog=DOCS_EPILOG,
    )
    rep.add_argument("--quick", action="store_true",
                     help="small budget: every study together in ~10 minutes on 2 CPU cores")
    rep.add_argument("--only", default=None, metavar="STUDY,...",
                     help="comma-separated study names (see `rethinkbn studies`)")
    rep.add_argument("--seeds", type=_positive_int, default=None,
                     help="number of seeds (default 3)")
    rep.add_argument("--out", default="rethinkbn-report",
                     help="output directory (default: rethinkbn-report)")
    rep.add_argument("--cache", default=None, help="run cache directory (default: <out>/cache)")
    rep.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    rep.add_argument("--data", default="mnist1d",
                     help="'mnist1d' (default, generated locally), 'mnist1d:<num_samples>', "
                     "or a folder with CIFAR-10's python pickles or one sub-folder per class")
    rep.add_argument("--threads", type=_positive_int, default=1,
                     help="torch CPU threads (default 1: the studies' small models gain little "
                     "from more, and several threads on a busy machine are much slower)")
    rep.add_argument("--jobs", type=_positive_int, default=None,
                     help="independent training runs at once, each in a process of its own "
                     "with one torch thread (default: the number of CPU cores)")
    rep.add_argument("--ranks", type=_positive_int, default=1,
                     help="only the 'leakage' study uses it: with N > 1 its per-device, shuffle "
                     "and SyncBN variants also train on N real gloo processes (torchrun) and "
                     "the report compares them with the virtual devices (default 1: virtual "
                     "devices only)")
    rep.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    rep.set_defaults(run=run_reproduce)


def add_variation(sub: argparse._SubParsersAction) -> None:
    """Add the ``variation`` sub-command to ``sub``; its handler is :func:`run_variation`."""
    var = sub.add_parser(
        "variation",
        help="rerun a reproduction with the kernels of other CPU builds and compare verdicts",
        description="Rerun the command recorded in <reference>/results.json once per build "
        "(other vector kernels, as on another machine) and write <reference>/variation.json; "
        "rerun that reproduce command into <reference> to put it into report.md.",
        epilog=DOCS_EPILOG,
    )
    var.add_argument("--reference", required=True,
                     help="a reproduction's output folder (its results.json)")
    var.add_argument("--builds", default="avx2,sse",
                     help="comma-separated builds: avx2 (no AVX-512), sse (scalar ATen, SSE4.1 "
                     "convolutions); default: both")
    var.add_argument("--work", default=None,
                     help="where the builds' reproductions go (default: <reference>/builds)")
    var.add_argument("--timeout", type=_positive_int, default=7200,
                     help="seconds one build's reproduction may take (default 7200)")
    var.set_defaults(run=run_variation)


def run_variation(args: argparse.Namespace) -> int:
    """``rethinkbn variation``: 0 done, 2 bad options or a failed build (one line on stderr),
    130 interrupted."""
    if _no_studies_extra(args.command):
        return 2
    from pathlib import Path

    from .infra.variation import run_variation as run

    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    work = Path(args.work) if args.work else Path(args.reference) / "builds"
    try:
        path = run(args.reference, work, builds, args.timeout, sys.stderr)
    except (ValueError, subprocess.TimeoutExpired) as err:
        return _usage_error(str(err))
    except KeyboardInterrupt:
        print("\nrethinkbn variation: interrupted", file=sys.stderr)
        return 130
    print(f"variation: {path}; rerun the reproduction into {args.reference} (from its cache) "
          "to put it into report.md")
    return 0


def add_studies(sub: argparse._SubParsersAction) -> None:
    """Add the ``studies`` sub-command to ``sub``; its handler is :func:`run_studies`."""
    sub.add_parser("studies", help="list the studies, one line each",
                   epilog=DOCS_EPILOG).set_defaults(run=run_studies)


# What `rethinkbn reproduce` imports beyond the library: its harness and the `studies` extra.
STUDIES_MODULES = ("rethinkbn_studies", "matplotlib", "mnist1d")


def _missing_studies_extra() -> list[str]:
    """The modules of :data:`STUDIES_MODULES` that cannot be imported (checked without
    importing them, before any work)."""
    import importlib.util

    missing = []
    for name in STUDIES_MODULES:
        try:
            found = sys.modules[name] is not None if name in sys.modules else (
                importlib.util.find_spec(name) is not None)
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _usage_error(message: str) -> int:
    """One line on stderr, argparse's way; the exit code 2 of a command-line error."""
    print(f"rethinkbn reproduce: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _no_studies_extra(command: str) -> bool:
    """Whether the ``studies`` extra is missing; if so, says so in one line on stderr."""
    missing = _missing_studies_extra()
    if missing:
        print(f"rethinkbn {command}: error: the reproduction harness needs the 'studies' "
              f"extra (missing: {', '.join(missing)}); install it with "
              "pip install 'rethinkbn[studies]'", file=sys.stderr)
    return bool(missing)


def run_studies(args: argparse.Namespace) -> int:
    """``rethinkbn studies``: one line per registered study; 0, or 2 without the extra."""
    if _no_studies_extra(args.command):
        return 2
    from .contract.base import registered_studies

    studies = registered_studies()
    width = max(len(s.name) for s in studies)
    for s in studies:
        print(f"{s.name:<{width}}  {s.description}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    """``rethinkbn reproduce``: run the studies and write the report.

    0: done; 1: the report was written but a study failed; 2: bad options or ``--data`` (one
    line on stderr; every option is checked before any work), or the ``studies`` extra is
    missing; 130: interrupted (finished runs stay cached).
    """
    if _no_studies_extra(args.command):
        return 2
    from .infra.harness import default_jobs, reproduce, verdict_counts

    only = None
    if args.only is not None:
        # Blank names are refused (",," must not mean "all"); a repeated one runs once.
        only = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        if not only:
            return _usage_error(f"--only {args.only!r}: no study named; expected "
                                "comma-separated names (see `rethinkbn studies`)")
    try:
        report, outcomes = reproduce(
            only,
            quick=args.quick,
            seeds=args.seeds,
            out_dir=args.out,
            cache_dir=args.cache,
            device=args.device,
            data=args.data,
            tiny=args.tiny,
            ranks=args.ranks,
            threads=args.threads,
            jobs=args.jobs if args.jobs is not None else default_jobs(),
        )
    except KeyError as err:  # an unknown study
        return _usage_error(err.args[0])
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # bad options or --data
        return _usage_error(str(err))
    except KeyboardInterrupt:
        print("\nrethinkbn reproduce: interrupted; finished runs are cached, rerun to resume.",
              file=sys.stderr)
        return 130
    print(f"report: {report} (verdicts: {verdict_counts(outcomes)})")
    return 1 if any(o.error for o in outcomes) else 0
