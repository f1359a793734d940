"""ROC analysis for membership inference: AUC and TPR at a fixed low FPR.

Low-FPR operating points are what matter for privacy (Carlini et al. 2022): an attack that is
confidently right about a few records is a real leak even when its AUC is near 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["RocCurve", "roc_curve", "auc", "tpr_at_fpr", "membership_metrics", "MembershipMetrics"]


@dataclass(frozen=True)
class RocCurve:
    """ROC points from the strictest threshold (0, 0) to the loosest (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray


@dataclass(frozen=True)
class MembershipMetrics:
    auc: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int

    def to_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_0.1%_fpr": self.tpr_at_0_1pct_fpr,
                "tpr_at_1%_fpr": self.tpr_at_1pct_fpr, "n_members": self.n_members,
                "n_nonmembers": self.n_nonmembers}


def _validate(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(member_scores, dtype=float).reshape(-1)
    neg = np.asarray(nonmember_scores, dtype=float).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise DataError("need at least one member and one non-member score")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise DataError("membership scores contain NaN or infinity")
    return pos, neg


def roc_curve(member_scores, nonmember_scores) -> RocCurve:
    """ROC of the rule "member iff score >= t" over all thresholds t (higher = member).

    Tied scores move together, so a tie never yields an optimistic point.
    """
    pos, neg = _validate(member_scores, nonmember_scores)
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    tp = np.cumsum(labels)
    fp = np.cumsum(~labels)
    # Keep only the last index of each run of equal scores.
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tpr = np.r_[0.0, tp[last] / pos.size]
    fpr = np.r_[0.0, fp[last] / neg.size]
    return RocCurve(fpr=fpr, tpr=tpr)


def auc(curve: RocCurve) -> float:
    return float(np.trapezoid(curve.tpr, curve.fpr))


def tpr_at_fpr(curve: RocCurve, max_fpr: float) -> float:
    """Highest TPR over thresholds whose FPR is at most ``max_fpr``.

    With fewer than 1/max_fpr non-members this is the TPR at zero false positives, which is
    what the data can support; the metrics carry the counts so a reader can tell.
    """
    if not (0 <= max_fpr <= 1):
        raise ConfigError("max_fpr", f"must be in [0, 1], got {max_fpr!r}")
    ok = curve.fpr <= max_fpr
    return float(curve.tpr[ok].max())


def membership_metrics(member_scores, nonmember_scores) -> tuple[MembershipMetrics, RocCurve]:
    curve = roc_curve(member_scores, nonmember_scores)
    pos, neg = _validate(member_scores, nonmember_scores)
    return MembershipMetrics(auc=auc(curve), tpr_at_0_1pct_fpr=tpr_at_fpr(curve, 1e-3),
                             tpr_at_1pct_fpr=tpr_at_fpr(curve, 1e-2), n_members=int(pos.size),
                             n_nonmembers=int(neg.size)), curve
