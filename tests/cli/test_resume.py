"""A private run killed with SIGKILL mid-run never under-counts spent epsilon, and
``run --resume`` continues from its ledger."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fedmm_secure.cli import main

TINY = {
    "rounds": 3,
    "methods": ["fedmm"],
    "synthetic": {"markets": [
        {"name": "big", "n_users": 150, "n_items": 60, "impressions_per_user": 10},
        {"name": "small", "n_users": 60, "n_items": 40, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 40, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16], "batch_size": 32},
    "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5},
}


def _epsilon_rows(db):
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT round, market, epsilon FROM epsilons ORDER BY id").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def test_sigkill_mid_run_then_resume(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedmm_secure.cli", "run", "--config", str(cfg), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    db = out / "ledger.sqlite"
    deadline = time.monotonic() + 240
    seen = []
    try:
        # Kill once the first CF round is on the ledger, while later rounds are in progress.
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _epsilon_rows(db)
            if len(seen) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()!r}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(seen) >= 2
    assert not (out / "results.json").exists()  # nothing released past the crash

    from fedmm_secure.privacy.ledger import Ledger
    with Ledger.open(out) as led:
        spent = led.spent()
        state = led.resume_state()
    last_reported = {}
    for _, m, eps in _epsilon_rows(db):
        last_reported[m] = eps
    for m, eps in last_reported.items():
        assert spent[m].epsilon >= eps - 1e-9  # never under-counted

    # Resume: the spend before the crash stays on the books, new rounds are numbered after it.
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    with Ledger.open(out) as led:
        rounds = [r.round for r in led.rounds()]
        final = led.spent()
    assert min(r for r in rounds if r >= state.next_round) == state.next_round
    for m in last_reported:
        assert final[m].epsilon > spent[m].epsilon
        assert abs(res["privacy"][m]["epsilon"] - final[m].epsilon) <= 0.01 * final[m].epsilon


def test_resume_refuses_a_directory_without_config(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_new_private_run_refuses_to_overwrite_a_ledger(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    small = dict(TINY, rounds=1, model=dict(TINY["model"], vq_epochs=1))
    cfg.write_text(json.dumps(small))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run's results" in capsys.readouterr().err


PF_TINY = {
    "rounds": 2, "model_family": "pf-msmtrec", "methods": ["pf_msmtrec"],
    "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5},
    "pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4, "batch_size": 32,
           "methods": ["local", "pf_msmtrec"],
           "data": {"scenarios": [{"name": "a", "n_users": 80, "n_items": 30, "impressions_per_user": 6},
                                  {"name": "b", "n_users": 60, "n_items": 25, "impressions_per_user": 6}]}},
}


def test_pf_msmtrec_run_that_crashed_mid_round_resumes_from_its_ledger(tmp_path, capsys, monkeypatch):
    """A crash in round 1's secure sum (after round 1's DP steps are on the ledger): nothing is
    released, the ledger keeps both rounds' events; `run --resume` counts them and continues."""
    from fedmm_secure.privacy.ledger import Ledger
    from fedmm_secure.runtime.embedded import EmbeddedSecureSum

    real = EmbeddedSecureSum.secure_sum

    def crash_in_round_1(self, *, label, round_id, vectors, max_abs):
        if round_id == 1:
            raise RuntimeError("simulated crash mid-round")
        return real(self, label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)

    cfg = tmp_path / "pf.json"
    cfg.write_text(json.dumps(PF_TINY))
    out = tmp_path / "run"
    monkeypatch.setattr(EmbeddedSecureSum, "secure_sum", crash_in_round_1)
    try:
        main(["run", "--config", str(cfg), "--out", str(out), "--quiet"])
    except RuntimeError:
        pass
    monkeypatch.setattr(EmbeddedSecureSum, "secure_sum", real)
    assert not (out / "results.json").exists()
    with Ledger.open(out) as led:
        before = {m: r.epsilon for m, r in led.spent().items()}
        state = led.resume_state()
        n_events = {m: len(led.events_for(m)) for m in led.markets()}
    # Before the crash: round 0's training, its 3 alpha choices per scenario (experts, two
    # towers; validation releases, a ledger round of their own per scenario), round 1's training.
    assert state.next_round == 1 + 3 * 2 + 1 and set(before) == {"a", "b"}
    assert all(n == 1 + 3 + 1 for n in n_events.values())
    # A whole run, per scenario: 2 training rounds, 2 x 3 alpha choices, the final checkpoint
    # comparison and one Platt fit per task.
    whole = 2 + 2 * 3 + 1 + 2

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    with Ledger.open(out) as led:
        rounds = [r.round for r in led.rounds()]
        after = {m: r.epsilon for m, r in led.spent().items()}
        assert all(len(led.events_for(m)) == n_events[m] + whole for m in after)   # the crashed part, then a run
    assert rounds == list(range(state.next_round + 2 + 2 * (whole - 2)))
    for m, eps in after.items():
        assert eps > before[m]
        assert res["privacy"][m]["epsilon"] == pytest.approx(eps, rel=1e-3)
