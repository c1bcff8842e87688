"""Run every benchmark (`benchmarks/bench_*.py`) and print its table of ratios.

    python benchmarks/run.py              # all
    python benchmarks/run.py ghost fold   # only bench_ghost.py and bench_fold.py
    python benchmarks/run.py model --quick  # what follows the first option goes to each benchmark

Each benchmark measures its baseline in the same run and prints ratios, since absolute times on
shared machines mean little.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    first = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    argv, options = argv[:first], argv[first:]
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = [n for n in names if not argv or n in argv]
    unknown = sorted(set(argv) - set(names))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; expected some of {names}")
    for name in chosen:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        assert spec.loader is not None
        sys.argv = [f"bench_{name}.py", *options]
        spec.loader.exec_module(module)
        print(f"\n## {name}\n", flush=True)
        start = time.perf_counter()
        module.main()
        print(f"\n({name}: {time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
