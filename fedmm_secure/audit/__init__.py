"""Membership-inference audits and empirical epsilon lower bounds.

Model-agnostic: attacks consume per-record scores, and training is a callback supplied by a
:class:`MarketAuditTarget`. Never imports ``fedmm_secure.federation``. See ``docs/audit.md``.
"""

from .gaussian_dp import gaussian_delta, gaussian_epsilon
from .lira import (LiraFit, balanced_membership, fit_lira, lira_offline_scores, lira_online_scores,
                   train_shadows)
from .metrics import MembershipMetrics, RocCurve, auc, membership_metrics, roc_curve, tpr_at_fpr
from .one_run import (OneRunBound, count_correct_guesses, default_k_grid, epsilon_lower_bound,
                      one_run_audit, one_run_p_value)
from .plot import save_roc_plot
from .report import AttackResult, AuditReport
from .runner import ATTACKS, run_audit
from .scores import (loss_from_phi, phi_from_binary_logits, phi_from_binary_probs,
                     phi_from_multiclass_logits)
from .target import MarketAuditTarget, ScoreFn, TrainFn
from .threshold import loss_threshold_attack, score_threshold_attack

__all__ = [
    "ATTACKS",
    "AttackResult",
    "AuditReport",
    "LiraFit",
    "MarketAuditTarget",
    "MembershipMetrics",
    "OneRunBound",
    "RocCurve",
    "ScoreFn",
    "TrainFn",
    "auc",
    "balanced_membership",
    "count_correct_guesses",
    "default_k_grid",
    "epsilon_lower_bound",
    "fit_lira",
    "gaussian_delta",
    "gaussian_epsilon",
    "lira_offline_scores",
    "lira_online_scores",
    "loss_from_phi",
    "loss_threshold_attack",
    "membership_metrics",
    "one_run_audit",
    "one_run_p_value",
    "phi_from_binary_logits",
    "phi_from_binary_probs",
    "phi_from_multiclass_logits",
    "roc_curve",
    "run_audit",
    "save_roc_plot",
    "score_threshold_attack",
    "tpr_at_fpr",
    "train_shadows",
]
