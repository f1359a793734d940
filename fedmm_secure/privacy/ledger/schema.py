"""The ledger file's format: tables, append-only triggers, the run-config hash, the connection
settings that make every committed write durable."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError, LedgerError

__all__ = [
    "LEDGER_FILENAME",
    "FORMAT",
    "VERSION",
    "TABLES",
    "SCHEMA",
    "append_only_triggers",
    "config_hash",
    "connect",
]

LEDGER_FILENAME = "ledger.sqlite"
FORMAT = "fedmm-secure-privacy-ledger"
VERSION = "1"
TABLES = ("meta", "runs", "rounds", "participants", "events", "epsilons", "skips", "decisions")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    opened_at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('create', 'resume'))
);
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('started', 'committed', 'skipped')),
    reason TEXT,
    at REAL NOT NULL,
    UNIQUE (round, status)
);
CREATE TABLE participants (
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    PRIMARY KEY (round, market)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    event_json TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE epsilons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    certified INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE skips (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    epsilon_if_run REAL NOT NULL,
    epsilon_budget REAL NOT NULL,
    delta REAL NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""


def append_only_triggers() -> str:
    out = []
    for t in TABLES:
        for op in ("UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} "
                f"BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;"
            )
    return "\n".join(out)


def config_hash(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``run_config`` (sorted keys, no whitespace)."""
    try:
        text = json.dumps(run_config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError("run_config", f"must be JSON-serializable: {exc}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def connect(p: Path) -> sqlite3.Connection:
    """A connection whose committed transactions survive SIGKILL (WAL, ``synchronous=FULL``)."""
    try:
        conn = sqlite3.connect(str(p), isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise LedgerError(f"{p}: cannot open ledger ({exc})") from None
    # Autocommit mode: `with conn` below opens nothing, so wrap writes explicitly.
    conn.isolation_level = "DEFERRED"
    return conn
