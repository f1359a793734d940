"""What an attacker with write access to a run directory does to a ledger file, for the tests.

Every helper drops the append-only triggers, changes rows with plain SQL and puts the triggers
back, so a test shows that the hash chain, not the triggers or the schema check, catches it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fedmm_secure.privacy.ledger.chain import GENESIS_PREV, canonical_entry, entry_hash
from fedmm_secure.privacy.ledger.schema import COLUMNS, LEDGER_FILENAME, TABLES, append_only_triggers

__all__ = ["TABLES", "ledger_path", "tamper", "entries", "forge_append", "rechain", "drop_triggers",
           "write_v1_ledger"]


def ledger_path(run: Path) -> Path:
    return run / LEDGER_FILENAME if run.is_dir() else run


def _connect(run: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(ledger_path(run), isolation_level=None)
    conn.execute("BEGIN")
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def _finish(conn: sqlite3.Connection) -> None:
    for statement in append_only_triggers().splitlines():   # byte for byte what the ledger creates
        conn.execute(statement)
    conn.execute("COMMIT")
    conn.close()


def drop_triggers(run: Path) -> None:
    conn = _connect(run)
    conn.execute("COMMIT")
    conn.close()


def tamper(run: Path, *statements: str | tuple[str, tuple]) -> None:
    """Run SQL statements on the ledger with the triggers out of the way, then restore them."""
    conn = _connect(run)
    for st in statements:
        sql, params = (st, ()) if isinstance(st, str) else st
        conn.execute(sql, params)
    _finish(conn)


def entries(run: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(index, table, content) of every row, in index order."""
    conn = sqlite3.connect(ledger_path(run))
    out = []
    for t in TABLES:
        names = [c for c, _ in COLUMNS[t]]
        for row in conn.execute(f"SELECT id, {', '.join(names)} FROM {t}").fetchall():
            out.append((row[0], t, dict(zip(names, row[1:]))))
    conn.close()
    return sorted(out, key=lambda e: e[0])


def forge_append(run: Path, table: str, values: dict[str, Any]) -> int:
    """Append a correctly chained entry at the end, as a forger who knows the algorithm would.
    Returns its index."""
    rows = entries(run)
    index = rows[-1][0] + 1
    conn = sqlite3.connect(ledger_path(run))
    (prev,) = conn.execute(f"SELECT hash FROM {rows[-1][1]} WHERE id = ?", (index - 1,)).fetchone()
    conn.close()
    digest = entry_hash(prev, canonical_entry(table, index, values))
    names = [c for c, _ in COLUMNS[table]]
    tamper(run, (f"INSERT INTO {table} (id, {', '.join(names)}, prev_hash, hash) "
                 f"VALUES ({', '.join('?' * (len(names) + 3))})",
                 (index, *(values[n] for n in names), prev, digest)))
    return index


def rechain(run: Path) -> None:
    """Renumber every row 0..n-1 in its current order and recompute every link and hash: a
    whole-chain forgery by someone without any key."""
    rows = entries(run)
    conn = _connect(run)
    for t in TABLES:
        conn.execute(f"UPDATE {t} SET id = -1 - id")   # out of the way of the new numbers
    prev = GENESIS_PREV
    for new, (old, table, values) in enumerate(rows):
        digest = entry_hash(prev, canonical_entry(table, new, values))
        conn.execute(f"UPDATE {table} SET id = ?, prev_hash = ?, hash = ? WHERE id = ?",
                     (new, prev, digest, -1 - old))
        prev = digest
    _finish(conn)


_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, config_hash TEXT NOT NULL,
                   config_json TEXT NOT NULL, opened_at REAL NOT NULL, kind TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
                     market TEXT NOT NULL, event_json TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO meta VALUES ('format', 'fedmm-secure-privacy-ledger'), ('version', '1'), ('config_hash', 'x');
"""


def write_v1_ledger(run: Path) -> None:
    """A ledger as the version before the hash chain wrote it (format marker, version 1)."""
    run.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(run / "ledger.sqlite")
    conn.executescript(_V1_SCHEMA)
    conn.close()
