"""Noise calibration by bisection on the same accountant."""

from __future__ import annotations

import pytest

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.accountant import make_accountant
from fedmm_secure.privacy.calibration import calibrate_noise_multiplier
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev


@pytest.mark.parametrize("name,target,q,steps", [("pld", 2.0, 0.02, 300), ("pld", 0.8, 0.05, 100), ("rdp", 3.0, 0.01, 500)])
def test_calibrated_sigma_meets_target_tightly(name, target, q, steps):
    tol = 0.01
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                                       accountant=name, tolerance=tol)
    eps = make_accountant(name).predict_epsilon([Ev(q, sigma, steps)], 1e-5)
    assert eps <= target
    # A slightly smaller sigma (beyond the tolerance) would exceed the target.
    below = make_accountant(name).predict_epsilon([Ev(q, sigma * (1 - 2 * tol), steps)], 1e-5)
    assert below > target


def test_calibration_rejects_bad_input():
    ok = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100)
    for bad in [dict(target_epsilon=0), dict(target_epsilon=float("nan")), dict(delta=1.0),
                dict(steps=0), dict(sample_rate=0.0), dict(tolerance=0)]:
        with pytest.raises(ConfigError):
            calibrate_noise_multiplier(**{**ok, **bad})
    with pytest.raises(ConfigError, match="refused"):
        calibrate_noise_multiplier(**ok, accountant="gdp")


def test_memoised_calibration_equals_a_fresh_bisection(monkeypatch):
    """A repeated question is answered from the cache, with the sigma a fresh bisection gives."""
    from fedmm_secure.privacy import calibration

    kw = dict(target_epsilon=4.0, delta=1e-5, sample_rate=0.03, steps=200)
    calibration.clear_calibration_cache()
    fresh = calibrate_noise_multiplier(**kw)
    probes = []
    real = calibration._bisect
    monkeypatch.setattr(calibration, "_bisect", lambda *a, **k: probes.append(k) or real(*a, **k))
    assert calibrate_noise_multiplier(**kw) == fresh
    assert probes == []                                   # served from the cache
    calibration.clear_calibration_cache()
    assert calibrate_noise_multiplier(**kw) == fresh      # recomputed: bit-identical
    assert len(probes) == 1
    # Any argument that changes the question misses the cache.
    fixed = [Ev(1.0, 50.0, 2)]
    for other in [dict(target_epsilon=4.5), dict(sample_rate=0.02), dict(steps=201), dict(tolerance=0.02),
                  dict(accountant="rdp"), dict(fixed_events=fixed)]:
        calibrate_noise_multiplier(**{**kw, **other})
    assert len(probes) == 7
    assert calibrate_noise_multiplier(**{**kw, "fixed_events": list(fixed)}) == \
        calibrate_noise_multiplier(**{**kw, "fixed_events": tuple(fixed)})
    assert len(probes) == 7
