"""The `rethinkbn` command line: ``rethinkbn reproduce``, ``rethinkbn studies`` and
``rethinkbn diagnose``.

The first two run the reproduction harness, the separate package ``rethinkbn_studies`` (installed
with the ``studies`` extra), imported only when one of them runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``rethinkbn`` argument parser: sub-commands ``reproduce`` and ``studies``."""
    parser = argparse.ArgumentParser(
        prog="rethinkbn", description=__doc__.replace("``", "'"))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rethinkbn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "reproduce",
        help="reproduce the paper's studies at small scale and write a report",
        description="Train small ResNets and write report.md, PNG plots and results.json. "
        "Finished training runs are cached in <out>/cache; rerun to resume after Ctrl-C.",
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
    sub.add_parser("studies", help="list the studies, one line each")
    _add_diagnose_parser(sub)
    return parser


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


def _add_diagnose_parser(sub: argparse._SubParsersAction) -> None:
    diag = sub.add_parser(
        "diagnose",
        help="measure the paper's BatchNorm pitfalls on your own model",
        description="SPEC is module:function (imported from the current directory, as uvicorn "
        "does); the function takes no argument and returns (model, train_loader) or (model, "
        "train_loader, eval_loader), or a dict of rethinkbn.diagnose's arguments (model, "
        "train_data, eval_data, forward, metric, input_key, group_ids, device).",
    )
    diag.add_argument("spec", metavar="SPEC", help="module:function returning model and loaders")
    diag.add_argument("--checkpoint", default=None,
                      help="a state_dict file (or a dict holding one under 'state_dict' or "
                      "'model') loaded into the model first")
    diag.add_argument("--out", default=None, help="write report.md, diagnosis.json and "
                      "layer_distances.png to this directory")
    diag.add_argument("--num-samples", default="2048", help="samples per pass (default 2048)")
    diag.add_argument("--metric", default=None, metavar="MODULE:FUNCTION",
                      help="metric(outputs, batch) -> the batch's mean metric, higher is better "
                      "(e.g. accuracy), imported as SPEC is; replaces a metric SPEC returns. "
                      "Without one the model-level metric checks are skipped (the report says "
                      "so)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    0: done; 1: the report was written but a study failed; 2: bad options or ``--data`` (one
    line on stderr; every option is checked before any work); 130: interrupted (finished runs
    stay cached).
    """
    args = build_parser().parse_args(argv)
    if args.command == "diagnose":
        return _diagnose(args)
    missing = _missing_studies_extra()
    if missing:
        print(f"rethinkbn {args.command}: error: the reproduction harness needs the 'studies' "
              f"extra (missing: {', '.join(missing)}); install it with "
              "pip install 'rethinkbn[studies]'", file=sys.stderr)
        return 2
    # The library never imports its reproduction harness; only this command does.
    from rethinkbn_studies.base import registered_studies

    if args.command == "studies":
        studies = registered_studies()
        width = max(len(s.name) for s in studies)
        for s in studies:
            print(f"{s.name:<{width}}  {s.description}")
        return 0

    from rethinkbn_studies.harness import default_jobs, reproduce, verdict_counts

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


class _BadArgument(ValueError):
    """A command-line argument of ``rethinkbn diagnose`` that is wrong: one line, exit 2. Errors
    raised inside the user's own code are not these and keep their traceback."""


def _load_spec(spec: str, option: str = "SPEC") -> Callable[[], Any]:
    """The function named by ``module:function``, imported with the current directory first on
    ``sys.path``; _BadArgument for a SPEC that does not name one. An error raised while the
    module itself runs propagates with its traceback."""
    module_name, _, attr = spec.partition(":")
    if not all(part.isidentifier() for part in [*module_name.split("."), attr]):
        raise _BadArgument(f"{option} {spec!r}: expected module:function, e.g. "
                           "mypkg.train:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the module exists and its own imports fail: the user wants the traceback
        raise _BadArgument(f"{option} {spec!r}: no module named {module_name!r} in "
                           f"{os.getcwd()} or on sys.path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise _BadArgument(f"{option} {spec!r}: {module_name} has no function {attr!r}")
    return fn


def _diagnose_arguments(spec: str, made: Any) -> dict[str, Any]:
    if isinstance(made, dict):
        kwargs = dict(made)
    elif isinstance(made, (tuple, list)) and len(made) in (2, 3):
        kwargs = dict(zip(["model", "train_data", "eval_data"], made, strict=False))
    else:
        raise _BadArgument(f"SPEC {spec!r} returned a {type(made).__name__}; expected (model, "
                           "train_loader[, eval_loader]) or a dict of diagnose's arguments")
    import inspect

    from torch import nn

    from .diagnosis import diagnose
    from .layers import is_batchnorm

    known = set(inspect.signature(diagnose).parameters) - {"num_samples", "progress"}
    if "model" not in kwargs or "train_data" not in kwargs or set(kwargs) - known:
        raise _BadArgument(f"SPEC {spec!r} returned a dict with keys {sorted(kwargs)}; expected "
                           f"'model', 'train_data' and any of {sorted(known - {'model'})}")
    model = kwargs["model"]
    if not isinstance(model, nn.Module):
        raise _BadArgument(f"SPEC {spec!r} returned a {type(model).__name__} as the model; "
                           "expected a torch.nn.Module")
    if not any(is_batchnorm(m) for m in model.modules()):
        raise _BadArgument(f"SPEC {spec!r} returned a {type(model).__name__} without any "
                           "BatchNorm layer: there is nothing to diagnose")
    return kwargs


def _unreadable(path: str, err: Exception) -> str:
    """What is wrong with a checkpoint torch.load(weights_only=True) refused, in one line
    (never torch's advice to load it with weights_only=False, which would run its code)."""
    import pickle
    import re
    import zipfile

    text = str(err)
    blocked = re.search(r"GLOBAL (\S+)", text)
    if blocked:
        return (f"holds a Python object ({blocked.group(1)}) that only running code could "
                "rebuild, and files read here never run code; save the model's state_dict() "
                "(tensors and plain containers) instead")
    if os.path.getsize(path) == 0:
        return "is empty"
    with open(path, "rb") as f:
        head = f.read(2)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and "weights_only" not in ln and "file an issue" not in ln]
    detail = lines[-1].split(". ")[0] if lines else type(err).__name__  # torch's first sentence
    if head == b"PK" and not zipfile.is_zipfile(path):
        return ("is a truncated or damaged checkpoint (a zip archive, torch.save's format, "
                f"that does not read to its end: {detail})")
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        return ("is not a PyTorch checkpoint (torch.save writes a zip archive; this file is "
                "neither that nor a legacy pickle)")
    kind = "damaged" if isinstance(err, (pickle.UnpicklingError, EOFError, RuntimeError)) \
        else "unreadable"
    return f"is {kind}: {detail}"


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _load_checkpoint(model: Any, path: str) -> None:
    """Load the state_dict at ``path`` into ``model``, checked first (keys, shapes) so that a
    checkpoint that does not fit leaves the model as it was; _BadArgument says what does not
    fit."""
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad --checkpoint
        raise _BadArgument(f"--checkpoint {path}: {_unreadable(path, err)}") from None
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise _BadArgument(f"--checkpoint {path}: holds a {type(blob).__name__}, not a "
                           "state_dict (a dict of tensors, possibly under 'state_dict' or "
                           "'model')")
    expected = model.state_dict()
    missing = [k for k in expected if k not in blob]
    unexpected = [k for k in blob if k not in expected]
    shapes = [f"{k!r} is {tuple(blob[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in blob and blob[k].shape != v.shape]
    problems = ([f"missing keys {_listed(missing)}"] if missing else []) + (
        [f"unexpected keys {_listed(unexpected)}"] if unexpected else []) + shapes[:3]
    if problems:
        raise _BadArgument(f"--checkpoint {path} does not fit {type(model).__name__} "
                           f"({len(expected)} keys): {'; '.join(problems)}")
    model.load_state_dict(blob)


def _diagnose(args: argparse.Namespace) -> int:
    """``rethinkbn diagnose``: 0 done; 2 bad arguments (one line on stderr, before any work).
    An error raised inside the user's SPEC, metric or model keeps its traceback."""
    try:
        num_samples = int(args.num_samples) if args.num_samples.strip().isdigit() else 0
        if num_samples < 1:
            raise _BadArgument(f"--num-samples: expected a positive integer, got "
                               f"{args.num_samples}")
        if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
            raise _BadArgument(f"--checkpoint {args.checkpoint}: no such file")
        if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise _BadArgument(f"--out {args.out}: exists and is not a directory")
        factory = _load_spec(args.spec)
        metric = None if args.metric is None else _load_spec(args.metric, "--metric")
        made = factory()  # the user's code: its own errors propagate with their traceback
        kwargs = _diagnose_arguments(args.spec, made)
        if metric is not None:
            kwargs["metric"] = metric
        if args.checkpoint is not None:
            _load_checkpoint(kwargs["model"], args.checkpoint)
    except _BadArgument as err:
        print(f"rethinkbn diagnose: {err}", file=sys.stderr)
        return 2
    from .diagnosis import diagnose

    result = diagnose(kwargs.pop("model"), kwargs.pop("train_data"), num_samples=num_samples,
                      **kwargs)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(result.summary())
        if args.out is not None:
            print(f"report: {result.save(args.out)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
