"""``fedmm-secure flower local`` as a user runs it: interrupted mid-run (Ctrl-C, or SIGTERM as a
scheduler or CI timeout sends it), it must stop every process it started (SuperLink,
SuperNodes, workers, and what Flower starts below them) and keep each market's ledger;
``--resume DIR`` continues with the run's own config, every market reopening its ledger: what
the interrupted run spent stays spent, new rounds are numbered after it, and the reported
epsilon is the ledger's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedmm_secure.privacy.ledger import Ledger, verify_ledger  # noqa: E402
from fedmm_secure.runtime.flower.keyfiles import read_roster  # noqa: E402
from fedmm_secure.runtime.flower.processes import pids_with_env  # noqa: E402

CLI = Path(sys.executable).parent / "fedmm-secure"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")]


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


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    # A user at a terminal has SIGINT at its default; a test run launched in the background by a
    # non-interactive shell inherits it ignored (then Python never raises KeyboardInterrupt and
    # the run just completes), so the child gets the default back.
    return subprocess.Popen([str(CLI), "flower", "local", *args, "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_when_logged(p: subprocess.Popen, out: Path, text: str, sig: int, *, check=None) -> None:
    """Wait until the ServerApp's log holds ``text``, run ``check``, send ``sig``, wait for exit."""
    log, deadline = out / "flower_server.log", time.monotonic() + 180
    try:
        while not (log.exists() and text in log.read_text()):
            assert p.poll() is None, p.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        if check is not None:
            check()
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()


def _no_process_left(marker: str) -> None:
    deadline = time.monotonic() + 20
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _marked(marker)
    assert left == [], f"processes left behind: {[_describe(pid) for pid in left]}"


@pytest.fixture
def marked_env():
    """An environment whose marker every process started from it inherits, for the /proc scan."""
    marker = f"FEDMM_TEST_MARKER_{uuid.uuid4().hex}"
    return marker, {**os.environ, marker: "1"}


def _spent(out: Path) -> dict[str, float]:
    spent = {}
    for d in sorted((out / "ledgers").iterdir()):
        with Ledger.open(d) as led:
            spent[d.name] = led.spent()[d.name].epsilon
    return spent


@pytest.mark.timeout(300)
def test_ctrl_c_mid_run_leaves_no_process(tmp_path, marked_env):
    marker, env = marked_env
    out = tmp_path / "run"
    p = _cli(["--markets", "3", "--rounds", "2", "--out", str(out)], env)

    def all_up():  # CLI, SuperLink, 3 SuperNodes, 3 workers (+ Flower's)
        assert len(_marked(marker)) >= 7

    # Secure sums are running: every process is up and the ServerApp is working.
    _interrupt_when_logged(p, out, "round 0", signal.SIGINT, check=all_up)
    assert p.returncode != 0
    assert not (out / "results.json").exists()
    _no_process_left(marker)


@pytest.mark.timeout(400)
def test_interrupted_private_run_resumes_with_its_ledgers(tmp_path, marked_env):
    marker, env = marked_env
    out = tmp_path / "run"
    p = _cli(["--markets", "3", "--rounds", "1", "--epsilon", "8", "--out", str(out)], env)
    # The CF stage (DP) has been released once the RQ-VAE stage's first sum is done.
    _interrupt_when_logged(p, out, "rqvae-shared round 0", signal.SIGTERM)
    assert p.returncode != 0 and not (out / "results.json").exists()
    _no_process_left(marker)
    first = _spent(out)
    rounds_before = {m: [r.round for r in Ledger.open(out / "ledgers" / m).rounds()] for m in first}
    assert set(first) == {"m0", "m1", "m2"} and all(0 < e < 8 for e in first.values())

    # Flags the resumed run would not use are refused, not ignored.
    bad = _cli(["--resume", str(out), "--epsilon", "4"], env)
    assert bad.wait(timeout=60) == 2 and b"--resume" in bad.stdout.read()

    p = _cli(["--resume", str(out)], env)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode(errors="replace")[-3000:]
    _no_process_left(marker)
    res = json.loads((out / "results.json").read_text())
    after = _spent(out)
    for m, eps in after.items():
        with Ledger.open(out / "ledgers" / m) as led:
            rounds = [r.round for r in led.rounds()]
        assert rounds[:len(rounds_before[m])] == rounds_before[m]            # the first run's rounds stay
        assert rounds[len(rounds_before[m]):] == list(range(max(rounds_before[m]) + 1, max(rounds) + 1))
        assert eps > first[m]                                                 # and stay spent
        assert res["privacy"][m]["epsilon"] == pytest.approx(eps, rel=1e-3)  # reported = ledger's
    assert json.loads((out / "config.json").read_text())["privacy"]["epsilon"] == 8.0
    # Each market signed its ledger with its identity key before and after the resume (the same
    # keys, from OUT/identity/): every signature verifies against the roster's keys.
    roster = read_roster(out / "identity" / "roster.json")
    for m in after:
        assert verify_ledger(out / "ledgers" / m, public_key=roster.markets[m]).signatures_checked

    # A finished run has nothing to resume.
    again = _cli(["--resume", str(out)], env)
    assert again.wait(timeout=60) == 2 and b"finished" in again.stdout.read()
