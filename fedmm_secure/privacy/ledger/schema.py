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
    "UNCHAINED_VERSIONS",
    "TABLES",
    "COLUMNS",
    "SCHEMA",
    "LAST_INDEX_SQL",
    "append_only_triggers",
    "config_hash",
    "connect",
]

LEDGER_FILENAME = "ledger.sqlite"
FORMAT = "fedmm-secure-privacy-ledger"
# Version 2: every row is an entry of one hash chain (see chain.py). Version 1 had no chain.
VERSION = "2"
UNCHAINED_VERSIONS = ("1",)
TABLES = ("meta", "runs", "rounds", "participants", "events", "epsilons", "skips", "decisions",
          "heads")

# The content columns of each table, in hashing order, with the type the chain encodes them as
# ("?" = may be NULL). Every table also has ``id`` (the entry's index in the chain, shared by
# all tables), ``prev_hash`` and ``hash``.
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "meta": (("key", "text"), ("value", "text")),
    "runs": (("run_id", "text"), ("config_hash", "text"), ("config_json", "text"), ("signer", "text?"),
             ("opened_at", "real"), ("kind", "text")),
    "rounds": (("round", "int"), ("status", "text"), ("reason", "text?"), ("at", "real")),
    "participants": (("round", "int"), ("market", "text")),
    "events": (("round", "int"), ("market", "text"), ("event_json", "text"), ("at", "real")),
    "epsilons": (("round", "int"), ("market", "text"), ("epsilon", "real"), ("delta", "real"),
                 ("accountant", "text"), ("certified", "int"), ("at", "real")),
    "skips": (("round", "int"), ("market", "text"), ("reason", "text"), ("at", "real")),
    "decisions": (("round", "int"), ("market", "text"), ("allowed", "int"), ("epsilon_if_run", "real"),
                  ("epsilon_budget", "real"), ("delta", "real"), ("reason", "text"), ("at", "real")),
    "heads": (("kind", "text"), ("round", "int?"), ("count", "int"), ("head_hash", "text"),
              ("signature", "text"), ("at", "real")),
}

_CHAIN = "prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE"
SCHEMA = f"""
CREATE TABLE meta (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value TEXT NOT NULL, {_CHAIN});
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    signer TEXT,
    opened_at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('create', 'resume')),
    {_CHAIN}
);
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('started', 'committed', 'skipped')),
    reason TEXT,
    at REAL NOT NULL,
    {_CHAIN},
    UNIQUE (round, status)
);
CREATE TABLE participants (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    {_CHAIN},
    UNIQUE (round, market)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    event_json TEXT NOT NULL,
    at REAL NOT NULL,
    {_CHAIN}
);
CREATE TABLE epsilons (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    certified INTEGER NOT NULL,
    at REAL NOT NULL,
    {_CHAIN}
);
CREATE TABLE skips (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    {_CHAIN}
);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    market TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    epsilon_if_run REAL NOT NULL,
    epsilon_budget REAL NOT NULL,
    delta REAL NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    {_CHAIN}
);
CREATE TABLE heads (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('commit', 'finish')),
    round INTEGER,
    count INTEGER NOT NULL,
    head_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    at REAL NOT NULL,
    {_CHAIN}
);
"""

# The largest entry index in the file: the chain's length minus one.
LAST_INDEX_SQL = ("SELECT MAX(m) FROM ("
                  + " UNION ALL ".join(f"SELECT MAX(id) AS m FROM {t}" for t in TABLES) + ")")


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
