"""Recompute a ledger's hash chain and say whether, and where, it was tampered with.

:func:`verify_ledger` reads the file on its own (it does not trust the :class:`Ledger` class's
view) and checks, in order:

1. the chain: entry indices 0..n-1 with no gap or duplicate across tables, every ``prev_hash``
   the hash of the entry before, every ``hash`` recomputed from the row's content: an edited,
   deleted, inserted or reordered row breaks it at the first such row;
2. what the chain must say: the first entry creates the run (config hash, run id, signer), the
   metadata matches it, every resume names the same run, every signed head covers the entries
   before it;
3. signatures, against a public key the caller trusts (never the one stored in the file);
4. the head against an anchor kept outside the file (``results.json``): removing the last
   rows leaves a valid but shorter chain, which only such a copy reveals;
5. the schema, triggers included, against the one this version creates.

It never raises for a tampered ledger (the answer is ``ok=False`` with the first bad entry); it
raises :class:`LedgerError` for a file it cannot read as a ledger at all, and for a ledger
written before the chain existed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ...errors import IntegrityError, LedgerError
from ...primitives.keys import IdentityPublicKey
from .chain import GENESIS_PREV, canonical_entry, entry_hash, head_message
from .records import LedgerAnchor
from .schema import (COLUMNS, FORMAT, LEDGER_FILENAME, SCHEMA, TABLES, VERSION,
                     append_only_triggers, config_hash)

__all__ = ["BadEntry", "LedgerVerification", "verify_ledger", "OLD_LEDGER_MESSAGE", "ledger_file"]

OLD_LEDGER_MESSAGE = "ledger has no hash chain (written by an older version)"


@dataclass(frozen=True)
class BadEntry:
    """Where verification failed. ``index`` is None for the file's schema (not an entry);
    ``table`` is None when the entry is missing, so its table is unknown."""

    index: int | None
    table: str | None
    reason: str

    def __str__(self) -> str:
        where = "schema" if self.index is None else f"entry {self.index}"
        return f"{where}{f' ({self.table})' if self.table else ''}: {self.reason}"


@dataclass(frozen=True)
class LedgerVerification:
    """``entries`` and ``head_hash`` are what the file holds (its length and the stored hash of
    its last entry), whether or not they verified."""

    ok: bool
    first_bad_entry: BadEntry | None
    entries: int
    head_hash: str
    run_id: str | None
    signed: bool               # the first entry names a signer, so every commit has a signed head
    signatures_checked: bool   # and they were verified against a given public key
    anchored: bool             # the head was compared with an anchor kept outside the file

    def describe(self) -> str:
        if not self.ok:
            return f"FAILED at {self.first_bad_entry}"
        sig = ("signed, signatures verified" if self.signatures_checked
               else "signed, signatures not checked (no public key given)" if self.signed else "unsigned")
        anchor = "head matches results.json" if self.anchored else "head not anchored"
        return f"verified: {self.entries} entries, head {self.head_hash[:16]}, {anchor}, {sig}"


@dataclass(frozen=True)
class _Entry:
    index: int
    table: str
    values: dict
    prev_hash: str
    hash: str


def ledger_file(path: str | os.PathLike) -> Path:
    """The ledger file for a run directory or a file path."""
    p = Path(path)
    return p / LEDGER_FILENAME if p.is_dir() else p


def _expected_schema() -> set[tuple]:
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA + append_only_triggers())
        return set(mem.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())
    finally:
        mem.close()


def _read(conn: sqlite3.Connection, p: Path) -> tuple[list[_Entry], BadEntry | None]:
    entries: list[_Entry] = []
    for t in TABLES:
        names = [c for c, _ in COLUMNS[t]]
        try:
            rows = conn.execute(f"SELECT id, {', '.join(names)}, prev_hash, hash FROM {t}").fetchall()
        except sqlite3.DatabaseError as exc:
            if "no such" in str(exc):
                return [], BadEntry(None, t, f"table or column missing ({exc})")
            raise LedgerError(f"{p}: corrupt ledger ({exc})") from None
        entries += [_Entry(r[0], t, dict(zip(names, r[1:-2])), r[-2], r[-1]) for r in rows]
    entries.sort(key=lambda e: e.index)
    return entries, None


def _link_problem(e: _Entry, prev: str) -> str | None:
    if e.prev_hash != prev:
        return (f"prev_hash is not the hash of entry {e.index - 1}: rows before it were removed, "
                "inserted or reordered")
    try:
        content = canonical_entry(e.table, e.index, e.values)
    except ValueError as exc:
        return f"malformed row ({exc}): edited outside the ledger"
    if entry_hash(prev, content) != e.hash:
        return "content does not match its hash: the row was edited"
    return None


def _walk(entries: list[_Entry]) -> BadEntry | None:
    """The chain itself: contiguous indices, links, and hashes."""
    if not entries:
        return BadEntry(0, None, "the ledger has no entries")
    groups: dict[int, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.index, []).append(e)
    prev = GENESIS_PREV
    for expected, index in enumerate(sorted(groups)):
        group = groups[index]
        if index > expected:
            return BadEntry(expected, None, f"missing: deleted (the next entry is {index}, {group[0].table})")
        if index < expected:
            return BadEntry(index, group[0].table, "index out of sequence: the row was renumbered")
        problems = [(e, _link_problem(e, prev)) for e in group]
        if len(group) > 1:
            # Indices are unique per table only; the copy that does not link is the insertion.
            forged = next((e for e, why in problems if why is not None), group[-1])
            other = next(e for e in group if e is not forged)
            return BadEntry(index, forged.table, f"a second entry with index {index} (the other is in "
                                                 f"{other.table}): a row was inserted")
        e, why = problems[0]
        if why is not None:
            return BadEntry(index, e.table, why)
        prev = e.hash
    return None


def _semantics(entries: list[_Entry]) -> BadEntry | None:
    """What an authentic chain must contain; a consistent forgery by someone who recomputes
    hashes can still fail here."""
    first = entries[0]
    if first.table != "runs" or first.values["kind"] != "create":
        return BadEntry(0, first.table, "the first entry is not the record that created the run")
    g = first.values
    try:
        if config_hash(json.loads(g["config_json"])) != g["config_hash"]:
            return BadEntry(0, "runs", "the run configuration does not match its hash")
    except (ValueError, LedgerError):
        return BadEntry(0, "runs", "the run configuration is not valid JSON")
    meta = {e.values["key"]: (e.index, e.values["value"]) for e in entries if e.table == "meta"}
    for key, want in (("format", FORMAT), ("version", VERSION), ("config_hash", g["config_hash"])):
        idx, got = meta.get(key, (None, None))
        if got != want:
            return BadEntry(idx, "meta", f"metadata {key!r} is {got!r}, expected {want!r}")
    for e in entries:
        if e.table == "runs" and e.index and any(e.values[k] != g[k] for k in ("run_id", "config_hash", "signer")):
            return BadEntry(e.index, "runs", "a resume names another run, configuration or signer than the first entry")
    by_index = {e.index: e for e in entries}
    for e in entries:
        if e.table == "heads":
            if g["signer"] is None:
                return BadEntry(e.index, "heads", "a signed head in a ledger created without a signer")
            if e.values["count"] != e.index or e.values["head_hash"] != by_index[e.index - 1].hash:
                return BadEntry(e.index, "heads", "the signed head does not cover the entries before it")
        elif g["signer"] is not None and e.table == "rounds" and e.values["status"] == "committed":
            nxt = by_index.get(e.index + 1)
            if nxt is None or nxt.table != "heads" or nxt.values["kind"] != "commit":
                return BadEntry(e.index, "rounds", "a round commit without the signed head that must follow it")
    return None


def _signatures(entries: list[_Entry], key: IdentityPublicKey) -> BadEntry | None:
    g = entries[0].values
    if g["signer"] is None:
        return BadEntry(0, "runs", "a public key was given but the ledger was created without a signer")
    if g["signer"] != key.to_bytes().hex():
        return BadEntry(0, "runs", "the ledger names a different signer than the public key given")
    for e in entries:
        if e.table != "heads":
            continue
        v = e.values
        try:
            key.verify(bytes.fromhex(v["signature"]),
                       head_message(g["run_id"], v["count"], v["head_hash"], v["kind"]))
        except (ValueError, IntegrityError):
            return BadEntry(e.index, "heads", "the head's signature does not verify with the given key")
    return None


def _anchor(entries: list[_Entry], anchor: LedgerAnchor) -> BadEntry | None:
    n, last = len(entries), entries[-1]
    if anchor.run_id != entries[0].values["run_id"]:
        return BadEntry(0, "runs", "results.json anchors a different ledger (run id differs)")
    if n < anchor.entries:
        return BadEntry(n, None, f"missing: the ledger ends after {n} entries but results.json "
                                 f"anchors {anchor.entries} (its last rows were removed)")
    if n > anchor.entries:
        extra = entries[anchor.entries]
        return BadEntry(extra.index, extra.table, f"entries after the {anchor.entries} results.json anchors "
                                                  "(appended after the run finished, or a resume that did not finish)")
    if last.hash != anchor.head:
        return BadEntry(last.index, last.table, "the head hash differs from the one in results.json: "
                                                "the chain was rewritten")
    if entries[0].values["signer"] is not None and not (last.table == "heads" and last.values["kind"] == "finish"):
        return BadEntry(last.index, last.table, "a signed ledger must end with its signed finish head")
    return None


def verify_ledger(path: str | os.PathLike, *, public_key: IdentityPublicKey | None = None,
                  anchor: LedgerAnchor | None = None) -> LedgerVerification:
    """Verify the ledger at ``path`` (a run directory or the file); see the module docstring."""
    p = ledger_file(path)
    if not p.is_file():
        raise LedgerError(f"{p}: no privacy ledger found")
    try:
        conn = sqlite3.connect(str(p), timeout=30.0)
    except sqlite3.Error as exc:
        raise LedgerError(f"{p}: cannot open ledger ({exc})") from None
    try:
        try:
            conn.execute("BEGIN")   # one consistent snapshot, even if a writer is appending
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
            chained = "runs" in tables and any(
                r[1] == "hash" for r in conn.execute("PRAGMA table_info(runs)").fetchall())
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{p}: not a privacy ledger or corrupt ({exc})") from None
        if not chained:
            if meta.get("format") == FORMAT:
                raise LedgerError(f"{p}: {OLD_LEDGER_MESSAGE}; it cannot be verified")
            raise LedgerError(f"{p}: not a privacy ledger (missing format marker or tables)")
        entries, bad = _read(conn, p)
        schema = set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())
    finally:
        conn.close()
    signer = entries[0].values.get("signer") if entries and entries[0].table == "runs" else None
    bad = (bad or _walk(entries) or _semantics(entries)
           or (_signatures(entries, public_key) if public_key is not None else None)
           or (_anchor(entries, anchor) if anchor is not None else None)
           or _schema_difference(schema))
    return LedgerVerification(
        ok=bad is None, first_bad_entry=bad, entries=len(entries),
        head_hash=entries[-1].hash if entries else GENESIS_PREV,
        run_id=entries[0].values.get("run_id") if entries and entries[0].table == "runs" else None,
        signed=signer is not None, signatures_checked=bad is None and public_key is not None,
        anchored=bad is None and anchor is not None)


def _schema_difference(actual: set[tuple]) -> BadEntry | None:
    expected = _expected_schema()
    for kind, name, table, _ in sorted(expected - actual, key=lambda r: r[1]):
        what = "changed" if any(r[1] == name for r in actual) else "missing"
        hint = " (the append-only triggers were dropped)" if kind == "trigger" and what == "missing" else ""
        return BadEntry(None, table, f"{kind} {name} is {what}{hint}")
    for kind, name, table, _ in sorted(actual - expected, key=lambda r: r[1]):
        return BadEntry(None, table, f"unexpected {kind} {name}")
    return None
