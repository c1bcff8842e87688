"""``rethinkbn variation``: rerun a committed reproduction on the kernels of other CPU builds.

:func:`run_variation` reads ``<reference>/results.json``, runs the command recorded there (the
same studies, mode, seeds and data) once per build of
:data:`~rethinkbn_studies.contract.variation.BUILDS` in a process of its own with that build's
environment, each into ``<work>/<build>`` with a cache of its own, and writes
``<reference>/variation.json`` (:func:`~rethinkbn_studies.contract.variation.compare`). A
later ``rethinkbn reproduce`` into ``<reference>`` (from its cache: seconds) puts the
variation into report.md and results.json.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rethinkbn.distributed.launch import run_command

from ..contract.variation import BUILDS, FILE, Build, compare

__all__ = ["build_capability", "run_variation"]


def build_capability(build: Build) -> str:
    """The vector capability torch picks in a process with ``build``'s environment (e.g.
    ``"AVX2"``), so that a build this machine cannot change to is named, not silently run."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **build.env},
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def _command(reference: dict[str, Any], out: Path) -> list[str]:
    recorded = reference["environment"].get("command")
    if not recorded or not recorded.startswith("rethinkbn reproduce"):
        raise ValueError("the reference results.json records no `rethinkbn reproduce` command "
                         "(written by an older version): rerun the reproduction first")
    args = shlex.split(recorded)[1:]
    return [sys.executable, "-m", "rethinkbn.cli", *args, "--out", str(out)]


def run_variation(reference_dir: Path | str, work_dir: Path | str, builds: list[str],
                  timeout_s: float, log: TextIO) -> Path:
    """Run the reference's command on each build of ``builds`` (names of
    :data:`~rethinkbn_studies.contract.variation.BUILDS`) and write ``variation.json`` into
    ``reference_dir``; returns its path. Raises ``ValueError`` for an unknown build, a
    reference folder without a readable results.json, a build whose capability equals this
    machine's own (nothing would change) or a build's reproduction that fails;
    ``subprocess.TimeoutExpired`` past ``timeout_s`` per build (its processes are stopped)."""
    unknown = [b for b in builds if b not in BUILDS]
    if unknown or not builds:
        raise ValueError(f"--builds: unknown build(s) {unknown or builds}; choose from "
                         f"{', '.join(BUILDS)}")
    reference_dir, work_dir = Path(reference_dir), Path(work_dir)
    try:
        reference = json.loads((reference_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{reference_dir / 'results.json'}: cannot read it ({err})") from None
    here = build_capability(Build("here", "", {}))
    ran: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    for k, name in enumerate(builds, 1):
        build = BUILDS[name]
        capability = build_capability(build)
        if capability == here:
            raise ValueError(f"build {name}: torch picks {capability} kernels with it, as it "
                             f"does here: this machine cannot emulate it")
        command = _command(reference, work_dir / name)
        print(f"[rethinkbn] variation: build {k} of {len(builds)}, {name} ({capability}): "
              f"{shlex.join(command[3:])}", file=log, flush=True)
        t0 = time.perf_counter()
        done = run_command(command, timeout_s, env={**os.environ, **build.env})
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise ValueError(f"build {name}: the reproduction exited {done.returncode}:\n"
                             f"{done.stderr[-2000:]}")
        results[name] = json.loads((work_dir / name / "results.json").read_text())
        ran[name] = {"description": build.description, "env": build.env,
                     "capability": capability, "wall_time_s": wall,
                     "commit": results[name]["environment"].get("commit")}
        print(f"[rethinkbn] variation: build {name} done in {wall:.0f} s", file=log, flush=True)
    env = reference["environment"]
    variation = {
        "date": started.date().isoformat(),
        "command": f"rethinkbn variation --reference {reference_dir.as_posix()} "
                   f"--builds {','.join(builds)}",
        "reference": {"command": env.get("command"), "started": env.get("started"),
                      "commit": env.get("commit"), "capability": here},
        "builds": ran,
        "claims": compare(reference, results),
    }
    path = reference_dir / FILE
    path.write_text(json.dumps(variation, indent=2) + "\n")
    return path
