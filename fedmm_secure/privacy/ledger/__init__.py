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
* **Tamper-evident.** Every row is an entry of one SHA-256 hash chain that starts from the
  run's configuration hash and a random run id; :func:`verify_ledger` recomputes it and names
  the first edited, deleted, inserted or reordered entry. The head (entry count and last hash)
  goes into ``results.json`` with the run's results, so removing the last rows is detected
  too. With a market's Ed25519 identity key the head is also signed at every round commit and
  at the end of the run, so a rewritten chain cannot be passed off without that key.

Modules: :mod:`.schema` (file format), :mod:`.chain` (entry hashing and signed heads),
:mod:`.records` (what reads return), :mod:`.store` (the :class:`Ledger`), :mod:`.verify`
(:func:`verify_ledger`), :mod:`.accounting` (spent epsilon and resume position).
"""

from __future__ import annotations

from .records import (DecisionRecord, EpsilonRecord, EventRecord, LedgerAnchor, ResumeState,
                      RoundRecord)
from .schema import LEDGER_FILENAME, config_hash
from .store import Ledger
from .verify import OLD_LEDGER_MESSAGE, BadEntry, LedgerVerification, verify_ledger

__all__ = [
    "LEDGER_FILENAME",
    "Ledger",
    "RoundRecord",
    "EpsilonRecord",
    "DecisionRecord",
    "ResumeState",
    "EventRecord",
    "LedgerAnchor",
    "BadEntry",
    "LedgerVerification",
    "OLD_LEDGER_MESSAGE",
    "verify_ledger",
    "config_hash",
]
