"""ROC metrics: agreement with scikit-learn, tie handling, and chance-level behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fedmm_secure.audit import (loss_threshold_attack, membership_metrics, one_run_audit, roc_curve,
                                score_threshold_attack, tpr_at_fpr)
from fedmm_secure.errors import DataError


@settings(max_examples=50, deadline=None)
@given(pos=st.lists(st.integers(-5, 5), min_size=1, max_size=60),
       neg=st.lists(st.integers(-5, 5), min_size=1, max_size=60))
def test_roc_and_auc_match_sklearn_with_ties(pos, neg):
    metrics, curve = membership_metrics(pos, neg)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg].astype(float)
    assert metrics.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    # sklearn starts at its own (0, 0) point; both list the same operating points.
    pts_ours = set(zip(curve.fpr.round(12), curve.tpr.round(12)))
    pts_sk = set(zip(fpr.round(12), tpr.round(12)))
    assert pts_ours == pts_sk


def test_tpr_at_fpr_reads_the_strictest_allowed_threshold():
    members = np.array([10.0, 9.0, 1.0, 0.5])
    nonmembers = np.array([8.0] + [0.0] * 99)
    curve = roc_curve(members, nonmembers)
    assert tpr_at_fpr(curve, 0.0) == 0.5  # two members above every non-member
    assert tpr_at_fpr(curve, 0.009) == 0.5
    assert tpr_at_fpr(curve, 0.01) == 1.0  # one false positive (8.0) buys the other two


def test_ties_never_give_an_optimistic_point():
    curve = roc_curve([1.0, 1.0], [1.0, 1.0])
    np.testing.assert_array_equal(curve.fpr, [0, 1])
    np.testing.assert_array_equal(curve.tpr, [0, 1])


def test_loss_attack_is_the_score_attack_on_negated_losses():
    rng = np.random.default_rng(0)
    lm, ln = rng.exponential(0.5, 300), rng.exponential(1.0, 300)
    a, _ = loss_threshold_attack(lm, ln)
    b, _ = score_threshold_attack(-lm, -ln)
    assert a == b and a.auc > 0.55


def test_random_scores_are_at_chance():
    """(c) Scores independent of membership: AUC ~ 0.5, TPR ~ FPR, and no epsilon is claimed."""
    rng = np.random.default_rng(12345)
    n = 20000
    included = rng.random(n) < 0.5
    scores = rng.standard_normal(n)
    metrics, curve = membership_metrics(scores[included], scores[~included])
    assert abs(metrics.auc - 0.5) < 0.015
    for fpr in (0.01, 0.05, 0.2, 0.5):
        assert abs(tpr_at_fpr(curve, fpr) - fpr) < 0.25 * fpr + 0.005
    reps_in = rng.random((100, 1000)) < 0.5
    bounds = [b.epsilon_lower_bound for b in one_run_audit(rng.standard_normal((100, 1000)), reps_in,
                                                           delta=1e-5)]
    assert np.mean(np.array(bounds) == 0.0) >= 0.95


def test_rejects_empty_and_non_finite():
    with pytest.raises(DataError):
        membership_metrics([], [1.0])
    with pytest.raises(DataError):
        membership_metrics([np.inf], [1.0])
