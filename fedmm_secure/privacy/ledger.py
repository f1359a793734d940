"""Append-only, crash-safe privacy ledger (one SQLite file in the run directory).

What it guarantees:

* **Durability.** Every ``record_*`` call is its own committed transaction (WAL journal,
  ``synchronous=FULL``): once it returns, the row survives SIGKILL of the process (and, with
  FULL sync, power loss on a POSIX filesystem that honours fsync).
* **Never under-count.** The round loop writes a round's DP events *before* it releases the
  round's result. Events count from the moment they are written, whether or not the round was
  later committed: :meth:`Ledger.events_for` returns the events of started-but-uncommitted
  (crashed) rounds too, so an accountant rebuilt on resume is at least the one that crashed.
* **Append-only.** Triggers make every UPDATE and DELETE fail; a round's status is the latest
  of its append-only status rows (started -> committed | skipped).
* **Same run.** The run configuration's SHA-256 (canonical JSON) is stored; opening an
  existing ledger with a different configuration raises :class:`LedgerError`.
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, LedgerError
from .accountant import EpsilonReport, PrivacyAccountant, make_accountant
from .events import SubsampledGaussianEvent, event_from_dict

__all__ = [
    "LEDGER_FILENAME",
    "Ledger",
    "RoundRecord",
    "EpsilonRecord",
    "DecisionRecord",
    "ResumeState",
    "config_hash",
]

LEDGER_FILENAME = "ledger.sqlite"
_FORMAT = "fedmm-secure-privacy-ledger"
_VERSION = "1"
_TABLES = ("meta", "runs", "rounds", "participants", "events", "epsilons", "skips", "decisions")

_SCHEMA = """
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


def _append_only_triggers() -> str:
    out = []
    for t in _TABLES:
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


@dataclass(frozen=True)
class RoundRecord:
    round: int
    status: str  # latest status: "started", "committed" or "skipped"
    participants: tuple[str, ...]
    reason: str | None


@dataclass(frozen=True)
class EpsilonRecord:
    round: int
    market: str
    epsilon: float
    delta: float
    accountant: str
    certified: bool


@dataclass(frozen=True)
class DecisionRecord:
    round: int
    market: str
    allowed: bool
    epsilon_if_run: float
    epsilon_budget: float
    delta: float
    reason: str


@dataclass(frozen=True)
class ResumeState:
    """Where a resumed run continues. ``incomplete_rounds`` were started and never committed or
    skipped (a crash); their events are already counted by :meth:`Ledger.events_for`."""

    last_committed_round: int | None
    next_round: int
    incomplete_rounds: tuple[int, ...]
    markets: tuple[str, ...]


def _check_round(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError("round", f"must be a non-negative int, got {r!r}")
    return r


def _check_market(m: str) -> str:
    if not isinstance(m, str) or not m:
        raise ConfigError("market", f"must be a non-empty string, got {m!r}")
    return m


class _Rows(list):
    """fetchall() result with the two cursor methods the reads use."""

    def fetchall(self) -> list:
        return list(self)

    def fetchone(self):
        return self[0] if self else None


class Ledger:
    """Thin stateful wrapper over the ledger file. Use :meth:`open`, not the constructor."""

    def __init__(self, conn: sqlite3.Connection, path: Path, config_hash_: str, config: dict) -> None:
        self._conn = conn
        self.path = path
        self.config_hash = config_hash_
        self.run_config = config

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, run_config: Mapping[str, Any] | None = None,
             create: bool = False) -> "Ledger":
        """Create (``create=True``; the file must not exist) or reopen a ledger.

        ``path`` may be the run directory (the file is ``ledger.sqlite`` inside it) or the file.
        Reopening with ``run_config`` checks its hash against the stored one (mismatch ->
        LedgerError) and records the resume; without it the ledger is opened for reading and
        further appends (``budget check``).
        """
        p = Path(path)
        if p.is_dir() or (create and not p.exists() and p.suffix != ".sqlite"):
            p.mkdir(parents=True, exist_ok=True)
            p = p / LEDGER_FILENAME
        if create:
            if run_config is None:
                raise ConfigError("run_config", "required to create a ledger")
            if p.exists():
                raise LedgerError(f"{p}: ledger already exists; resume the run instead of creating")
            h = config_hash(run_config)
            conn = cls._connect(p)
            try:
                with conn:
                    conn.executescript("BEGIN;" + _SCHEMA + _append_only_triggers() + "COMMIT;")
                with conn:
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                     [("format", _FORMAT), ("version", _VERSION),
                                      ("config_hash", h)])
                    conn.execute("INSERT INTO runs (config_hash, config_json, opened_at, kind) "
                                 "VALUES (?, ?, ?, 'create')",
                                 (h, json.dumps(run_config, sort_keys=True), time.time()))
            except sqlite3.Error as exc:
                conn.close()
                raise LedgerError(f"{p}: cannot create ledger: {exc}") from None
            return cls(conn, p, h, json.loads(json.dumps(run_config)))

        if not p.is_file():
            raise LedgerError(f"{p}: no privacy ledger found")
        conn = cls._connect(p)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"{p}: not a privacy ledger or corrupt ({exc})") from None
        if meta.get("format") != _FORMAT or not set(_TABLES) <= tables:
            conn.close()
            raise LedgerError(f"{p}: not a privacy ledger (missing format marker or tables)")
        if meta.get("version") != _VERSION:
            conn.close()
            raise LedgerError(f"{p}: unsupported ledger version {meta.get('version')!r}")
        try:
            (ok,) = conn.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"{p}: corrupt ledger ({exc})") from None
        if ok != "ok":
            conn.close()
            raise LedgerError(f"{p}: corrupt ledger ({ok})")
        stored = meta.get("config_hash", "")
        row = conn.execute("SELECT config_json FROM runs WHERE kind = 'create' ORDER BY id LIMIT 1").fetchone()
        stored_config = json.loads(row[0]) if row else {}
        if run_config is not None:
            h = config_hash(run_config)
            if h != stored:
                conn.close()
                raise LedgerError(
                    f"{p}: run configuration differs from the one this ledger was created with "
                    f"(hash {h[:12]} != {stored[:12]}); a resumed run must use the same config")
            with conn:
                conn.execute("INSERT INTO runs (config_hash, config_json, opened_at, kind) "
                             "VALUES (?, ?, ?, 'resume')",
                             (h, json.dumps(run_config, sort_keys=True), time.time()))
        return cls(conn, p, stored, stored_config)

    @staticmethod
    def _connect(p: Path) -> sqlite3.Connection:
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

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes (each one a durable transaction) --------------------------------------------
    def _write(self, sql: str, params: tuple) -> None:
        try:
            with self._conn:
                self._conn.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise LedgerError(f"ledger refused write: {exc}") from None
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from None

    def _q(self, sql: str, params: tuple = ()) -> "_Rows":
        """Run a read; any SQLite failure (a page corrupted after opening) is a LedgerError."""
        try:
            return _Rows(self._conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: corrupt ledger ({exc})") from None

    def _status(self, r: int) -> str | None:
        row = self._q(
            "SELECT status FROM rounds WHERE round = ? ORDER BY id DESC LIMIT 1", (r,)).fetchone()
        return row[0] if row else None

    def _require_open_round(self, r: int) -> None:
        st = self._status(r)
        if st is None:
            raise LedgerError(f"round {r} was not started")
        if st != "started":
            raise LedgerError(f"round {r} is already {st}")

    def record_round_start(self, round: int, participants: Iterable[str]) -> None:
        """Start ``round`` with its participant markets; rounds start in increasing order."""
        r = _check_round(round)
        parts = sorted({_check_market(m) for m in participants})
        (last,) = self._q("SELECT MAX(round) FROM rounds").fetchone()
        if last is not None and r <= last:
            raise LedgerError(f"round {r} must be greater than the last started round {last}")
        try:
            with self._conn:
                self._conn.execute("INSERT INTO rounds (round, status, reason, at) "
                                   "VALUES (?, 'started', NULL, ?)", (r, time.time()))
                self._conn.executemany("INSERT INTO participants (round, market) VALUES (?, ?)",
                                       [(r, m) for m in parts])
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from None

    def record_event(self, market: str, round: int, event: SubsampledGaussianEvent) -> None:
        """Record spent privacy. Call BEFORE the round's result leaves the market."""
        m, r = _check_market(market), _check_round(round)
        if not isinstance(event, SubsampledGaussianEvent):
            raise ConfigError("event", f"unsupported DP event {type(event).__name__}")
        self._require_open_round(r)
        if self._q("SELECT 1 FROM participants WHERE round = ? AND market = ?",
                              (r, m)).fetchone() is None:
            raise LedgerError(f"market {m!r} is not a participant of round {r}")
        self._write("INSERT INTO events (round, market, event_json, at) VALUES (?, ?, ?, ?)",
                    (r, m, json.dumps(event.to_dict(), sort_keys=True), time.time()))

    def record_epsilon(self, market: str, round: int, epsilon: float, delta: float,
                       accountant: str, *, certified: bool = True) -> None:
        m, r = _check_market(market), _check_round(round)
        if not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
            raise ConfigError("epsilon", f"must be a number >= 0, got {epsilon!r}")
        if self._status(r) is None:
            raise LedgerError(f"round {r} was not started")
        self._write("INSERT INTO epsilons (round, market, epsilon, delta, accountant, certified, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r, m, float(epsilon), float(delta), str(accountant), int(bool(certified)),
                     time.time()))

    def record_skip(self, market: str, round: int, reason: str) -> None:
        """A market sits this round out (e.g. its budget would be exceeded)."""
        m, r = _check_market(market), _check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        if self._status(r) is None:
            raise LedgerError(f"round {r} was not started")
        self._write("INSERT INTO skips (round, market, reason, at) VALUES (?, ?, ?, ?)",
                    (r, m, reason, time.time()))

    def record_decision(self, market: str, round: int, decision: Any) -> None:
        """Store a :class:`~fedmm_secure.privacy.budget.Decision` (allowed or not, and why)."""
        m, r = _check_market(market), _check_round(round)
        self._write(
            "INSERT INTO decisions (round, market, allowed, epsilon_if_run, epsilon_budget, delta,"
            " reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (r, m, int(bool(decision.allowed)), float(decision.epsilon_if_run),
             float(decision.epsilon_budget), float(decision.delta), str(decision.reason), time.time()))

    def commit_round(self, round: int) -> None:
        r = _check_round(round)
        self._require_open_round(r)
        self._write("INSERT INTO rounds (round, status, reason, at) VALUES (?, 'committed', NULL, ?)",
                    (r, time.time()))

    def skip_round(self, round: int, reason: str) -> None:
        """Close a started round without result (its events, if any, still count)."""
        r = _check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        self._require_open_round(r)
        self._write("INSERT INTO rounds (round, status, reason, at) VALUES (?, 'skipped', ?, ?)",
                    (r, reason, time.time()))

    # -- reads -------------------------------------------------------------------------------
    def events_for(self, market: str, *, committed_only: bool = False) -> list[SubsampledGaussianEvent]:
        """Every event of ``market`` in write order, INCLUDING those of uncommitted rounds
        (spent privacy counts whether or not the round finished)."""
        m = _check_market(market)
        rows = self._q(
            "SELECT round, event_json FROM events WHERE market = ? ORDER BY id", (m,)).fetchall()
        committed = {r for r, in self._q(
            "SELECT round FROM rounds WHERE status = 'committed'").fetchall()}
        out = []
        for r, text in rows:
            if committed_only and r not in committed:
                continue
            try:
                out.append(event_from_dict(json.loads(text)))
            except (ValueError, ConfigError, TypeError) as exc:
                raise LedgerError(f"{self.path}: corrupt event row in round {r}: {exc}") from None
        return out

    def spent_events(self) -> dict[str, list[SubsampledGaussianEvent]]:
        """Every market's events, uncommitted rounds included: what a resumed run composes
        before its first new round."""
        return {m: self.events_for(m) for m in self.markets()}

    def markets(self) -> tuple[str, ...]:
        rows = self._q(
            "SELECT market FROM events UNION SELECT market FROM participants "
            "UNION SELECT market FROM epsilons UNION SELECT market FROM skips").fetchall()
        return tuple(sorted(r[0] for r in rows))

    def rebuild_accountant(self, market: str, accountant: str = "pld", **options) -> PrivacyAccountant:
        """A fresh accountant that has composed every event of ``market`` in the ledger."""
        acc = make_accountant(accountant, **options)
        for e in self.events_for(market):
            acc.compose(e)
        return acc

    def spent(self, *, delta: float | None = None,
              accountant: str | None = None) -> dict[str, EpsilonReport]:
        """Epsilon actually spent per market, recomputed from the ledger's events (uncommitted
        rounds included) and never less than an epsilon the run recorded for that market.
        ``delta`` and ``accountant`` default to the last ones recorded for that market (delta:
        else for any market; accountant: else ``pld``); with no recorded delta at all, pass one.
        For ``budget check``."""
        out: dict[str, EpsilonReport] = {}
        every = self.epsilons()
        for m in self.markets():
            recs = [r for r in every if r.market == m]
            # delta is run-level: fall back to the last one recorded for any market.
            d = delta if delta is not None else (recs or every or [None])[-1]
            d = d.delta if isinstance(d, EpsilonRecord) else d
            if d is None:
                raise ConfigError("delta", f"market {m!r} has no recorded delta; pass one")
            name = accountant or (recs[-1].accountant if recs else "pld")
            rep = self.rebuild_accountant(m, name).report(d)
            # The run's accountant composes round by round and the discretised PLD depends
            # slightly on that history (~0.1%), so a recomputation can land just below an
            # epsilon the run already reported. Both are upper bounds; the spend on record is
            # never less than what was released with the same accountant and delta.
            released = [r.epsilon for r in recs if r.accountant == name and r.delta == d]
            if released and max(released) > rep.epsilon:
                rep = dataclasses.replace(rep, epsilon=max(released))
            out[m] = rep
        return out

    def last_committed_round(self) -> int | None:
        (r,) = self._q("SELECT MAX(round) FROM rounds WHERE status = 'committed'").fetchone()
        return r

    def rounds(self) -> list[RoundRecord]:
        out = []
        for (r,) in self._q("SELECT DISTINCT round FROM rounds ORDER BY round").fetchall():
            status, reason = self._q(
                "SELECT status, reason FROM rounds WHERE round = ? ORDER BY id DESC LIMIT 1",
                (r,)).fetchone()
            parts = tuple(m for (m,) in self._q(
                "SELECT market FROM participants WHERE round = ? ORDER BY market", (r,)).fetchall())
            out.append(RoundRecord(round=r, status=status, participants=parts, reason=reason))
        return out

    def epsilons(self, market: str | None = None) -> list[EpsilonRecord]:
        sql = "SELECT round, market, epsilon, delta, accountant, certified FROM epsilons"
        params: tuple = ()
        if market is not None:
            sql += " WHERE market = ?"
            params = (market,)
        rows = self._q(sql + " ORDER BY id", params).fetchall()
        return [EpsilonRecord(r, m, e, d, a, bool(c)) for r, m, e, d, a, c in rows]

    def skips(self) -> list[tuple[int, str, str]]:
        return [tuple(r) for r in self._q(
            "SELECT round, market, reason FROM skips ORDER BY id").fetchall()]

    def decisions(self) -> list[DecisionRecord]:
        rows = self._q(
            "SELECT round, market, allowed, epsilon_if_run, epsilon_budget, delta, reason "
            "FROM decisions ORDER BY id").fetchall()
        return [DecisionRecord(r, m, bool(a), e, b, d, why) for r, m, a, e, b, d, why in rows]

    def resume_state(self) -> ResumeState:
        recs = self.rounds()
        last_started = max((r.round for r in recs), default=None)
        return ResumeState(
            last_committed_round=self.last_committed_round(),
            next_round=0 if last_started is None else last_started + 1,
            incomplete_rounds=tuple(r.round for r in recs if r.status == "started"),
            markets=self.markets(),
        )
