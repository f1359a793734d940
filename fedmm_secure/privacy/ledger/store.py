"""The ledger's storage: opening (create, resume, read), the durable writes, the reads.

Every row is written through :meth:`Ledger._transaction` / :meth:`Ledger._append`, which make it
the next entry of the hash chain (chain.py) in the same SQLite transaction as the row, so a
crash leaves either the row with its link or neither.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ...errors import ConfigError, LedgerError
from ...primitives.keys import IdentityPrivateKey
from ..accountant import EpsilonReport, PrivacyAccountant
from ..composed import ComposedAccountants
from ..events import SubsampledGaussianEvent, event_from_dict
from . import accounting
from .chain import GENESIS_PREV, canonical_entry, coerce, entry_hash, head_message
from .records import (DecisionRecord, EpsilonRecord, EventRecord, LedgerAnchor, ResumeState,
                      RoundRecord, check_market, check_round)
from .schema import (COLUMNS, FORMAT, LAST_INDEX_SQL, LEDGER_FILENAME, SCHEMA, TABLES,
                     UNCHAINED_VERSIONS, VERSION, append_only_triggers, config_hash, connect)
from .verify import OLD_LEDGER_MESSAGE, verify_ledger

__all__ = ["Ledger"]


class _Rows(list):
    """fetchall() result with the two cursor methods the reads use."""

    def fetchall(self) -> list:
        return list(self)

    def fetchone(self):
        return self[0] if self else None


class Ledger:
    """Thin stateful wrapper over the ledger file. Use :meth:`open`, not the constructor."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, config_hash_: str, config: dict,
                 run_id: str, signer: str | None, signing_key: IdentityPrivateKey | None,
                 entries: int, head_hash: str) -> None:
        self._conn = conn
        self.path = path
        self.config_hash = config_hash_
        self.run_config = config
        self.run_id = run_id
        self._signer = signer
        self._key = signing_key
        self._count, self._head = entries, head_hash
        self._staged = (entries, head_hash)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, run_config: Mapping[str, Any] | None = None,
             create: bool = False, signing_key: IdentityPrivateKey | None = None,
             method: str | None = None, run_methods: Sequence[str] | None = None) -> "Ledger":
        """Create (``create=True``; the file must not exist) or reopen a ledger.

        ``path`` may be the run directory (the file is ``ledger.sqlite`` inside it) or the file.
        Reopening with ``run_config`` resumes the run: the hash chain is verified first (a
        tampered ledger is not continued), the configuration's hash must match the stored one,
        and the resume is recorded. Without ``run_config`` the ledger is opened for reading.

        ``signing_key``: the market's identity key. A ledger created with one signs its head at
        every round commit and at :meth:`finish`, and can only be resumed with the same key.

        ``method``: the training method whose spend this ledger holds (a run that trains several
        methods on the same markets keeps one ledger per method); written as a chained ``meta``
        entry at creation, so it cannot be relabelled without breaking the chain. ``run_methods``:
        every method the run trains on the same markets (also chained), so a verifier knows which
        other ledgers must exist without trusting ``results.json``.
        """
        p = Path(path)
        if p.is_dir() or (create and not p.exists() and p.suffix != ".sqlite"):
            p.mkdir(parents=True, exist_ok=True)
            p = p / LEDGER_FILENAME
        if create:
            return cls._create(p, run_config, signing_key, method, run_methods)
        if not p.is_file():
            raise LedgerError(f"{p}: no privacy ledger found")
        conn = connect(p)
        try:
            ledger = cls._reopen(conn, p, signing_key)
        except BaseException:
            conn.close()
            raise
        if run_config is not None:
            try:
                ledger._resume(run_config)
            except BaseException:
                ledger.close()
                raise
        return ledger

    @classmethod
    def _create(cls, p: Path, run_config: Mapping[str, Any] | None,
                signing_key: IdentityPrivateKey | None, method: str | None = None,
                run_methods: Sequence[str] | None = None) -> "Ledger":
        if run_config is None:
            raise ConfigError("run_config", "required to create a ledger")
        if p.exists():
            raise LedgerError(f"{p}: ledger already exists; resume the run instead of creating")
        h = config_hash(run_config)
        signer = signing_key.public_key().to_bytes().hex() if signing_key is not None else None
        conn = connect(p)
        try:
            with conn:
                conn.executescript("BEGIN;" + SCHEMA + append_only_triggers() + "COMMIT;")
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"{p}: cannot create ledger: {exc}") from None
        # A fresh random run id: two runs of one configuration still have unrelated chains, so
        # entries cannot be spliced from one ledger into another.
        ledger = cls(conn, p, config_hash_=h, config=json.loads(json.dumps(run_config)),
                     run_id=secrets.token_hex(16), signer=signer, signing_key=signing_key,
                     entries=0, head_hash=GENESIS_PREV)
        try:
            with ledger._transaction():
                ledger._append("runs", {"run_id": ledger.run_id, "config_hash": h,
                                        "config_json": json.dumps(run_config, sort_keys=True),
                                        "signer": signer, "opened_at": time.time(), "kind": "create"})
                for key, value in (("format", FORMAT), ("version", VERSION), ("config_hash", h)):
                    ledger._append("meta", {"key": key, "value": value})
                if method is not None:
                    ledger._append("meta", {"key": "method", "value": str(method)})
                if run_methods is not None:
                    ledger._append("meta", {"key": "run_methods", "value": json.dumps([str(m) for m in run_methods])})
        except LedgerError:
            conn.close()
            raise
        return ledger

    @classmethod
    def _reopen(cls, conn: sqlite3.Connection, p: Path,
                signing_key: IdentityPrivateKey | None) -> "Ledger":
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        except sqlite3.Error as exc:
            raise LedgerError(f"{p}: not a privacy ledger or corrupt ({exc})") from None
        if meta.get("format") != FORMAT:
            raise LedgerError(f"{p}: not a privacy ledger (missing format marker or tables)")
        if meta.get("version") in UNCHAINED_VERSIONS:
            raise LedgerError(f"{p}: {OLD_LEDGER_MESSAGE}; it cannot be verified or continued")
        if meta.get("version") != VERSION:
            raise LedgerError(f"{p}: unsupported ledger version {meta.get('version')!r}")
        if not set(TABLES) <= tables:
            raise LedgerError(f"{p}: not a privacy ledger (tables missing: {sorted(set(TABLES) - tables)})")
        try:
            (ok,) = conn.execute("PRAGMA quick_check").fetchone()
            (last,) = conn.execute(LAST_INDEX_SQL).fetchone()
            genesis = conn.execute("SELECT run_id, config_hash, config_json, signer FROM runs "
                                   "WHERE id = 0 AND kind = 'create'").fetchone()
        except sqlite3.Error as exc:
            raise LedgerError(f"{p}: corrupt ledger ({exc})") from None
        if ok != "ok":
            raise LedgerError(f"{p}: corrupt ledger ({ok})")
        if genesis is None or last is None:
            raise LedgerError(f"{p}: the ledger's first entry (the run's creation) is missing")
        run_id, stored, config_json, signer = genesis
        if signing_key is not None and signer is None:
            raise LedgerError(f"{p}: this ledger was created without a signing key; open it without one")
        if signing_key is not None and signing_key.public_key().to_bytes().hex() != signer:
            raise LedgerError(f"{p}: the signing key given is not the one this ledger was created with")
        head = cls._hash_of(conn, p, last)
        return cls(conn, p, config_hash_=stored, config=json.loads(config_json), run_id=run_id,
                   signer=signer, signing_key=signing_key, entries=last + 1, head_hash=head)

    @staticmethod
    def _hash_of(conn: sqlite3.Connection, p: Path, index: int) -> str:
        for t in TABLES:
            row = conn.execute(f"SELECT hash FROM {t} WHERE id = ?", (index,)).fetchone()
            if row is not None:
                return row[0]
        raise LedgerError(f"{p}: corrupt ledger (entry {index} not found)")

    def _resume(self, run_config: Mapping[str, Any]) -> None:
        h = config_hash(run_config)
        if h != self.config_hash:
            raise LedgerError(
                f"{self.path}: run configuration differs from the one this ledger was created with "
                f"(hash {h[:12]} != {self.config_hash[:12]}); a resumed run must use the same config")
        if self._signer is not None and self._key is None:
            raise LedgerError(f"{self.path}: this ledger's heads are signed; resume it with the market's "
                              "identity key")
        check = verify_ledger(self.path, public_key=self._key.public_key() if self._key else None)
        if not check.ok:
            raise LedgerError(f"{self.path}: ledger verification failed at {check.first_bad_entry}; "
                              "a tampered ledger is not continued")
        with self._transaction():
            self._append("runs", {"run_id": self.run_id, "config_hash": h,
                                  "config_json": json.dumps(run_config, sort_keys=True),
                                  "signer": self._signer, "opened_at": time.time(), "kind": "resume"})

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the chain ---------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """How many entries the chain holds (what this process has written or read)."""
        return self._count

    @property
    def head_hash(self) -> str:
        return self._head

    @property
    def method(self) -> str | None:
        """The method whose spend this ledger holds (None: written without a method tag)."""
        row = self._q("SELECT value FROM meta WHERE key = 'method'").fetchone()
        return None if row is None else row[0]

    @property
    def run_methods(self) -> tuple[str, ...] | None:
        """Every method of the run, as recorded at creation (None: not recorded)."""
        row = self._q("SELECT value FROM meta WHERE key = 'run_methods'").fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            raise LedgerError(f"{self.path}: corrupt run_methods entry") from None
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise LedgerError(f"{self.path}: corrupt run_methods entry")
        return tuple(value)

    @property
    def signed(self) -> bool:
        return self._signer is not None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One durable transaction; the entries appended inside become the chain's new head
        only once it has committed."""
        if self._signer is not None and self._key is None:
            raise LedgerError(f"{self.path}: this ledger signs its heads; open it with the market's "
                              "identity key to append")
        self._staged = (self._count, self._head)
        try:
            with self._conn:
                # IMMEDIATE: take the write lock before reading the head, so two writers can
                # never both append entry n.
                self._conn.execute("BEGIN IMMEDIATE")
                (last,) = self._conn.execute(LAST_INDEX_SQL).fetchone()
                if (-1 if last is None else last) != self._count - 1:
                    raise LedgerError(f"{self.path}: the ledger was appended to by another writer")
                yield
        except sqlite3.IntegrityError as exc:
            raise LedgerError(f"ledger refused write: {exc}") from None
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from None
        self._count, self._head = self._staged

    def _append(self, table: str, values: Mapping[str, Any]) -> None:
        """Insert one row as the next entry (inside :meth:`_transaction`)."""
        index, prev = self._staged
        row = {name: coerce(kind, values[name]) for name, kind in COLUMNS[table]}
        digest = entry_hash(prev, canonical_entry(table, index, row))
        names = ["id", *row, "prev_hash", "hash"]
        self._conn.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                           (index, *row.values(), prev, digest))
        self._staged = (index + 1, digest)

    def _append_signed_head(self, kind: str, round: int | None) -> None:
        if self._key is None:
            return
        count, head = self._staged
        signature = self._key.sign(head_message(self.run_id, count, head, kind))
        self._append("heads", {"kind": kind, "round": round, "count": count, "head_hash": head,
                               "signature": signature.hex(), "at": time.time()})

    def finish(self) -> LedgerAnchor:
        """The head to release with the run's results (``results.json``), signed first when the
        ledger has a key. Call once the run's last round is committed."""
        if self._key is not None:
            with self._transaction():
                self._append_signed_head("finish", None)
        committed = sum(r.status == "committed" for r in self.rounds())
        return LedgerAnchor(entries=self._count, head=self._head, run_id=self.run_id,
                            committed_rounds=committed, signed=self.signed)

    # -- writes (each one a durable transaction) --------------------------------------------
    def _write(self, table: str, values: Mapping[str, Any]) -> None:
        with self._transaction():
            self._append(table, values)

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
        with self._transaction():
            self._append("rounds", {"round": r, "status": "started", "reason": None, "at": time.time()})
            for m in parts:
                self._append("participants", {"round": r, "market": m})

    def record_event(self, market: str, round: int, event: SubsampledGaussianEvent) -> None:
        """Record spent privacy. Call BEFORE the round's result leaves the market."""
        m, r = check_market(market), check_round(round)
        if not isinstance(event, SubsampledGaussianEvent):
            raise ConfigError("event", f"unsupported DP event {type(event).__name__}")
        self._require_open_round(r)
        if self._q("SELECT 1 FROM participants WHERE round = ? AND market = ?",
                   (r, m)).fetchone() is None:
            raise LedgerError(f"market {m!r} is not a participant of round {r}")
        self._write("events", {"round": r, "market": m, "at": time.time(),
                               "event_json": json.dumps(event.to_dict(), sort_keys=True)})

    def record_epsilon(self, market: str, round: int, epsilon: float, delta: float,
                       accountant: str, *, certified: bool = True) -> None:
        m, r = check_market(market), check_round(round)
        if not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
            raise ConfigError("epsilon", f"must be a number >= 0, got {epsilon!r}")
        if self._status(r) is None:
            raise LedgerError(f"round {r} was not started")
        self._write("epsilons", {"round": r, "market": m, "epsilon": epsilon, "delta": delta,
                                 "accountant": accountant, "certified": int(bool(certified)),
                                 "at": time.time()})

    def record_skip(self, market: str, round: int, reason: str) -> None:
        """A market sits this round out (e.g. its budget would be exceeded)."""
        m, r = check_market(market), check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        if self._status(r) is None:
            raise LedgerError(f"round {r} was not started")
        self._write("skips", {"round": r, "market": m, "reason": reason, "at": time.time()})

    def record_decision(self, market: str, round: int, decision: Any) -> None:
        """Store a :class:`~fedmm_secure.privacy.budget.Decision` (allowed or not, and why)."""
        m, r = check_market(market), check_round(round)
        self._write("decisions", {"round": r, "market": m, "allowed": int(bool(decision.allowed)),
                                  "epsilon_if_run": decision.epsilon_if_run,
                                  "epsilon_budget": decision.epsilon_budget, "delta": decision.delta,
                                  "reason": str(decision.reason), "at": time.time()})

    def commit_round(self, round: int) -> None:
        r = check_round(round)
        self._require_open_round(r)
        with self._transaction():
            self._append("rounds", {"round": r, "status": "committed", "reason": None, "at": time.time()})
            self._append_signed_head("commit", r)

    def skip_round(self, round: int, reason: str) -> None:
        """Close a started round without result (its events, if any, still count)."""
        r = check_round(round)
        if not isinstance(reason, str) or not reason:
            raise ConfigError("reason", "a skip needs a reason")
        self._require_open_round(r)
        self._write("rounds", {"round": r, "status": "skipped", "reason": reason, "at": time.time()})

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

    def event_records(self, market: str | None = None) -> list[EventRecord]:
        """Events with the entry and round that hold them, in write order."""
        sql, params = "SELECT id, round, market, event_json FROM events", ()
        if market is not None:
            sql, params = sql + " WHERE market = ?", (check_market(market),)
        out = []
        for entry, r, m, text in self._q(sql + " ORDER BY id", params).fetchall():
            try:
                out.append(EventRecord(entry, r, m, event_from_dict(json.loads(text))))
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

    def spent(self, *, delta: float | None = None, accountant: str | None = None,
              composed: ComposedAccountants | None = None) -> dict[str, EpsilonReport]:
        """Epsilon spent per market (see :func:`.accounting.spent`); for ``budget check``."""
        return accounting.spent(self, delta=delta, accountant=accountant, composed=composed)

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
        sql = "SELECT round, market, epsilon, delta, accountant, certified, id FROM epsilons"
        params: tuple = ()
        if market is not None:
            sql += " WHERE market = ?"
            params = (market,)
        rows = self._q(sql + " ORDER BY id", params).fetchall()
        return [EpsilonRecord(r, m, e, d, a, bool(c), i) for r, m, e, d, a, c, i in rows]

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
