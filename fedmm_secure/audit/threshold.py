"""Baseline threshold attack (Yeom et al. 2018): a record is a member if its loss is low."""

from __future__ import annotations

import numpy as np

from .metrics import MembershipMetrics, RocCurve, membership_metrics

__all__ = ["loss_threshold_attack", "score_threshold_attack"]


def score_threshold_attack(member_scores, nonmember_scores) -> tuple[MembershipMetrics, RocCurve]:
    """Higher score = more likely a member (e.g. phi, the true-label confidence)."""
    return membership_metrics(member_scores, nonmember_scores)


def loss_threshold_attack(member_losses, nonmember_losses) -> tuple[MembershipMetrics, RocCurve]:
    """Lower loss = more likely a member."""
    return membership_metrics(-np.asarray(member_losses, dtype=float),
                              -np.asarray(nonmember_losses, dtype=float))
