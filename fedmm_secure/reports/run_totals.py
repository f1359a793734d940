"""Every ledger of a run directory by method, and each market's total spend recomputed from them.

The deployed method's ledger(s) (``ledger.sqlite``, or ``ledgers/<market>/`` on Flower) and each
baseline's (``baselines/<method>/ledger.sqlite``). Which methods the run trained is read from the
deployed ledger's chained ``run_methods`` entry, never from ``results.json``: removing a
baseline's ledger, or a non-private method from the results, does not make its spend disappear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import LedgerError
from ..privacy.composed import ComposedAccountants
from ..privacy.events import SubsampledGaussianEvent
from ..privacy.ledger import LEDGER_FILENAME, Ledger
from ..privacy.run_ledgers import BASELINES_DIR, method_ledger_path
from ..privacy.totals import NON_PRIVATE_METHODS, MarketTotal, compose_totals

__all__ = ["RunLedgerSet", "describe_total", "read_run_ledgers", "run_totals"]


@dataclass(frozen=True)
class RunLedgerSet:
    """Where a run's ledgers are, and what its chained configuration says it trained."""

    deployed: str
    methods: tuple[str, ...]                    # every method of the run (chained config)
    deployed_files: tuple[Path, ...]            # one (embedded) or one per market (Flower)
    baseline_files: dict[str, Path]             # method -> ledger file, for every DP baseline
    unexpected: tuple[Path, ...]                # baseline ledgers of methods the run did not train
    config: dict

    @property
    def non_private(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in NON_PRIVATE_METHODS)


def read_run_ledgers(run_dir: Path, deployed_dirs: list[Path]) -> RunLedgerSet:
    """``deployed_dirs``: the directories holding the deployed method's ledger(s)."""
    files = tuple(d / LEDGER_FILENAME for d in deployed_dirs)
    with Ledger.open(files[0]) as led:
        config, tag, recorded = led.run_config, led.method, led.run_methods
    # A ledger without the run's method list (Flower market ledgers, older runs) is the run's
    # only ledger: its method is the only one accounted.
    deployed = tag if recorded is not None else (tag or "deployed")
    methods = recorded if recorded is not None else (deployed,)
    baselines = {m: run_dir / method_ledger_path(m, deployed)
                 for m in methods if m not in NON_PRIVATE_METHODS and m != deployed}
    known = {p.resolve() for p in baselines.values()}
    unexpected = tuple(p for p in sorted((run_dir / BASELINES_DIR).glob(f"*/{LEDGER_FILENAME}"))
                       if p.resolve() not in known)
    return RunLedgerSet(deployed, methods, files, baselines, unexpected, config)


def _events(files: list[Path]) -> dict[str, list[SubsampledGaussianEvent]]:
    out: dict[str, list[SubsampledGaussianEvent]] = {}
    for f in files:
        if not f.is_file():
            raise LedgerError(f"{f.name} of a method the run trained is missing")
        with Ledger.open(f) as led:
            for m, evs in led.spent_events().items():
                out.setdefault(m, []).extend(evs)
    return out


def run_totals(lset: RunLedgerSet, *, delta: float | None = None, accountant: str | None = None,
               composed: ComposedAccountants | None = None) -> dict[str, MarketTotal]:
    """Each market's total over every method of the run, recomputed from the ledgers' events with
    the run's accountant (and delta, unless one is given); ``composed``: accountants already
    built by the run's verification (:class:`~fedmm_secure.privacy.composed.ComposedAccountants`)."""
    priv = lset.config.get("privacy") if isinstance(lset.config.get("privacy"), Mapping) else {}
    name = accountant or str(priv.get("accountant", "pld"))
    d = float(delta if delta is not None else priv.get("delta", 1e-5))
    events = {lset.deployed: _events(list(lset.deployed_files))}
    for m, f in lset.baseline_files.items():
        events[m] = _events([f])
    markets = sorted({m for per in events.values() for m in per})
    return compose_totals(events, accountant=name, delta=d, non_private=lset.non_private, markets=markets,
                          composed=composed)


def describe_total(t: MarketTotal) -> str:
    """One cell: the epsilon, or why it is infinite."""
    if math.isinf(t.epsilon):
        return f"inf (non-private: {', '.join(t.non_private)})"
    return f"{t.epsilon:.4f}"
