"""Hash-chained ledger: every row is an entry of one chain; verify_ledger finds the first edited,
deleted, inserted or reordered entry; signed heads; old ledgers are refused."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from fedmm_secure.errors import LedgerError
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.privacy.budget import Decision
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev
from fedmm_secure.privacy.ledger import (OLD_LEDGER_MESSAGE, Ledger, LedgerAnchor, verify_ledger)
from fedmm_secure.privacy.ledger.chain import canonical_entry, entry_hash, head_message
from fedmm_secure.privacy.ledger.schema import COLUMNS, TABLES

from .ledger_tamper import entries, forge_append, ledger_path, rechain, tamper, write_v1_ledger

CFG = {"markets": ["DE", "FR"], "delta": 1e-5, "seed": 3}


def _decision(allowed: bool = True) -> Decision:
    return Decision(allowed=allowed, epsilon_if_run=0.5, epsilon_budget=4.0, delta=1e-5,
                    reason="within budget" if allowed else "would exceed budget")


def _fill(led: Ledger, rounds: range) -> None:
    for r in rounds:
        led.record_round_start(r, ["DE", "FR"])
        for m in ("DE", "FR"):
            led.record_decision(m, r, _decision(m == "DE" or r % 2 == 0))
            if m == "FR" and r % 2:
                led.record_skip(m, r, "would exceed budget")
                continue
            led.record_event(m, r, Ev(0.02, 1.0, 10 + r))
            led.record_epsilon(m, r, 0.1 * (r + 1), 1e-5, "pld")
        led.commit_round(r)


def _ledger(tmp_path: Path, *, key: IdentityPrivateKey | None = None, rounds: int = 3) -> tuple[Path, LedgerAnchor]:
    run = tmp_path / "run"
    with Ledger.open(run, run_config=CFG, create=True, signing_key=key) as led:
        _fill(led, range(rounds))
        anchor = led.finish()
    return run, anchor


def test_untouched_ledger_verifies_and_every_table_is_in_the_chain(tmp_path):
    run, anchor = _ledger(tmp_path)
    v = verify_ledger(run, anchor=anchor)
    assert v.ok and v.first_bad_entry is None and v.anchored and not v.signed
    rows = entries(run)
    assert v.entries == anchor.entries == len(rows) and [i for i, _, _ in rows] == list(range(len(rows)))
    assert {t for _, t, _ in rows} == set(TABLES) - {"heads"}   # heads only in signed ledgers
    # The first entry creates the run and commits to the configuration's hash and a run id.
    first = rows[0]
    assert first[1] == "runs" and first[2]["kind"] == "create" and first[2]["run_id"] == anchor.run_id
    with Ledger.open(run) as led:
        assert first[2]["config_hash"] == led.config_hash
        assert (led.entries, led.head_hash) == (anchor.entries, anchor.head) == (v.entries, v.head_hash)


def test_entry_hash_is_domain_separated_and_covers_table_index_and_typed_content():
    values = {"round": 1, "market": "DE", "event_json": "{}", "at": 1.5}
    base = canonical_entry("events", 4, values)
    prev = "ab" * 32
    h = entry_hash(prev, base)
    assert h != entry_hash("cd" * 32, base)
    assert h != entry_hash(prev, canonical_entry("events", 5, values))
    assert h != entry_hash(prev, canonical_entry("skips", 4, {**values, "reason": "{}"}))
    assert h != entry_hash(prev, canonical_entry("events", 4, {**values, "at": 1.5000000000000002}))
    assert json.loads(base)["content"]["at"] == float.hex(1.5)
    with pytest.raises(ValueError):   # a text value in an integer column is not silently hashed
        canonical_entry("events", 4, {**values, "round": "1"})
    assert head_message("r", 3, "ab" * 32, "commit") != head_message("r", 3, "ab" * 32, "finish")


def _bad(run: Path, anchor: LedgerAnchor | None = None, **kw):
    v = verify_ledger(run, anchor=anchor, **kw)
    assert not v.ok and v.first_bad_entry is not None
    return v.first_bad_entry


def test_edited_row_is_named(tmp_path):
    run, anchor = _ledger(tmp_path)
    [(idx,)] = sqlite3.connect(ledger_path(run)).execute("SELECT MIN(id) FROM events").fetchall()
    tamper(run, ("UPDATE events SET event_json = replace(event_json, '\"steps\": 10', '\"steps\": 1') "
                 "WHERE id = ?", (idx,)))
    bad = _bad(run, anchor)
    assert (bad.index, bad.table) == (idx, "events") and "edited" in bad.reason


def test_deleted_middle_row_is_named(tmp_path):
    run, anchor = _ledger(tmp_path)
    idx = [i for i, t, _ in entries(run) if t == "epsilons"][2]
    tamper(run, ("DELETE FROM epsilons WHERE id = ?", (idx,)))
    bad = _bad(run, anchor)
    assert bad.index == idx and bad.table is None and "deleted" in bad.reason


def test_deleted_last_rows_need_the_anchor(tmp_path):
    run, anchor = _ledger(tmp_path)
    n = anchor.entries
    tamper(run, *[f"DELETE FROM {t} WHERE id >= {n - 4}" for t in TABLES])
    # The shorter chain is internally consistent: only the copy of the head tells.
    assert verify_ledger(run).ok
    bad = _bad(run, anchor)
    assert bad.index == n - 4 and "last rows were removed" in bad.reason


def test_swapped_ids_are_named(tmp_path):
    run, anchor = _ledger(tmp_path)
    a, b = [i for i, t, _ in entries(run) if t == "events"][1:3]
    tamper(run, f"UPDATE events SET id = -5 WHERE id = {a}", f"UPDATE events SET id = {a} WHERE id = {b}",
           f"UPDATE events SET id = {b} WHERE id = -5")
    bad = _bad(run, anchor)
    assert (bad.index, bad.table) == (a, "events")


def test_inserted_rows_are_named(tmp_path):
    run, anchor = _ledger(tmp_path)
    # In the middle, reusing the index of an entry of another table.
    idx = [i for i, t, _ in entries(run) if t == "epsilons"][1]
    mid = tmp_path / "mid"
    shutil.copytree(run, mid)
    tamper(mid, ("INSERT INTO events (id, round, market, event_json, at, prev_hash, hash) "
                 "VALUES (?, 0, 'DE', '{}', 0.0, ?, ?)", (idx, "0" * 64, "1" * 64)))
    bad = _bad(mid, anchor)
    assert (bad.index, bad.table) == (idx, "events") and "inserted" in bad.reason
    # At the end, correctly chained by a forger who knows the algorithm: the anchor tells.
    end = forge_append(run, "events", {"round": 2, "market": "DE", "at": 0.0,
                                       "event_json": json.dumps(Ev(0.5, 0.1, 1000).to_dict())})
    assert verify_ledger(run).ok
    bad = _bad(run, anchor)
    assert (bad.index, bad.table) == (end, "events") and "after" in bad.reason


def test_dropped_triggers_fail_even_with_every_row_intact(tmp_path):
    from .ledger_tamper import drop_triggers

    run, anchor = _ledger(tmp_path)
    drop_triggers(run)
    bad = _bad(run, anchor)
    assert bad.index is None and "append-only triggers were dropped" in bad.reason


def test_resume_continues_the_chain_and_refuses_a_tampered_ledger(tmp_path):
    run, first = _ledger(tmp_path, rounds=2)
    with Ledger.open(run, run_config=CFG) as led:
        assert led.entries == first.entries + 1   # continued from its head with the resume entry
        _fill(led, range(led.resume_state().next_round, 4))
        second = led.finish()
    assert second.entries > first.entries and verify_ledger(run, anchor=second).ok
    assert [(i, e["kind"]) for i, t, e in entries(run) if t == "runs"] == [(0, "create"), (first.entries, "resume")]
    idx = [i for i, t, _ in entries(run) if t == "events"][0]
    tamper(run, ("UPDATE events SET at = at + 1 WHERE id = ?", (idx,)))
    with pytest.raises(LedgerError, match=f"entry {idx} \\(events\\).*not continued"):
        Ledger.open(run, run_config=CFG)


def test_signed_heads_verify_only_with_the_markets_key(tmp_path):
    key, other = IdentityPrivateKey.generate(), IdentityPrivateKey.generate()
    run, anchor = _ledger(tmp_path, key=key)
    v = verify_ledger(run, public_key=key.public_key(), anchor=anchor)
    assert v.ok and v.signed and v.signatures_checked
    heads = [e for e in entries(run) if e[1] == "heads"]
    assert [h[2]["kind"] for h in heads] == ["commit"] * 3 + ["finish"] and heads[-1][0] == anchor.entries - 1
    nokey = verify_ledger(run, anchor=anchor)
    assert nokey.ok and nokey.signed and not nokey.signatures_checked
    bad = _bad(run, anchor, public_key=other.public_key())
    assert (bad.index, bad.table) == (0, "runs") and "different signer" in bad.reason
    unsigned, _ = _ledger(tmp_path / "u")
    assert "without a signer" in _bad(unsigned, public_key=key.public_key()).reason


def test_a_rewritten_signed_chain_is_caught_by_its_signatures(tmp_path):
    """Without the key a forger can rewrite the chain and results.json consistently; the old
    signatures then no longer cover the new heads, and new ones cannot be made."""
    key = IdentityPrivateKey.generate()
    run, _ = _ledger(tmp_path, key=key)
    idx = [i for i, t, _ in entries(run) if t == "events"][-1]
    tamper(run, ("DELETE FROM events WHERE id = ?", (idx,)))
    rechain(run)
    # Re-point each head at the rewritten chain (what the forger can do without the key).
    rows = {i: (t, v) for i, t, v in entries(run)}
    for i, (t, _) in sorted(rows.items()):
        if t == "heads":
            (prev,) = sqlite3.connect(ledger_path(run)).execute(
                f"SELECT hash FROM {rows[i - 1][0]} WHERE id = ?", (i - 1,)).fetchone()
            tamper(run, ("UPDATE heads SET count = ?, head_hash = ? WHERE id = ?", (i, prev, i)))
            rechain(run)
    with Ledger.open(run) as led:
        forged = LedgerAnchor(entries=led.entries, head=led.head_hash, run_id=led.run_id,
                              committed_rounds=3, signed=True)
    assert verify_ledger(run, anchor=forged).ok   # unsigned verification cannot tell
    bad = _bad(run, forged, public_key=key.public_key())
    assert bad.table == "heads" and "signature does not verify" in bad.reason


def test_rolling_a_signed_ledger_back_to_an_earlier_commit_is_caught(tmp_path):
    key = IdentityPrivateKey.generate()
    run, anchor = _ledger(tmp_path, key=key)
    last_commit_head = [i for i, t, v in entries(run) if t == "heads" and v["kind"] == "commit"][-2]
    tamper(run, *[f"DELETE FROM {t} WHERE id > {last_commit_head}" for t in TABLES])
    with Ledger.open(run) as led:
        rolled = LedgerAnchor(entries=led.entries, head=led.head_hash, run_id=led.run_id,
                              committed_rounds=2, signed=True)
    bad = _bad(run, rolled, public_key=key.public_key())
    assert bad.index == last_commit_head and "finish head" in bad.reason


def test_signed_ledger_resumes_only_with_its_key(tmp_path):
    key = IdentityPrivateKey.generate()
    run, _ = _ledger(tmp_path, key=key, rounds=1)
    with pytest.raises(LedgerError, match="resume it with the market's identity key"):
        Ledger.open(run, run_config=CFG)
    with pytest.raises(LedgerError, match="not the one this ledger was created with"):
        Ledger.open(run, run_config=CFG, signing_key=IdentityPrivateKey.generate())
    with Ledger.open(run) as reader, pytest.raises(LedgerError, match="identity key to append"):
        reader.record_round_start(5, ["DE"])
    with Ledger.open(run, run_config=CFG, signing_key=key) as led:
        _fill(led, range(1, 3))
        anchor = led.finish()
    assert verify_ledger(run, public_key=key.public_key(), anchor=anchor).ok
    unsigned, _ = _ledger(tmp_path / "u", rounds=1)
    with pytest.raises(LedgerError, match="without a signing key"):
        Ledger.open(unsigned, run_config=CFG, signing_key=key)


def test_old_ledgers_without_a_chain_are_refused(tmp_path):
    write_v1_ledger(tmp_path / "old")
    for attempt in (lambda: verify_ledger(tmp_path / "old"), lambda: Ledger.open(tmp_path / "old"),
                    lambda: Ledger.open(tmp_path / "old", run_config={"x": 1})):
        with pytest.raises(LedgerError, match=OLD_LEDGER_MESSAGE.replace("(", r"\(").replace(")", r"\)")):
            attempt()


# -- property: any single-row mutation of a random chain is detected ------------------------------

_OPS = st.lists(st.sampled_from(["event", "epsilon", "skip", "decision", "commit"]), min_size=1, max_size=10)


def _random_ledger(root: Path, rounds: list[list[str]], signed: bool) -> tuple[Path, LedgerAnchor]:
    key = IdentityPrivateKey.generate() if signed else None
    with Ledger.open(root / "run", run_config=CFG, create=True, signing_key=key) as led:
        for r, ops in enumerate(rounds):
            led.record_round_start(r, ["DE", "FR"])
            for i, op in enumerate(ops):
                m = ("DE", "FR")[i % 2]
                if op == "event":
                    led.record_event(m, r, Ev(0.01 * (i + 1), 1.0, i + 1))
                elif op == "epsilon":
                    led.record_epsilon(m, r, 0.25 * i, 1e-5, "pld")
                elif op == "skip":
                    led.record_skip(m, r, f"skip {i}")
                elif op == "decision":
                    led.record_decision(m, r, _decision(i % 3 != 0))
                elif led.resume_state().incomplete_rounds:
                    led.commit_round(r)
                    break
        return root / "run", led.finish()


_ALTERNATIVE = {"started": "committed", "committed": "skipped", "skipped": "started",
                "create": "resume", "resume": "create", "commit": "finish", "finish": "commit"}


def _changed(kind: str, value):
    if isinstance(value, str) and value in _ALTERNATIVE:   # columns with a CHECK constraint
        return _ALTERNATIVE[value]
    if kind == "hash":
        return ("0" if value[0] != "0" else "1") + value[1:]
    if value is None:
        return 7 if kind.startswith("int") else "x"
    if kind.startswith("int"):
        return value + 1
    if kind == "real":
        return value * 1.5 + 1.0
    return value + "x"


def _tamper_or_reject(run: Path, statement: tuple[str, tuple]) -> None:
    try:
        tamper(run, statement)
    except sqlite3.IntegrityError:   # e.g. a UNIQUE (round, status) clash: not a possible edit
        reject()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=st.lists(_OPS, min_size=1, max_size=3), signed=st.booleans(), data=st.data())
def test_any_single_row_mutation_is_detected(rounds, signed, data):
    with tempfile.TemporaryDirectory() as tmp:
        run, anchor = _random_ledger(Path(tmp), rounds, signed)
        assert verify_ledger(run, anchor=anchor).ok
        rows = entries(run)
        # The last row is where a hash chain alone is blind (only the anchor covers it): draw it
        # as often as all the others together.
        idx, table, values = data.draw(st.one_of(st.just(rows[-1]), st.sampled_from(rows)), label="row")
        mutation = data.draw(st.sampled_from(["edit", "delete", "swap", "insert", "rehash"]),
                             label="mutation")
        if mutation == "edit":
            col, kind = data.draw(st.sampled_from(COLUMNS[table] + (("prev_hash", "hash"), ("hash", "hash"))),
                                  label="column")
            conn = sqlite3.connect(ledger_path(run))
            (old,) = conn.execute(f"SELECT {col} FROM {table} WHERE id = ?", (idx,)).fetchone()
            conn.close()
            _tamper_or_reject(run, (f"UPDATE {table} SET {col} = ? WHERE id = ?", (_changed(kind, old), idx)))
        elif mutation == "delete":
            tamper(run, (f"DELETE FROM {table} WHERE id = ?", (idx,)))
        elif mutation == "swap":
            same = [i for i, t, _ in rows if t == table and i != idx]
            if not same:
                return
            other = data.draw(st.sampled_from(same), label="other")
            tamper(run, f"UPDATE {table} SET id = -9 WHERE id = {idx}",
                   f"UPDATE {table} SET id = {idx} WHERE id = {other}",
                   f"UPDATE {table} SET id = {other} WHERE id = -9")
        elif mutation == "insert":
            # A copy of a row under a new index, its link and hash taken from the row it copies.
            at = data.draw(st.sampled_from([i for i, t, _ in rows if t != table] + [len(rows)]), label="at")
            names = [c for c, _ in COLUMNS[table]]
            conn = sqlite3.connect(ledger_path(run))
            prev, h = conn.execute(f"SELECT prev_hash, hash FROM {table} WHERE id = ?", (idx,)).fetchone()
            conn.close()
            forged = {**values, **({"round": values["round"] + 100} if "round" in values and values["round"] is not None
                                   else {"key": "forged"} if table == "meta" else {})}
            _tamper_or_reject(run, (f"INSERT INTO {table} (id, {', '.join(names)}, prev_hash, hash) VALUES "
                         f"({', '.join('?' * (len(names) + 3))})",
                         (at, *(forged[n] for n in names), prev, h[::-1])))
        else:
            # Edit a row and recompute its own hash (the forger knows the algorithm): the next
            # entry's link, or the anchor for the last one, still tells.
            col, kind = data.draw(st.sampled_from(COLUMNS[table]), label="column")
            new = {**values, col: _changed(kind, values[col])}
            conn = sqlite3.connect(ledger_path(run))
            (prev,) = conn.execute(f"SELECT prev_hash FROM {table} WHERE id = ?", (idx,)).fetchone()
            conn.close()
            _tamper_or_reject(run, (f"UPDATE {table} SET {col} = ?, hash = ? WHERE id = ?",
                         (new[col], entry_hash(prev, canonical_entry(table, idx, new)), idx)))
        v = verify_ledger(run, anchor=anchor)
        assert not v.ok, (mutation, idx, table)


def test_a_second_writer_cannot_fork_the_chain(tmp_path):
    run, _ = _ledger(tmp_path, rounds=1)
    with Ledger.open(run, run_config=CFG) as a, Ledger.open(run) as b:
        a.record_round_start(1, ["DE"])
        with pytest.raises(LedgerError, match="appended to by another writer"):
            b.record_skip("DE", 1, "stale head")
    assert verify_ledger(run).ok
