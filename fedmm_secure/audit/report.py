"""Audit results as data: JSON-ready dicts and a Markdown summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import MembershipMetrics, RocCurve
from .one_run import OneRunBound

__all__ = ["AttackResult", "AuditReport"]

CONSISTENT = "empirical lower bound <= accountant epsilon: consistent"


@dataclass(frozen=True)
class AttackResult:
    """One attack on one market."""

    market: str
    attack: str  # loss | lira-online | lira-offline | canary
    metrics: MembershipMetrics
    bound: OneRunBound
    accountant_epsilon: float | None
    roc: RocCurve = field(repr=False, compare=False)
    n_models_trained: int = 1
    # The bound if every guess were right (:func:`~.one_run.one_run_ceiling`); None if unknown.
    ceiling: float | None = None

    @property
    def conclusive(self) -> bool:
        """Could this audit have flagged the accountant's epsilon at all?"""
        return (self.ceiling is None or self.accountant_epsilon is None
                or self.ceiling > self.accountant_epsilon)

    @property
    def violation(self) -> bool:
        return (self.accountant_epsilon is not None
                and self.bound.epsilon_lower_bound > self.accountant_epsilon)

    @property
    def verdict(self) -> str:
        if self.accountant_epsilon is None:
            return "no accountant epsilon (non-private training): leakage measured only"
        if self.violation:
            return (f"VIOLATION: empirical lower bound {self.bound.epsilon_lower_bound:.3f} > "
                    f"accountant epsilon {self.accountant_epsilon:.3f}")
        return CONSISTENT

    def to_dict(self) -> dict:
        # ROC downsampled to at most 200 points: enough to redraw, small enough to commit.
        n = self.roc.fpr.size
        pick = np.unique(np.linspace(0, n - 1, min(n, 200)).round().astype(int))
        return {
            "market": self.market,
            "attack": self.attack,
            **self.metrics.to_dict(),
            "epsilon_lower_bound": self.bound.to_dict(),
            "ceiling": self.ceiling,
            "conclusive": self.conclusive,
            "accountant_epsilon": self.accountant_epsilon,
            "violation": self.violation,
            "verdict": self.verdict,
            "n_models_trained": self.n_models_trained,
            "roc": {"fpr": self.roc.fpr[pick].tolist(), "tpr": self.roc.tpr[pick].tolist()},
        }


@dataclass(frozen=True)
class AuditReport:
    attack: str
    seed: int
    quick: bool
    delta: float
    confidence: float
    results: tuple[AttackResult, ...]
    roc_plot: str | None

    @property
    def violations(self) -> tuple[AttackResult, ...]:
        return tuple(r for r in self.results if r.violation)

    def to_dict(self) -> dict:
        return {
            "kind": "fedmm_secure.audit_report",
            "version": 1,
            "attack": self.attack,
            "seed": self.seed,
            "quick": self.quick,
            "delta": self.delta,
            "confidence": self.confidence,
            "roc_plot": self.roc_plot,
            "any_violation": bool(self.violations),
            "results": [r.to_dict() for r in self.results],
        }

    def ceiling_lines(self) -> list[str]:
        """One line per result: its achievable ceiling, and "not for conclusions" when the
        ceiling does not exceed the accountant's epsilon (the audit could not flag it)."""
        out = []
        for r in self.results:
            if r.ceiling is None:
                continue
            line = f"{r.market} {r.attack}: achievable ceiling {r.ceiling:.3f} (bound if every guess were right)"
            if not r.conclusive:
                line += (f" <= accountant epsilon {r.accountant_epsilon:.3f}: not for conclusions "
                         "(this audit cannot flag that epsilon; use more canaries)")
            out.append(line)
        return out

    def to_markdown(self) -> str:
        conf = f"{100 * self.confidence:g}%"
        lines = [
            f"# Membership-inference audit: {self.attack}",
            "",
            f"seed {self.seed}, {'quick' if self.quick else 'full'} mode, delta = {self.delta:g}; "
            f"epsilon lower bounds hold with {conf} confidence (one-run audit, Steinke et al. 2023, "
            "Bonferroni over the k grid).",
            "",
            "| market | attack | AUC | TPR@0.1%FPR | TPR@1%FPR | empirical eps >= "
            f"({conf}) | guesses (correct/total) | accountant eps | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            acc = "-" if r.accountant_epsilon is None else f"{r.accountant_epsilon:.3f}"
            b = r.bound
            lines.append(
                f"| {r.market} | {r.attack} | {r.metrics.auc:.3f} | {r.metrics.tpr_at_0_1pct_fpr:.4f} | "
                f"{r.metrics.tpr_at_1pct_fpr:.4f} | {b.epsilon_lower_bound:.3f} | {b.correct}/{b.guesses} "
                f"(k+={b.k_plus}, k-={b.k_minus}) | {acc} | {r.verdict} |")
        lines.append("")
        lines += self.ceiling_lines()
        lines.append("")
        small = [r for r in self.results if r.metrics.n_nonmembers < 1000]
        if small:
            lines.append("Note: with fewer than 1000 non-members, TPR@0.1%FPR is the TPR at zero "
                         "false positives.")
            lines.append("")
        if self.roc_plot:
            lines.append(f"ROC (log-log): `{self.roc_plot}`")
            lines.append("")
        lines.append("**" + ("VIOLATION found: an accountant under-reports epsilon or the DP "
                             "implementation is broken." if self.violations else
                             "No violation: every empirical lower bound is at or below its "
                             "accountant epsilon (where one is given).") + "**")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write ``audit_<attack>.json`` and ``audit_<attack>.md`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        jp = out / f"audit_{self.attack}.json"
        mp = out / f"audit_{self.attack}.md"
        jp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default))
        mp.write_text(self.to_markdown())
        return jp, mp


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        v = x.item()
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
