"""Run every benchmark (`benchmarks/bench_*.py`) and print its table of ratios.

    python benchmarks/run.py              # all
    python benchmarks/run.py ghost fold   # only bench_ghost.py and bench_fold.py
    python benchmarks/run.py model --quick  # what follows the first option goes to each benchmark
    python benchmarks/run.py fold precise --save  # also commit-ready: benchmarks/results/<name>.md

Each benchmark measures its baseline in the same run and prints ratios, since absolute times on
shared machines mean little. ``ghost`` and ``model`` write their own result files; ``--save``
(taken by this script, not passed on) writes what each other benchmark printed, under a line that
names the command, the date and the torch version, to ``benchmarks/results/<name>.md``. The docs
site shows every file there (docs/benchmarks.md), so a table the docs show is one a run printed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import sys
import time
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Benchmarks that write their own result file (a header with their arguments, profiles).
WRITE_THEIR_OWN = ("ghost", "model")


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.copy = out, io.StringIO()

    def write(self, text: str) -> int:
        self.out.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.out.flush()


def _save(name: str, options: list[str], printed: str) -> Path:
    import torch

    command = " ".join(["python benchmarks/run.py", name, *options])
    today = datetime.date.today().isoformat()
    path = RESULTS / f"{name}.md"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(f"`{command}` on {today}, torch {torch.__version__}, CPU.\n\n"
                    f"{printed.strip()}\n")
    return path


def main(argv: list[str]) -> None:
    save = "--save" in argv
    argv = [a for a in argv if a != "--save"]
    first = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    argv, options = argv[:first], argv[first:]
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = [n for n in names if not argv or n in argv]
    unknown = sorted(set(argv) - set(names))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; expected some of {names}")
    if save and not argv:
        raise SystemExit("--save: name the benchmarks to save (not ghost or model, which write "
                         "their own files)")
    if save and set(chosen) & set(WRITE_THEIR_OWN):
        raise SystemExit(f"--save: {sorted(set(chosen) & set(WRITE_THEIR_OWN))} write their own "
                         "result files; run them without --save")
    for name in chosen:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        assert spec.loader is not None
        sys.argv = [f"bench_{name}.py", *options]
        spec.loader.exec_module(module)
        print(f"\n## {name}\n", flush=True)
        start = time.perf_counter()
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee) if save else contextlib.nullcontext():
            module.main()
        print(f"\n({name}: {time.perf_counter() - start:.1f} s)", flush=True)
        if save:
            path = _save(name, options, tee.copy.getvalue())
            print(f"written to {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
