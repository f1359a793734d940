"""LiRA: Gaussian fits, online/offline scoring, and the balanced shadow design."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm_secure.audit import (balanced_membership, fit_lira, lira_offline_scores, lira_online_scores,
                                membership_metrics, train_shadows)
from fedmm_secure.errors import ConfigError, DataError


def synthetic_world(rng, *, n, k, shift=1.0, sd=0.5):
    """Records of very different difficulty (per-record mean phi), membership adds ``shift``."""
    base = rng.normal(0, 3, n)
    keep = balanced_membership(k, n, rng)
    shadow_phi = base + shift * keep + rng.normal(0, sd, (k, n))
    target_in = rng.random(n) < 0.5
    target_phi = base + shift * target_in + rng.normal(0, sd, n)
    return base, keep, shadow_phi, target_in, target_phi


def test_balanced_membership_puts_each_record_in_half_the_models():
    keep = balanced_membership(8, 1000, np.random.default_rng(0))
    np.testing.assert_array_equal(keep.sum(axis=0), 4)
    assert 0.45 < keep[0].mean() < 0.55


def test_fit_recovers_per_record_gaussians():
    rng = np.random.default_rng(1)
    base, keep, shadow_phi, _, _ = synthetic_world(rng, n=400, k=64, shift=1.0, sd=0.5)
    fit = fit_lira(shadow_phi, keep, global_variance=False)
    assert np.abs(fit.mean_out - base).max() < 0.5
    assert np.abs(fit.mean_in - (base + 1.0)).max() < 0.5
    assert np.median(fit.std_in) == pytest.approx(0.5, rel=0.1)
    pooled = fit_lira(shadow_phi, keep, global_variance=True)
    assert np.ptp(pooled.std_out) == 0.0 and pooled.std_out[0] == pytest.approx(0.5, rel=0.05)


def test_lira_beats_global_threshold_at_low_fpr():
    """Per-record calibration is the point of LiRA: with records of varied difficulty, a global
    loss threshold is nearly blind at low FPR while LiRA is not."""
    rng = np.random.default_rng(2)
    _, keep, shadow_phi, target_in, target_phi = synthetic_world(rng, n=4000, k=16, shift=1.5, sd=0.5)
    fit = fit_lira(shadow_phi, keep, global_variance=True)
    loss, _ = membership_metrics(target_phi[target_in], target_phi[~target_in])
    online = lira_online_scores(fit, target_phi)
    offline = lira_offline_scores(fit, target_phi)
    on, _ = membership_metrics(online[target_in], online[~target_in])
    off, _ = membership_metrics(offline[target_in], offline[~target_in])
    assert loss.tpr_at_1pct_fpr < 0.05
    assert on.tpr_at_1pct_fpr > 0.2 and off.tpr_at_1pct_fpr > 0.1
    assert on.auc > off.auc > loss.auc


def test_lira_on_non_member_signal_is_at_chance():
    rng = np.random.default_rng(3)
    _, keep, shadow_phi, target_in, target_phi = synthetic_world(rng, n=4000, k=8, shift=0.0)
    fit = fit_lira(shadow_phi, keep, global_variance=True)
    s = lira_online_scores(fit, target_phi)
    m, _ = membership_metrics(s[target_in], s[~target_in])
    assert abs(m.auc - 0.5) < 0.03


def test_train_shadows_calls_back_with_masks_and_seeds():
    calls = []

    def train_fn(mask, seed):
        calls.append((mask.copy(), seed))
        return lambda idx: mask[idx] * 2.0 - 1.0

    phi, keep = train_shadows(train_fn, pool_size=10, n_shadows=4, rng=np.random.default_rng(0))
    assert len(calls) == 4 and len({s for _, s in calls}) == 4
    np.testing.assert_array_equal(phi, keep * 2.0 - 1.0)


def test_bad_shadow_inputs_raise():
    with pytest.raises(ConfigError):
        train_shadows(lambda m, s: (lambda i: np.zeros(len(i))), pool_size=10, n_shadows=1,
                      rng=np.random.default_rng(0))
    with pytest.raises(DataError):
        train_shadows(lambda m, s: (lambda i: np.zeros(3)), pool_size=10, n_shadows=2,
                      rng=np.random.default_rng(0))
    with pytest.raises(DataError):
        fit_lira(np.zeros((4, 5)), np.zeros((4, 6), bool), global_variance=True)
    out_only = fit_lira(np.random.default_rng(0).normal(size=(4, 5)), np.zeros((4, 5), bool),
                        global_variance=True)
    with pytest.raises(ConfigError):
        lira_online_scores(out_only, np.zeros(5))
    assert np.all(np.isfinite(lira_offline_scores(out_only, np.zeros(5))))
