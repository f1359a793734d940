"""Logit-scaled confidence: the binary and multiclass forms agree with the definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.audit import (loss_from_phi, phi_from_binary_logits, phi_from_binary_probs,
                                phi_from_multiclass_logits)
from fedmm_secure.errors import DataError


@settings(max_examples=50, deadline=None)
@given(z=st.floats(-15, 15), y=st.integers(0, 1))
def test_binary_logit_phi_is_log_odds_of_true_label(z, y):
    p = 1 / (1 + np.exp(-z))
    p_true = p if y == 1 else 1 - p
    expect = np.log(p_true) - np.log(1 - p_true)
    assert phi_from_binary_logits([z], [y])[0] == pytest.approx(expect, abs=1e-6)
    assert phi_from_binary_probs([p], [y])[0] == pytest.approx(expect, abs=1e-5)
    # loss(phi) is the cross-entropy of the true label
    assert loss_from_phi([phi_from_binary_logits([z], [y])[0]])[0] == pytest.approx(-np.log(p_true), abs=1e-6)


def test_binary_logits_stay_exact_where_probabilities_saturate():
    assert phi_from_binary_logits([60.0], [1])[0] == 60.0
    assert phi_from_binary_logits([60.0], [0])[0] == -60.0


def test_multiclass_matches_two_class_and_definition():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 5))
    y = rng.integers(0, 5, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(phi_from_multiclass_logits(z, y), np.log(py) - np.log1p(-py), atol=1e-9)
    two = np.stack([np.zeros(50), z[:, 0]], axis=1)
    yb = (y % 2)
    np.testing.assert_allclose(phi_from_multiclass_logits(two, yb), phi_from_binary_logits(z[:, 0], yb),
                               atol=1e-12)


def test_bad_labels_raise():
    with pytest.raises(DataError):
        phi_from_binary_logits([0.0, 1.0], [1, 2])
    with pytest.raises(DataError):
        phi_from_binary_logits([0.0, 1.0], [1])
    with pytest.raises(DataError):
        phi_from_multiclass_logits(np.zeros((2, 3)), [0, 3])
