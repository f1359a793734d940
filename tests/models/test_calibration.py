"""Platt scaling: keeps every ranking, never worse than the identity where it was fitted,
recovers a known miscalibration, refuses bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from fedmm_secure.errors import DataError
from fedmm_secure.models.calibration import PlattScaling, binary_logloss, fit_platt


def _draw(rng, n=4000, scale=0.4, shift=-1.0):
    """Labels from sigmoid(scale * z + shift): the raw logits z are over-confident and biased."""
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(scale * z + shift)))).astype(float)
    return z, y


def test_recovers_a_known_miscalibration():
    z, y = _draw(np.random.default_rng(0), n=20000)
    p = fit_platt(z, y)
    assert p.scale == pytest.approx(0.4, abs=0.03) and p.shift == pytest.approx(-1.0, abs=0.06)
    assert binary_logloss(y, p.logits(z)) < binary_logloss(y, z) - 0.1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.05, 5.0), shift=st.floats(-3.0, 3.0),
       n=st.integers(20, 400))
def test_monotone_and_never_worse_than_identity_on_its_own_rows(seed, scale, shift, n):
    rng = np.random.default_rng(seed)
    z, y = _draw(rng, n=n, scale=scale, shift=shift)
    p = fit_platt(z, y)
    assert p.scale > 0
    assert binary_logloss(y, p.logits(z)) <= binary_logloss(y, z) + 1e-9
    if 0 < y.sum() < n:
        assert roc_auc_score(y, p.probabilities(z)) == pytest.approx(roc_auc_score(y, z), abs=1e-12)


def test_logloss_matches_sklearn_and_survives_saturated_logits():
    rng = np.random.default_rng(1)
    z, y = _draw(rng, n=500)
    assert binary_logloss(y, z) == pytest.approx(log_loss(y, 1 / (1 + np.exp(-z))), rel=1e-9)
    assert np.isfinite(binary_logloss(np.array([1.0, 0.0]), np.array([-800.0, 800.0])))


def test_one_class_or_reversed_ranking_gives_the_identity():
    z = np.linspace(-2, 2, 50)
    assert fit_platt(z, np.ones(50)) == PlattScaling()
    y = (z < 0).astype(float)   # the model ranks backwards: calibration must not flip it
    assert fit_platt(z, y) == PlattScaling()


@pytest.mark.parametrize("z, y", [(np.zeros(3), np.zeros(2)), (np.array([np.nan, 0.0]), np.array([0.0, 1.0])),
                                  (np.zeros(2), np.array([0.0, 2.0])), (np.zeros(0), np.zeros(0))])
def test_bad_input_is_refused(z, y):
    with pytest.raises(DataError):
        fit_platt(z, y)


def test_scale_must_be_positive():
    with pytest.raises(DataError):
        PlattScaling(scale=0.0)
    with pytest.raises(DataError):
        PlattScaling(scale=1.0, shift=float("inf"))
