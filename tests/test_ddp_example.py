"""examples/ddp_train.py runs under torchrun with 2 gloo processes, exactly as the README says;
the command runner behind it leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rethinkbn.distributed.launch import launch, run_command

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_example_trains_and_ends_with_identical_precise_statistics_on_every_rank():
    # `torchrun` is `python -m torch.distributed.run`; the module form needs no PATH lookup.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "examples/ddp_train.py", "--steps", "3"]
    done = run_command(command, 240, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 2: loss" in done.stdout
    assert "precise_bn: BatchNorm statistics identical on 2 ranks" in done.stdout


def test_a_command_past_its_timeout_is_killed_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The command starts a child that would sleep for a minute, then waits for it.
    script = (
        "import subprocess, sys; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); c.wait()"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, "-c", script], timeout_s=5)
    child = int(pid_file.read_text())
    # SIGKILL lands asynchronously and an orphan may stay a zombie until init reaps it.
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def test_launch_stops_every_rank_when_one_fails_and_names_it(tmp_path):
    # Rank 0 would wait in init_process_group for rank 1 (torch's default: 30 minutes).
    script = tmp_path / "fails.py"
    script.write_text(
        "import os, sys\n"
        "import torch.distributed as dist\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit('rank 1 gives up')\n"
        "dist.init_process_group('gloo')\n"
    )
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 \(exit 1\).*rank 1 gives up"):
        launch(script, 2, timeout_s=120)


def _running(pid):
    """Whether ``pid`` is a live process (a zombie has finished running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


END_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from rethinkbn.distributed.launch import end_process_group
end_process_group()  # no process group: nothing to do
dist.init_process_group('gloo')
rank = dist.get_rank()
x = torch.full((4,), float(rank))
dist.all_reduce(x)
for round in range(2):  # twice in one process (each end meets under keys of its own)
    if round:  # a file store: a TCP store on the old port may still be closing on rank 0
        store = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'round1.store')
        dist.init_process_group('gloo', init_method='file://' + store, rank=rank, world_size=2)
    if rank == 1 and sys.argv[1] == 'late':
        time.sleep(1.0)
    if rank == 1 and sys.argv[1] == 'absent':
        os._exit(0)  # leaves without meeting the others (and skips the shutdown gloo races)
    started = time.monotonic()
    try:
        end_process_group(timeout_s=float(sys.argv[2]))
    except TimeoutError as error:
        print('TimeoutError:', error)
        sys.exit(0)
    print(f'round {round} ended: waited {time.monotonic() - started:.2f} s, '
          f'initialized {dist.is_initialized()}, sum {x.tolist()}')
"""


@pytest.mark.parametrize("mode", ["late", "absent"])
def test_end_process_group_meets_every_rank_then_destroys_the_group(tmp_path, mode):
    script = tmp_path / "end.py"
    script.write_text(END_SCRIPT)
    outputs = launch(script, 2, args=[mode, "1.5" if mode == "absent" else "60"], timeout_s=120)
    if mode == "absent":
        # Rank 0 waits for rank 1, which never comes: a TimeoutError naming the wait, not a hang.
        assert "TimeoutError: end_process_group: not every one of the 2 ranks arrived within " \
               "1.5 s" in outputs[0]
        return
    for rank, out in enumerate(outputs):
        lines = out.splitlines()
        assert [line.split(":")[0] for line in lines] == ["round 0 ended", "round 1 ended"], out
        assert all("initialized False, sum [1.0, 1.0, 1.0, 1.0]" in line for line in lines)
        if rank == 0:  # rank 0 waited for the late rank 1, in both rounds
            assert all(float(line.split("waited ")[1].split(" s")[0]) >= 0.9 for line in lines)
