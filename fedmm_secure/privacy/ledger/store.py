"""The ledger's storage: opening (create, resume, read), the durable writes, the reads."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ...errors import ConfigError, LedgerError
from ..accountant import EpsilonReport, PrivacyAccountant
from ..events import SubsampledGaussianEvent, event_from_dict
from . import accounting
from .records import (DecisionRecord, EpsilonRecord, ResumeState, RoundRecord, check_market,
                      check_round)
from .schema import (FORMAT, LEDGER_FILENAME, SCHEMA, TABLES, VERSION, append_only_triggers,
                     config_hash, connect)

__all__ = ["Ledger"]


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
            conn = connect(p)
            try:
                with conn:
                    conn.executescript("BEGIN;" + SCHEMA + append_only_triggers() + "COMMIT;")
                with conn:
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                     [("format", FORMAT), ("version", VERSION),
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
        conn = connect(p)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"{p}: not a privacy ledger or corrupt ({exc})") from None
        if meta.get("format") != FORMAT or not set(TABLES) <= tables:
            conn.close()
            raise LedgerError(f"{p}: not a privacy ledger (missing format marker or tables)")
        if meta.get("version") != VERSION:
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
        r = check_round(round)
        parts = sorted({check_market(m) for m in participants})
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
        m, r = check_market(market), check_round(round)
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
        m, r = check_market(market), check_round(round)
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
        m, r = check_market(market), check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        if self._status(r) is None:
            raise LedgerError(f"round {r} was not started")
        self._write("INSERT INTO skips (round, market, reason, at) VALUES (?, ?, ?, ?)",
                    (r, m, reason, time.time()))

    def record_decision(self, market: str, round: int, decision: Any) -> None:
        """Store a :class:`~fedmm_secure.privacy.budget.Decision` (allowed or not, and why)."""
        m, r = check_market(market), check_round(round)
        self._write(
            "INSERT INTO decisions (round, market, allowed, epsilon_if_run, epsilon_budget, delta,"
            " reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (r, m, int(bool(decision.allowed)), float(decision.epsilon_if_run),
             float(decision.epsilon_budget), float(decision.delta), str(decision.reason), time.time()))

    def commit_round(self, round: int) -> None:
        r = check_round(round)
        self._require_open_round(r)
        self._write("INSERT INTO rounds (round, status, reason, at) VALUES (?, 'committed', NULL, ?)",
                    (r, time.time()))

    def skip_round(self, round: int, reason: str) -> None:
        """Close a started round without result (its events, if any, still count)."""
        r = check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        self._require_open_round(r)
        self._write("INSERT INTO rounds (round, status, reason, at) VALUES (?, 'skipped', ?, ?)",
                    (r, reason, time.time()))

    # -- reads -------------------------------------------------------------------------------
    def events_for(self, market: str, *, committed_only: bool = False) -> list[SubsampledGaussianEvent]:
        """Every event of ``market`` in write order, INCLUDING those of uncommitted rounds
        (spent privacy counts whether or not the round finished)."""
        m = check_market(market)
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
        return accounting.rebuild_accountant(self.events_for(market), accountant, **options)

    def spent(self, *, delta: float | None = None,
              accountant: str | None = None) -> dict[str, EpsilonReport]:
        """Epsilon spent per market (see :func:`.accounting.spent`); for ``budget check``."""
        return accounting.spent(self, delta=delta, accountant=accountant)

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
        return accounting.resume_state(self)
