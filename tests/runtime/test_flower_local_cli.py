"""``fedmm-secure flower local`` as a user runs it: interrupted with Ctrl-C mid-run, it must stop
every process it started (SuperLink, SuperNodes, workers, and what Flower starts below them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedmm_secure.runtime.flower_local import pids_with_env  # noqa: E402


def _marked(marker: str) -> list[int]:
    """Pids of live processes whose environment carries ``marker`` (they all inherit it)."""
    return pids_with_env(marker, "1")


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{pid} state={stat[0]} ppid={stat[1]} pgid={stat[2]} sid={stat[3]} {cmd}"
    except OSError:
        return f"{pid} (gone)"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_ctrl_c_mid_run_leaves_no_process(tmp_path):
    marker = f"FEDMM_TEST_MARKER_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    out = tmp_path / "run"
    cli = Path(sys.executable).parent / "fedmm-secure"
    # A user at a terminal has SIGINT at its default; a test run launched in the background by a
    # non-interactive shell inherits it ignored (then Python never raises KeyboardInterrupt and
    # the run just completes), so the child gets the default back.
    p = subprocess.Popen([str(cli), "flower", "local", "--markets", "3", "--rounds", "2", "--out", str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        # Wait until secure sums are running: every process is up and the ServerApp is working.
        while not ((out / "flower_server.log").exists() and "round 0" in (out / "flower_server.log").read_text()):
            assert p.poll() is None, p.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        assert len(_marked(marker)) >= 7   # CLI, SuperLink, 3 SuperNodes, 3 workers (+ Flower's)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert not (out / "results.json").exists()
    deadline = time.monotonic() + 20
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _marked(marker)
    assert left == [], f"processes left behind after Ctrl-C: {[_describe(pid) for pid in left]}"
