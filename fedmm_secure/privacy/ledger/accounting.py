"""Spent privacy and resume position, computed from what a ledger holds.

Kept apart from the storage so the rules that decide how much a market has spent (uncommitted
rounds count; the spend on record never undercuts a released epsilon) read as one unit.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from ...errors import ConfigError
from ..accountant import EpsilonReport, PrivacyAccountant, make_accountant
from ..composed import ComposedAccountants
from ..events import SubsampledGaussianEvent
from .records import EpsilonRecord, ResumeState, RoundRecord

__all__ = ["LedgerReader", "rebuild_accountant", "spent", "resume_state"]


class LedgerReader(Protocol):
    def markets(self) -> tuple[str, ...]: ...

    def events_for(self, market: str, *, committed_only: bool = False) -> list[SubsampledGaussianEvent]: ...

    def epsilons(self, market: str | None = None) -> list[EpsilonRecord]: ...

    def rounds(self) -> list[RoundRecord]: ...

    def last_committed_round(self) -> int | None: ...


def rebuild_accountant(events: list[SubsampledGaussianEvent], accountant: str = "pld",
                       **options) -> PrivacyAccountant:
    """A fresh accountant that has composed ``events`` in order."""
    acc = make_accountant(accountant, **options)
    for e in events:
        acc.compose(e)
    return acc


def spent(ledger: LedgerReader, *, delta: float | None = None, accountant: str | None = None,
          composed: ComposedAccountants | None = None) -> dict[str, EpsilonReport]:
    """Epsilon actually spent per market, recomputed from the ledger's events (uncommitted
    rounds included) and never less than an epsilon the run recorded for that market.
    ``delta`` and ``accountant`` default to the last ones recorded for that market (delta:
    else for any market; accountant: else ``pld``); with no recorded delta at all, pass one.
    ``composed``: accountants already built for the same events (one PLD pass, not two)."""
    out: dict[str, EpsilonReport] = {}
    every = ledger.epsilons()
    for m in ledger.markets():
        recs = [r for r in every if r.market == m]
        # delta is run-level: fall back to the last one recorded for any market.
        d = delta if delta is not None else (recs or every or [None])[-1]
        d = d.delta if isinstance(d, EpsilonRecord) else d
        if d is None:
            raise ConfigError("delta", f"market {m!r} has no recorded delta; pass one")
        name = accountant or (recs[-1].accountant if recs else "pld")
        events = ledger.events_for(m)
        rep = (composed.get(events, name) if composed is not None else rebuild_accountant(events, name)).report(d)
        # The run's accountant composes round by round and the discretised PLD depends
        # slightly on that history (~0.1%), so a recomputation can land just below an
        # epsilon the run already reported. Both are upper bounds; the spend on record is
        # never less than what was released with the same accountant and delta.
        released = [r.epsilon for r in recs if r.accountant == name and r.delta == d]
        if released and max(released) > rep.epsilon:
            rep = dataclasses.replace(rep, epsilon=max(released))
        out[m] = rep
    return out


def resume_state(ledger: LedgerReader) -> ResumeState:
    recs = ledger.rounds()
    last_started = max((r.round for r in recs), default=None)
    return ResumeState(
        last_committed_round=ledger.last_committed_round(),
        next_round=0 if last_started is None else last_started + 1,
        incomplete_rounds=tuple(r.round for r in recs if r.status == "started"),
        markets=ledger.markets(),
    )
