"""``fedmm-secure flower local`` interrupted mid-run (SIGTERM, as a scheduler or CI timeout
sends it) stops every process and keeps each market's ledger; ``--resume DIR`` continues with
the run's own config, every market reopening its ledger: what the interrupted run spent stays
spent, new rounds are numbered after it, and the reported epsilon is the ledger's."""

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

from fedmm_secure.privacy.ledger import Ledger  # noqa: E402
from fedmm_secure.runtime.flower_local import pids_with_env  # noqa: E402

CLI = Path(sys.executable).parent / "fedmm-secure"


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(CLI), "flower", "local", *args, "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _no_process_left(marker: str) -> None:
    deadline = time.monotonic() + 20
    while pids_with_env(marker, "1") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_with_env(marker, "1") == []


def _spent(out: Path) -> dict[str, float]:
    spent = {}
    for d in sorted((out / "ledgers").iterdir()):
        with Ledger.open(d) as led:
            spent[d.name] = led.spent()[d.name].epsilon
    return spent


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_interrupted_private_run_resumes_with_its_ledgers(tmp_path):
    marker = f"FEDMM_TEST_MARKER_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    out = tmp_path / "run"
    p = _cli(["--markets", "3", "--rounds", "1", "--epsilon", "8", "--out", str(out)], env)
    try:
        log, deadline = out / "flower_server.log", time.monotonic() + 180
        # The CF stage (DP) has been released once the RQ-VAE stage's first sum is done.
        while not (log.exists() and "rqvae-shared round 0" in log.read_text()):
            assert p.poll() is None, p.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
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

    # A finished run has nothing to resume.
    again = _cli(["--resume", str(out)], env)
    assert again.wait(timeout=60) == 2 and b"finished" in again.stdout.read()
