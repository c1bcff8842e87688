"""The `rethinkbn` command line: ``rethinkbn diagnose``, and ``rethinkbn reproduce`` and
``rethinkbn studies``, which run the reproduction harness (installed with the ``studies`` extra).

Every sub-command but ``diagnose`` comes from the entry point group ``rethinkbn.commands`` of the
installed packages: the harness, ``rethinkbn_studies``, registers ``reproduce`` and ``studies``
there (``pyproject.toml``), and this module never imports it. An entry point is
``name = "module:add [extra]"``; ``add(sub)`` adds its sub-command to the parsers ``sub`` and
sets ``run``, a function of the parsed arguments returning the exit code. A command whose module
does not import (its extra is not installed) still parses, and says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

COMMANDS_GROUP = "rethinkbn.commands"
# The documentation site's pages, under docs/ of the repository (`mkdocs serve` renders them);
# each command's help ends with its page (tests/test_docs_cli.py checks that they exist).
DOCS_ROOT = "docs/"
DOCS_PAGES = {"rethinkbn": "index.md", "diagnose": "guide/diagnose.md"}


def docs_epilog(command: str) -> str:
    """The last line of ``command``'s help: where its documentation page is."""
    return f"Documentation: {DOCS_ROOT}{DOCS_PAGES[command]} in the repository (the docs site)."


def build_parser() -> argparse.ArgumentParser:
    """The ``rethinkbn`` argument parser: the sub-commands of :data:`COMMANDS_GROUP` (by name)
    and ``diagnose``. Loading the group imports each command's module (only its parser)."""
    parser = argparse.ArgumentParser(
        prog="rethinkbn",
        description=__doc__.split("\n\n")[0].replace("``", "'").replace("`", ""),
        epilog=docs_epilog("rethinkbn"))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rethinkbn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_registered_commands(sub)
    _add_diagnose_parser(sub)
    return parser


def _add_registered_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every sub-command of the entry point group :data:`COMMANDS_GROUP`, in name order
    (the first of a repeated name); one whose module does not import becomes a placeholder
    that says what to install."""
    seen = set()
    for point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: p.name):
        if point.name in seen or point.name == "diagnose":
            continue
        seen.add(point.name)
        try:
            add = point.load()
        except ImportError as err:
            _add_unavailable(sub, point, err)
            continue
        add(sub)


def _add_unavailable(sub: argparse._SubParsersAction[argparse.ArgumentParser], point: EntryPoint,
                     err: ImportError) -> None:
    """A sub-command ``point.name`` that takes any arguments and fails in one line, naming the
    module that is missing and the extra of the entry point that installs it."""
    missing = err.name or point.module
    dist = point.dist.name if point.dist is not None else "rethinkbn"
    extra = point.extras[0] if point.extras else None
    if extra is None:
        message = f"its module {point.module} does not import (missing: {missing})"
    else:
        message = (f"this command needs the '{extra}' extra (missing: {missing}); install it "
                   f"with pip install '{dist}[{extra}]'")

    def unavailable(args: argparse.Namespace) -> int:
        print(f"rethinkbn {args.command}: error: {message}", file=sys.stderr)
        return 2

    parser = sub.add_parser(point.name, help=f"(not available: {message})")
    parser.set_defaults(run=unavailable, any_arguments=True)


def _add_diagnose_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    diag = sub.add_parser(
        "diagnose",
        help="measure the paper's BatchNorm pitfalls on your own model",
        description="SPEC is module:function (imported from the current directory, as uvicorn "
        "does); the function takes no argument and returns (model, train_loader) or (model, "
        "train_loader, eval_loader), or a dict of rethinkbn.diagnose's arguments (model, "
        "train_data, eval_data, forward, metric, input_key, group_ids, device).",
        epilog=docs_epilog("diagnose"),
    )
    diag.add_argument("spec", metavar="SPEC", help="module:function returning model and loaders")
    diag.add_argument("--checkpoint", default=None,
                      help="a state_dict file (or a dict holding one under 'state_dict' or "
                      "'model') loaded into the model first")
    diag.add_argument("--out", default=None, help="write report.md, diagnosis.json and "
                      "layer_distances.png to this directory")
    diag.add_argument("--num-samples", default=None,
                      help="samples per statistics pass (default: the budget of the options "
                      "SPEC returns, else 2048); the comparisons run on half as many")
    diag.add_argument("--metric", default=None, metavar="MODULE:FUNCTION",
                      help="metric(outputs, batch) -> the batch's mean metric, higher is better "
                      "(e.g. accuracy), imported as SPEC is; replaces a metric SPEC returns. "
                      "Without one the model-level metric checks are skipped (the report says "
                      "so)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code of the
    sub-command (2: bad arguments, one line on stderr)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "diagnose":
        return _diagnose(args)
    return args.run(args)


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


def _positive(text: str) -> int:
    """``--num-samples``: a positive integer, else _BadArgument."""
    if not text.strip().isdigit() or int(text) < 1:
        raise _BadArgument(f"--num-samples: expected a positive integer, got {text}")
    return int(text)


def _diagnose(args: argparse.Namespace) -> int:
    """``rethinkbn diagnose``: 0 done; 2 bad arguments (one line on stderr, before any work).
    An error raised inside the user's SPEC, metric or model keeps its traceback."""
    try:
        budget: dict[str, Any] = {} if args.num_samples is None else {
            "num_samples": _positive(args.num_samples)}
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

    result = diagnose(kwargs.pop("model"), kwargs.pop("train_data"), **budget, **kwargs)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(result.summary())
        if args.out is not None:
            print(f"report: {result.save(args.out)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
