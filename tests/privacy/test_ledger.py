"""Privacy ledger: durability, append-only, resume, crash semantics (real SIGKILL)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedmm_secure.errors import ConfigError, LedgerError
from fedmm_secure.privacy.budget import BudgetPolicy
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev
from fedmm_secure.privacy.ledger import LEDGER_FILENAME, Ledger, config_hash

CFG = {"markets": ["DE", "FR"], "epsilon_budget": 4.0, "delta": 1e-5, "seed": 7}


def new(tmp_path, cfg=CFG) -> Ledger:
    return Ledger.open(tmp_path / "run", run_config=cfg, create=True)


def test_create_write_reopen_roundtrip(tmp_path):
    led = new(tmp_path)
    assert led.path == tmp_path / "run" / LEDGER_FILENAME
    e1, e2 = Ev(0.01, 1.0, 100), Ev(0.02, 1.2, 50)
    led.record_round_start(0, ["DE", "FR"])
    led.record_event("DE", 0, e1)
    led.record_event("FR", 0, e2)
    led.record_epsilon("DE", 0, 0.5, 1e-5, "pld")
    led.record_skip("FR", 0, "budget")
    led.commit_round(0)
    led.close()

    with Ledger.open(tmp_path / "run", run_config=dict(reversed(list(CFG.items())))) as led2:
        assert led2.events_for("DE") == [e1]
        assert led2.events_for("FR") == [e2]
        assert led2.last_committed_round() == 0
        [rec] = led2.rounds()
        assert (rec.round, rec.status, rec.participants) == (0, "committed", ("DE", "FR"))
        [eps] = led2.epsilons("DE")
        assert (eps.epsilon, eps.delta, eps.accountant, eps.certified) == (0.5, 1e-5, "pld", True)
        assert led2.skips() == [(0, "FR", "budget")]
        assert led2.resume_state().next_round == 1
        assert led2.run_config == CFG
        spent = led2.spent()
        assert set(spent) == {"DE", "FR"}
        assert spent["DE"].delta == 1e-5 and spent["DE"].accountant == "pld" and spent["DE"].certified
        from fedmm_secure.privacy.accountant import PLDAccountant
        ref = PLDAccountant()
        ref.compose(e1)
        assert spent["DE"].epsilon == pytest.approx(ref.get_epsilon(1e-5))
        assert spent["FR"].delta == 1e-5  # FR recorded none: the run-level delta is used
        assert led2.spent(delta=1e-6, accountant="rdp")["FR"].certified is False


def test_spent_needs_a_delta_when_none_was_recorded(tmp_path):
    led = new(tmp_path)
    led.record_round_start(0, ["DE"])
    led.record_event("DE", 0, Ev(0.01, 1.0, 10))
    with pytest.raises(ConfigError, match="no recorded delta"):
        led.spent()
    assert led.spent(delta=1e-5)["DE"].epsilon > 0


def test_config_mismatch_and_double_create_are_refused(tmp_path):
    new(tmp_path).close()
    with pytest.raises(LedgerError, match="configuration differs"):
        Ledger.open(tmp_path / "run", run_config={**CFG, "seed": 8})
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.open(tmp_path / "run", run_config=CFG, create=True)
    with pytest.raises(LedgerError, match="no privacy ledger"):
        Ledger.open(tmp_path / "elsewhere", run_config=CFG)
    with pytest.raises(ConfigError):
        config_hash({"x": object()})
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    rng = np.random.default_rng(1234)  # reproducible junk
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(rng.bytes(4096))
    with pytest.raises(LedgerError):
        Ledger.open(junk)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        Ledger.open(other)
    # A real ledger whose pages were overwritten in the middle.
    led = new(tmp_path)
    led.record_round_start(0, ["DE"])
    for i in range(200):
        led.record_event("DE", 0, Ev(0.01, 1.0, i))
    led.close()
    path = tmp_path / "run" / LEDGER_FILENAME
    # checkpoint WAL into the main file first so the damage hits the data pages
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    data = bytearray(path.read_bytes())
    for off in range(4096, len(data), 4096):
        data[off + 100: off + 900] = rng.bytes(800)
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError):
        led3 = Ledger.open(path)
        led3.events_for("DE")


def test_append_only_enforced_by_triggers(tmp_path):
    led = new(tmp_path)
    led.record_round_start(0, ["DE"])
    led.record_event("DE", 0, Ev(0.01, 1.0, 100))
    led.record_epsilon("DE", 0, 0.3, 1e-5, "pld")
    led.commit_round(0)
    led.close()
    conn = sqlite3.connect(tmp_path / "run" / LEDGER_FILENAME)
    for sql in ["UPDATE events SET event_json = '{}'", "DELETE FROM events",
                "UPDATE rounds SET status = 'started'", "DELETE FROM rounds",
                "UPDATE epsilons SET epsilon = 0", "DELETE FROM runs", "UPDATE meta SET value = 'x'"]:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()


def test_round_protocol_errors(tmp_path):
    led = new(tmp_path)
    with pytest.raises(LedgerError, match="not started"):
        led.record_event("DE", 0, Ev(0.01, 1.0, 1))
    led.record_round_start(3, ["DE"])
    with pytest.raises(LedgerError, match="greater"):
        led.record_round_start(3, ["DE"])
    with pytest.raises(LedgerError, match="greater"):
        led.record_round_start(2, ["DE"])
    led.commit_round(3)
    with pytest.raises(LedgerError, match="already committed"):
        led.record_event("DE", 3, Ev(0.01, 1.0, 1))
    with pytest.raises(LedgerError, match="already committed"):
        led.commit_round(3)
    with pytest.raises(ConfigError):
        led.record_round_start(-1, ["DE"])
    with pytest.raises(ConfigError):
        led.record_skip("DE", 3, "")
    led.record_round_start(4, ["DE"])
    with pytest.raises(LedgerError, match="not a participant"):
        led.record_event("FR", 4, Ev(0.01, 1.0, 1))
    led.skip_round(4, "all markets over budget")
    assert [(r.round, r.status, r.reason) for r in led.rounds()] == [
        (3, "committed", None), (4, "skipped", "all markets over budget")]


def test_uncommitted_round_events_still_count_on_resume(tmp_path):
    led = new(tmp_path)
    ev = Ev(0.02, 1.0, 100)
    led.record_round_start(0, ["DE"])
    led.record_event("DE", 0, ev)
    led.commit_round(0)
    led.record_round_start(1, ["DE"])
    led.record_event("DE", 1, ev)  # crash: never committed
    led.close()

    led = Ledger.open(tmp_path / "run", run_config=CFG)
    st = led.resume_state()
    assert st.last_committed_round == 0
    assert st.incomplete_rounds == (1,)
    assert st.next_round == 2  # the crashed round's number is never reused
    assert led.events_for("DE") == [ev, ev]
    assert led.events_for("DE", committed_only=True) == [ev]
    spent = led.rebuild_accountant("DE").get_epsilon(1e-5)
    one_round = led.rebuild_accountant("DE").predict_epsilon([], 1e-5)
    assert spent == one_round
    from fedmm_secure.privacy.accountant import PLDAccountant
    only_committed = PLDAccountant()
    only_committed.compose(ev)
    assert spent > only_committed.get_epsilon(1e-5)


def test_budget_decisions_are_recorded(tmp_path):
    led = new(tmp_path)
    led.record_round_start(0, ["DE"])
    acc = led.rebuild_accountant("DE")
    d = BudgetPolicy(epsilon_budget=0.1, delta=1e-5, on_exceed="skip").decide(acc, [Ev(0.05, 1.0, 100)])
    led.record_decision("DE", 0, d)
    led.record_skip("DE", 0, d.reason)
    [rec] = led.decisions()
    assert rec.allowed is False and rec.epsilon_if_run == d.epsilon_if_run and rec.reason == d.reason


_CHILD = textwrap.dedent("""
    import sys
    from fedmm_secure.privacy.accountant import PLDAccountant
    from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev
    from fedmm_secure.privacy.ledger import Ledger
    led = Ledger.open(sys.argv[1], run_config={"child": True}, create=True)
    acc = PLDAccountant()
    r = 0
    while True:
        led.record_round_start(r, ["DE"])
        ev = Ev(0.02, 1.0, 20 + r % 7)
        led.record_event("DE", r, ev)   # written BEFORE the round's result is released
        acc.compose(ev)
        eps = acc.get_epsilon(1e-5)
        print(r, repr(eps), flush=True)  # "release" the round's result
        if r % 3 != 2:
            led.commit_round(r)
        r += 1
""")


def test_sigkill_mid_run_loses_no_released_event(tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    released = []
    try:
        for line in proc.stdout:
            released.append(line.split())
            if len(released) >= 12:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    released += [ln.split() for ln in rest.splitlines() if ln.strip()]
    last_round, last_eps = int(released[-1][0]), float(released[-1][1])

    led = Ledger.open(run, run_config={"child": True})
    events = led.events_for("DE")
    # Every event whose write returned before the kill is there, in order.
    assert len(events) >= last_round + 1
    assert [e.steps for e in events[: last_round + 1]] == [20 + r % 7 for r in range(last_round + 1)]
    assert led.rebuild_accountant("DE").get_epsilon(1e-5) >= last_eps
    st = led.resume_state()
    assert st.next_round >= last_round + 1
    assert all(r % 3 == 2 or r >= last_round for r in st.incomplete_rounds)


def test_spent_is_never_below_an_epsilon_the_run_reported(tmp_path):
    """The run's accountant composes round by round; a fresh recomputation of the same events can
    come out a little lower (discretised PLD). The spend on record must not undercut what was
    released."""
    from fedmm_secure.privacy.accountant import make_accountant
    from fedmm_secure.privacy.events import SubsampledGaussianEvent
    from fedmm_secure.privacy.ledger import Ledger

    ev = [SubsampledGaussianEvent(0.3, 1.0, 4, "record"), SubsampledGaussianEvent(0.3, 1.0, 8, "record")]
    fresh = make_accountant("pld")
    for e in ev:
        fresh.compose(e)
    recomputed = fresh.get_epsilon(1e-5)
    with Ledger.open(tmp_path, run_config={"x": 1}, create=True) as led:
        for r, e in enumerate(ev):
            led.record_round_start(r, ["m"])
            led.record_event("m", r, e)
            # what a run might have reported for this round (just above the recomputation)
            led.record_epsilon("m", r, recomputed * 1.001 if r == 1 else 0.1, 1e-5, "pld", certified=True)
            led.commit_round(r)
        assert led.spent()["m"].epsilon == pytest.approx(recomputed * 1.001)
        led.record_round_start(2, ["m"])
        led.record_event("m", 2, SubsampledGaussianEvent(0.3, 1.0, 50, "record"))
        assert led.spent()["m"].epsilon > recomputed * 1.001   # later spend still counts
