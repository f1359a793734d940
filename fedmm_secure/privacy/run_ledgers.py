"""One ledger per DP method of a run, and the run's total spend per market.

A run trains several methods on the same markets. Every one of them that reads raw rows spends
privacy of those rows, so every one gets a ledger: the deployed method's (``fedmm`` when it runs)
is ``ledger.sqlite`` in the run directory, as before; each comparison baseline's is
``baselines/<method>/ledger.sqlite``. Each ledger is tagged with its method (a chained ``meta``
entry) and is written by that method's :class:`~fedmm_secure.privacy.session.PrivacySession` with
the same ordering rule (events before release). Methods that read raw rows without DP
(``centralized``) have no ledger: the list of the run's methods every ledger records at creation
(a chained entry) names them, and the total on every market is then infinite.

What the run releases (``results.json``): ``ledger`` (the deployed ledger's head, as before) and
``accounting``: the deployed method, each method's ledger path, head and privacy summary, and per
market the deployed method's epsilon next to the total over every method of the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .events import SubsampledGaussianEvent
from .ledger import LEDGER_FILENAME, Ledger
from .totals import NON_PRIVATE_METHODS, compose_totals, total_to_dict

__all__ = ["BASELINES_DIR", "LedgerSlot", "RunLedgers", "deployed_method", "method_ledger_path"]

BASELINES_DIR = "baselines"


def deployed_method(methods: Sequence[str]) -> str | None:
    """The method whose model the run deploys: ``fedmm`` when it runs, else the first DP method."""
    dp = [m for m in methods if m not in NON_PRIVATE_METHODS]
    return "fedmm" if "fedmm" in dp else (dp[0] if dp else None)


def method_ledger_path(method: str, deployed: str | None) -> str:
    """A method's ledger file, relative to the run directory."""
    return LEDGER_FILENAME if method == deployed else f"{BASELINES_DIR}/{method}/{LEDGER_FILENAME}"


@dataclass(frozen=True)
class LedgerSlot:
    """What a method's privacy session needs from its ledger."""

    ledger: Ledger | None
    resume_offset: int = 0
    prior_events: Mapping[str, Sequence[SubsampledGaussianEvent]] | None = None


class RunLedgers:
    """The ledgers of one run directory, opened per method as the run reaches it."""

    def __init__(self, out_dir: Path, run_config: Mapping[str, Any], methods: Sequence[str], *,
                 resume: bool, deployed: str | None = None) -> None:
        self.out_dir, self.run_config, self.resume = Path(out_dir), dict(run_config), resume
        self.methods = list(methods)
        self.deployed = deployed if deployed in self.dp_methods else deployed_method(self.methods)
        if not resume:
            # Refuse before any work: a directory that already holds any of the run's ledgers.
            for m in self.dp_methods:
                if (self.out_dir / method_ledger_path(m, self.deployed)).exists():
                    raise ConfigError("--out", f"{self.out_dir} already holds a privacy ledger",
                                      allowed="a new directory, or --resume DIR to continue that run")
        elif not (self.out_dir / LEDGER_FILENAME).exists():
            raise ConfigError("--resume", f"{self.out_dir} has no privacy ledger to resume")
        self._open: dict[str, Ledger] = {}
        self._heads: dict[str, dict] = {}
        self._summaries: dict[str, dict] = {}
        self._events: dict[str, dict[str, list[SubsampledGaussianEvent]]] = {}
        if self.deployed is not None:
            self.begin(self.deployed)   # created (or verified and reopened) before any training

    @property
    def dp_methods(self) -> list[str]:
        return [m for m in self.methods if m not in NON_PRIVATE_METHODS]

    def begin(self, method: str) -> LedgerSlot:
        """Open (create, or on resume reopen) ``method``'s ledger; a non-private method has none."""
        if method in NON_PRIVATE_METHODS:
            return LedgerSlot(None)
        if method not in self._open:
            path = self.out_dir / method_ledger_path(method, self.deployed)
            if self.resume and path.exists():
                self._open[method] = Ledger.open(path, run_config=self.run_config)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._open[method] = Ledger.open(path, run_config=self.run_config, create=True, method=method,
                                                 run_methods=self.methods)
        led = self._open[method]
        if not self.resume:
            return LedgerSlot(led)
        return LedgerSlot(led, resume_offset=led.resume_state().next_round, prior_events=led.spent_events())

    def end(self, method: str, summary: Mapping[str, dict] | None) -> None:
        """``method`` has finished: release its ledger's head, keep its events for the total."""
        led = self._open.pop(method, None)
        if led is None:
            return
        try:
            self._events[method] = led.spent_events()
            self._heads[method] = led.finish().to_dict()
        finally:
            led.close()
        if summary is not None:
            self._summaries[method] = dict(summary)

    def close(self) -> None:
        """Close every ledger still open (a run that failed part way: its rows are durable)."""
        for led in self._open.values():
            led.close()
        self._open.clear()

    def finish(self, results: dict, *, markets: Sequence[str], accountant: str, delta: float) -> None:
        """Write the heads and the per-market totals into ``results`` (``ledger``, ``accounting``)."""
        for m in list(self._open):
            self.end(m, None)
        non_private = [m for m in self.methods if m in NON_PRIVATE_METHODS]
        totals = compose_totals({m: self._events.get(m, {}) for m in self.dp_methods}, accountant=accountant,
                                delta=delta, non_private=non_private, markets=markets)
        deployed_eps = {m: v.get("epsilon") for m, v in self._summaries.get(self.deployed, {}).items()}
        if self.deployed in self._heads:
            results["ledger"] = self._heads[self.deployed]
        results["accounting"] = {
            "deployed_method": self.deployed,
            "methods": {
                m: ({"dp": False, "reads_raw_rows": True,
                     "why": "pools every market's raw rows without DP: epsilon = inf on every market"}
                    if m in NON_PRIVATE_METHODS else
                    {"dp": True, "ledger": method_ledger_path(m, self.deployed), "head": self._heads.get(m),
                     "privacy": self._summaries.get(m)})
                for m in self.methods},
            "total": {m: total_to_dict(t, deployed_epsilon=deployed_eps.get(m)) for m, t in totals.items()},
            "total_is_infinite": any(math.isinf(t.epsilon) for t in totals.values()),
        }
