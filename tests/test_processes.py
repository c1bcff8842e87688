"""Process handling behind `rethinkbn reproduce --ranks 2`: no worker outlives Ctrl-C or a timeout.

Real processes only. torch elastic (torchrun) starts its workers in sessions of their own, so
killing torchrun's process group does not reach them: each test marks its processes with a unique
string in their command line and, afterwards, looks for that string in every process's
``/proc/<pid>/cmdline``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rethinkbn.distributed.launch import run_command

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")


def _marked(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _survivors(marker: str, wait_s: float = 10.0) -> list[int]:
    """The marked processes still alive after ``wait_s`` (SIGKILL lands asynchronously); they
    are killed, so that a failing test leaves nothing running."""
    deadline = time.monotonic() + wait_s
    while (alive := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _wait_for(path: Path, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(path.glob("ready-*"))) < count:
        assert time.monotonic() < deadline, f"the workers did not start in {timeout_s} s"
        time.sleep(0.1)


def _torchrun(tmp_path: Path, marker: str) -> list[str]:
    """torchrun with 2 workers that report they started, then sleep for ten minutes."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], 'ready-' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(600)\n"
    )
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(worker), str(tmp_path), marker]


def test_ctrl_c_stops_torchrun_and_its_workers(tmp_path):
    marker = f"rethinkbn-test-{uuid.uuid4().hex}"
    command = _torchrun(tmp_path, marker)
    parent_code = (
        # Ctrl-C reaches a terminal's foreground job with SIGINT's default disposition; a SIGINT
        # ignored by the test process would be inherited (Python then installs no handler) and
        # must not decide this test.
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from rethinkbn.distributed.launch import run_command\n"
        "try:\n"
        f"    run_command({command!r}, timeout_s=600)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", parent_code, marker], env=env)
    try:
        _wait_for(tmp_path, 2, timeout_s=180)
        assert len(_marked(marker)) >= 4  # the parent, torchrun and its two workers
        parent.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends the foreground job
        assert parent.wait(timeout=120) == 130
    finally:
        parent.kill()
        parent.wait()
        survivors = _survivors(marker)
    assert survivors == []


def test_a_command_past_its_timeout_loses_children_in_other_sessions_too(tmp_path):
    # Like torch elastic: the command starts a child in a session of its own, then waits.
    marker = f"rethinkbn-test-{uuid.uuid4().hex}"
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', sys.argv[1]],\n"
        "                 start_new_session=True)\n"
        "open(sys.argv[2] + '/ready-0', 'w').close()\n"
        "time.sleep(600)\n"
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            run_command([sys.executable, "-c", script, marker, str(tmp_path)], timeout_s=8,
                        grace_s=2)
        assert (tmp_path / "ready-0").exists()  # the child had started before the timeout
    finally:
        survivors = _survivors(marker)
    assert survivors == []
