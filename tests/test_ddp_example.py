"""examples/ddp_train.py runs under torchrun with 2 gloo processes, exactly as the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_example_trains_and_ends_with_identical_precise_statistics_on_every_rank():
    # `torchrun` is `python -m torch.distributed.run`; the module form needs no PATH lookup.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "examples/ddp_train.py", "--steps", "3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 2: loss" in done.stdout
    assert "precise_bn: BatchNorm statistics identical on 2 ranks" in done.stdout
