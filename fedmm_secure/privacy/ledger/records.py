"""What the ledger's reads return, and the argument checks every write shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ConfigError, LedgerError
from ..events import SubsampledGaussianEvent

__all__ = [
    "RoundRecord",
    "EpsilonRecord",
    "DecisionRecord",
    "ResumeState",
    "EventRecord",
    "LedgerAnchor",
    "check_round",
    "check_market",
]


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
    entry: int | None = None  # index of the ledger entry that holds it


@dataclass(frozen=True)
class EventRecord:
    entry: int  # index of the ledger entry that holds it
    round: int
    market: str
    event: SubsampledGaussianEvent


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
    skipped (a crash); their events are already counted by ``Ledger.events_for``."""

    last_committed_round: int | None
    next_round: int
    incomplete_rounds: tuple[int, ...]
    markets: tuple[str, ...]


@dataclass(frozen=True)
class LedgerAnchor:
    """The ledger's head as the run released it (``results.json``): how many entries, the hash
    of the last one, which ledger, how many rounds were committed, whether heads are signed.
    A copy outside the ledger is what makes removing its last rows detectable."""

    entries: int
    head: str
    run_id: str
    committed_rounds: int
    signed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "head": self.head, "run_id": self.run_id,
                "committed_rounds": self.committed_rounds, "signed": self.signed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LedgerAnchor":
        try:
            out = cls(entries=d["entries"], head=d["head"], run_id=d["run_id"],
                      committed_rounds=d["committed_rounds"], signed=d["signed"])
        except (KeyError, TypeError):
            raise LedgerError(f"malformed ledger anchor {d!r}") from None
        ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in (out.entries, out.committed_rounds))
        if not (ints_ok and isinstance(out.head, str) and isinstance(out.run_id, str)
                and isinstance(out.signed, bool)):
            raise LedgerError(f"malformed ledger anchor {d!r}")
        return out


def check_round(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError("round", f"must be a non-negative int, got {r!r}")
    return r


def check_market(m: str) -> str:
    if not isinstance(m, str) or not m:
        raise ConfigError("market", f"must be a non-empty string, got {m!r}")
    return m
