"""Budget policy: before a round, would a market's epsilon stay within budget?

Pure logic over an accountant's ``predict_epsilon``; the round loop records every
:class:`Decision` in the ledger and either skips the market (``on_exceed="skip"``) or stops the
run (``on_exceed="stop"`` raises :class:`BudgetExceededError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

from ..errors import BudgetExceededError, ConfigError
from .accountant import PrivacyAccountant, check_delta
from .events import SubsampledGaussianEvent

__all__ = ["BudgetPolicy", "Decision", "OnExceed"]

OnExceed = Literal["skip", "stop"]
_ON_EXCEED = ("skip", "stop")


@dataclass(frozen=True)
class Decision:
    """Outcome of a budget check for one market and one planned round."""

    allowed: bool
    epsilon_if_run: float
    epsilon_budget: float
    delta: float
    reason: str
    certified: bool = True

    def to_dict(self) -> dict:
        return {"allowed": self.allowed, "epsilon_if_run": self.epsilon_if_run,
                "epsilon_budget": self.epsilon_budget, "delta": self.delta,
                "reason": self.reason, "certified": self.certified}


@dataclass(frozen=True, kw_only=True)
class BudgetPolicy:
    """``epsilon_budget`` at ``delta`` per market; what to do when a round would exceed it."""

    epsilon_budget: float
    delta: float
    on_exceed: OnExceed

    def __post_init__(self) -> None:
        e = self.epsilon_budget
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise ConfigError("epsilon_budget", f"must be a finite number > 0, got {e!r}")
        check_delta(self.delta)
        if self.on_exceed not in _ON_EXCEED:
            raise ConfigError("on_exceed", f"unknown policy {self.on_exceed!r}", allowed=", ".join(_ON_EXCEED))

    def decide(self, accountant: PrivacyAccountant,
               planned_events: Iterable[SubsampledGaussianEvent], *, market: str = "") -> Decision:
        """Would running ``planned_events`` keep ``accountant`` within budget?

        Does not change the accountant. With ``on_exceed="stop"`` a refused round raises
        :class:`BudgetExceededError` (after building the decision, which the exception carries
        as ``.decision`` so the caller can still record it).
        """
        planned = list(planned_events)
        eps = accountant.predict_epsilon(planned, self.delta)
        who = f"market {market!r}: " if market else ""
        if eps <= self.epsilon_budget:
            d = Decision(True, eps, float(self.epsilon_budget), float(self.delta),
                         f"{who}epsilon after round {eps:.4g} <= budget {self.epsilon_budget:g} "
                         f"at delta={self.delta:g}", accountant.certified)
            return d
        d = Decision(False, eps, float(self.epsilon_budget), float(self.delta),
                     f"{who}round would reach epsilon {eps:.4g} > budget {self.epsilon_budget:g} "
                     f"at delta={self.delta:g}", accountant.certified)
        if self.on_exceed == "stop":
            err = BudgetExceededError(d.reason)
            err.decision = d  # type: ignore[attr-defined]
            raise err
        return d

    def check_spent(self, accountant: PrivacyAccountant) -> Decision:
        """Is what was already spent within budget? (``budget check`` on a finished run.)"""
        eps = accountant.get_epsilon(self.delta)
        ok = eps <= self.epsilon_budget
        rel = "<=" if ok else ">"
        return Decision(ok, eps, float(self.epsilon_budget), float(self.delta),
                        f"spent epsilon {eps:.4g} {rel} budget {self.epsilon_budget:g} at delta={self.delta:g}",
                        accountant.certified)
