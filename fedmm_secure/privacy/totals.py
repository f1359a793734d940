"""The total privacy spent on each market's data across everything a run did.

A run may train several methods on the same markets (the deployed federated model and the
comparison baselines). Each method's DP-SGD reads the same raw rows, so what a market's data has
lost is the composition of *all* of those methods' events, not the deployed method's alone; a
method that reads raw rows without DP (the pooled ``centralized`` upper bound) makes it infinite.

Composition is by the run's own accountant over every event of the market, in method order: the
accountants compose heterogeneous subsampled-Gaussian events exactly as they compose one
method's rounds, so the total is a certified upper bound whenever the accountant is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .accountant import make_accountant
from .composed import ComposedAccountants
from .events import SubsampledGaussianEvent

__all__ = ["NON_PRIVATE_METHODS", "MarketTotal", "compose_totals", "total_to_dict"]

# Methods that read every market's raw rows without DP: the spend on those markets is unbounded.
NON_PRIVATE_METHODS: frozenset[str] = frozenset({"centralized"})


@dataclass(frozen=True)
class MarketTotal:
    """What one market's data has spent across every method of a run."""

    market: str
    epsilon: float                       # math.inf when a non-private method read the market
    delta: float
    accountant: str
    certified: bool
    unit: str | None                     # the protected unit of every event (one per run)
    steps: int                           # DP steps over all methods
    by_method: tuple[tuple[str, int], ...]  # (method, DP steps) of each DP method that charged it
    non_private: tuple[str, ...]         # methods that read the market's raw rows without DP

    @property
    def infinite(self) -> bool:
        return math.isinf(self.epsilon)


def compose_totals(events: Mapping[str, Mapping[str, Sequence[SubsampledGaussianEvent]]], *,
                   accountant: str, delta: float, non_private: Sequence[str] = (),
                   markets: Sequence[str] | None = None,
                   composed: ComposedAccountants | None = None) -> dict[str, MarketTotal]:
    """``events[method][market]``: each method's DP events on each market. ``non_private``:
    methods of the run that read every market's raw rows without DP. ``markets``: report these
    too (a market only a non-private method touched is still infinite). ``composed``: reuse an
    accountant already built for the same events (a one-method run's total is its ledger's)."""
    names = sorted({m for per in events.values() for m in per} | set(markets or ()))
    out: dict[str, MarketTotal] = {}
    for market in names:
        by_method = []
        units = set()
        every: list[SubsampledGaussianEvent] = []
        for method, per in events.items():
            evs = list(per.get(market, ()))
            every += evs
            units |= {e.unit for e in evs}
            if evs:
                by_method.append((method, sum(e.steps for e in evs)))
        # Composing refuses mixing units: a total over different units means nothing.
        if composed is not None:
            acc = composed.get(every, accountant)
        else:
            acc = make_accountant(accountant)
            for e in every:
                acc.compose(e)
        if len(units) > 1:
            raise ConfigError("unit", f"market {market!r} has events of units {sorted(units)}")
        eps = math.inf if non_private else acc.get_epsilon(delta)
        out[market] = MarketTotal(market=market, epsilon=eps, delta=float(delta), accountant=accountant,
                                  certified=acc.certified, unit=next(iter(units), None), steps=acc.steps,
                                  by_method=tuple(by_method), non_private=tuple(non_private))
    return out


def total_to_dict(t: MarketTotal, *, deployed_epsilon: float | None) -> dict:
    """JSON form for ``results.json``; an infinite epsilon is written as null with
    ``infinite: true`` (JSON has no infinity)."""
    return {
        "epsilon": None if t.infinite else t.epsilon,
        "infinite": t.infinite,
        "deployed_epsilon": deployed_epsilon,
        "delta": t.delta,
        "accountant": t.accountant,
        "certified": t.certified,
        "unit": t.unit,
        "steps": t.steps,
        "dp_methods": {m: s for m, s in t.by_method},
        "non_private_methods": list(t.non_private),
    }
