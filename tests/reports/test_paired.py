"""Paired-difference statistics of the evaluation harness, checked against a hand computation."""

import math

import numpy as np
import pytest

from fedmm_secure.reports.paired import paired_difference, parse_seeds


def test_t_interval_matches_hand_computation():
    a = [0.70, 0.72, 0.69, 0.71, 0.73]
    b = [0.68, 0.70, 0.70, 0.69, 0.70]
    d = np.array(a) - np.array(b)          # 0.02, 0.02, -0.01, 0.02, 0.03
    mean, sd = d.mean(), d.std(ddof=1)
    t975_df4 = 2.7764451051977987         # Student t quantile, 4 degrees of freedom
    half = t975_df4 * sd / math.sqrt(5)
    r = paired_difference(a, b)
    assert r.n == 5 and r.wins == 4
    assert r.mean == pytest.approx(mean)
    assert r.sd == pytest.approx(sd)
    assert r.ci_low == pytest.approx(mean - half)
    assert r.ci_high == pytest.approx(mean + half)
    assert r.excludes_zero == bool(mean - half > 0)


def test_pairing_removes_shared_seed_effect():
    # Large seed-to-seed variation shared by both methods, constant gain: the interval is tight.
    base = np.array([0.60, 0.75, 0.55, 0.80, 0.65])
    r = paired_difference(base + 0.01, base)
    assert r.mean == pytest.approx(0.01)
    assert r.ci_high - r.ci_low == pytest.approx(0.0, abs=1e-12)


def test_nan_pairs_are_dropped_and_small_samples_have_no_interval():
    r = paired_difference([0.7, float("nan"), 0.8], [0.6, 0.5, float("nan")])
    assert r.n == 1 and r.mean == pytest.approx(0.1) and math.isnan(r.ci_low)
    with pytest.raises(ValueError):
        paired_difference([0.1], [0.1, 0.2])


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("5,7,9") == [5, 7, 9]
    assert parse_seeds("0-1,10-11") == [0, 1, 10, 11]
    for bad in ("", "3-1", "a", "-2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
