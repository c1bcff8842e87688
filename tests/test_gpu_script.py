"""benchmarks/gpu.sh without a GPU: a dry run that skips every CUDA step, one line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures for real")
def test_gpu_script_without_cuda_is_a_dry_run_that_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    skips = [line for line in done.stdout.splitlines() if line.startswith("skip: ")]
    assert len(skips) == 4
    assert any("pytest -m cuda" in line for line in skips)
    assert any("SyncBatchNorm" in line for line in skips)
    assert not (tmp_path / "out").exists()  # nothing written, no number made up


def test_gpu_tables_without_cuda_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the tables are measured")
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("gpu_tables.py")), "--out",
                           str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and "skipped" in done.stdout and not out.exists()
