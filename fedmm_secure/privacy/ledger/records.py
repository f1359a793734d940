"""What the ledger's reads return, and the argument checks every write shares."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

__all__ = [
    "RoundRecord",
    "EpsilonRecord",
    "DecisionRecord",
    "ResumeState",
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


def check_round(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError("round", f"must be a non-negative int, got {r!r}")
    return r


def check_market(m: str) -> str:
    if not isinstance(m, str) or not m:
        raise ConfigError("market", f"must be a non-empty string, got {m!r}")
    return m
