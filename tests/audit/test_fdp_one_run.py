"""f-DP one-run audit: validity on mechanisms with a known tradeoff curve, power, and the
ceiling that the (eps, delta) one-run bound cannot reach at epsilon 8."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fedmm_secure.audit.fdp_one_run import (PROFILE_DELTAS, PrivacyProfile, fdp_family_bound, fdp_k_grid,
                                            fdp_rejects, noise_family, subsampled_gaussian_profile)
from fedmm_secure.audit.gaussian_dp import gaussian_epsilon
from fedmm_secure.audit.one_run import one_run_ceiling
from fedmm_secure.errors import ConfigError, DataError

DELTA = 1e-5


def gaussian_profile(mu: float) -> PrivacyProfile:
    """The exact (eps, delta) profile of the Gaussian mechanism with sensitivity / std = mu."""
    eps = [gaussian_epsilon(mu=mu, delta=d) for d in PROFILE_DELTAS]
    return PrivacyProfile(tuple(eps), PROFILE_DELTAS, gaussian_epsilon(mu=mu, delta=DELTA))


def gaussian_scores(mu: float, m: int, repeats: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The optimal attack on a Gaussian mechanism: the observation itself is the LLR's monotone."""
    included = rng.random((repeats, m)) < 0.5
    return included * mu + rng.standard_normal((repeats, m)), included


def test_tradeoff_of_a_profile_is_a_valid_lower_envelope_of_the_gaussian_curve():
    mu = 2.0
    a = np.linspace(1e-6, 1 - 1e-6, 2001)
    exact = norm.cdf(norm.ppf(1 - a) - mu)
    f = gaussian_profile(mu).tradeoff(a)
    assert np.all(f <= exact + 1e-9)          # implied by the mechanism: never above its curve
    assert np.mean(exact - f) < 0.03          # and close to it (finitely many pairs)


def test_true_claim_is_rejected_at_most_alpha_of_the_time():
    # Validity: 400 independent audits of a mu = 3 Gaussian mechanism against its own curve.
    rng = np.random.default_rng(1)
    mu, alpha = 3.0, 0.05
    scores, inc = gaussian_scores(mu, 2000, 400, rng)
    bounds = fdp_family_bound(scores, inc, [gaussian_profile(mu)], claimed=0, alpha=alpha)
    rate = np.mean([b.claim_rejected for b in bounds])
    assert rate <= alpha  # observed rate is far below alpha (the test is conservative)


def test_family_bound_never_exceeds_the_true_epsilon_and_detects_a_weaker_mechanism():
    rng = np.random.default_rng(2)
    mus = [round(x, 2) for x in np.arange(4.0, 0.45, -0.1)]   # weakest claim (largest eps) first
    family = [gaussian_profile(mu) for mu in mus]
    true_idx = mus.index(1.0)
    scores, inc = gaussian_scores(1.0, 5000, 40, rng)
    bounds = fdp_family_bound(scores, inc, family, claimed=true_idx)
    truth = family[true_idx].label_epsilon
    assert all(b.epsilon_lower_bound <= truth for b in bounds)
    # A mechanism leaking more (mu = 3) than the claimed mu = 1 is caught every time.
    scores, inc = gaussian_scores(3.0, 5000, 40, rng)
    bounds = fdp_family_bound(scores, inc, family, claimed=true_idx)
    assert all(b.claim_rejected for b in bounds)
    assert np.mean([b.epsilon_lower_bound > truth for b in bounds]) >= 0.95


def test_ceiling_at_epsilon_8_is_out_of_reach_of_the_eps_delta_bound_but_not_of_fdp():
    # Default "rich" market of the synthetic run: q, sigma, steps from its ledger; eps ~ 7.8.
    q, sigma, steps, m = 0.004571428571428572, 0.5208333333333333, 1752, 10_000
    sigmas, claimed = noise_family(sigma, steps_per_octave=4, octaves=(0.5, 0.25), fine=1)
    family = [subsampled_gaussian_profile(sample_rate=q, noise_multiplier=s, steps=steps, delta=DELTA)
              for s in sigmas]
    acc = family[claimed].label_epsilon
    assert 7.5 < acc < 8.0
    # The old bound: every guess right, still below 8 (and 2 m delta = 0.2 is paid on top).
    assert one_run_ceiling(m, delta=DELTA) < acc
    # The f-DP test of the same canaries: every guess right rejects claims above epsilon 8.
    inc = np.zeros((1, m), bool)
    inc[0, : m // 2] = True
    perfect = inc.astype(float)
    ceiling = fdp_family_bound(perfect, inc, family, claimed=claimed)[0].ceiling
    assert ceiling > 8.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.data())
def test_rejection_needs_more_correct_guesses_than_chance(k, data):
    m = 1000
    v = data.draw(st.integers(0, k))
    prof = gaussian_profile(1.0)
    eps, dl = np.array([prof.epsilons]), np.array([prof.deltas])
    rej = fdp_rejects(eps, dl, m=m, k=np.array([k]), v=np.array([v]), alpha=0.05)[0]
    if v <= k / 2:   # no better than a coin: never evidence against any claim
        assert not rej


def test_bad_inputs():
    with pytest.raises(ConfigError):
        PrivacyProfile((1.0,), (1e-5, 1e-6), 1.0)
    with pytest.raises(ConfigError):
        PrivacyProfile((-1.0,), (1e-5,), 1.0)
    fam = [gaussian_profile(1.0), gaussian_profile(2.0)]   # wrong order (stronger first)
    with pytest.raises(ConfigError):
        fdp_family_bound(np.zeros((1, 10)), np.ones((1, 10), bool), fam, claimed=0)
    with pytest.raises(DataError):
        fdp_family_bound(np.full((1, 10), np.nan), np.ones((1, 10), bool), fam[::-1], claimed=0)
    with pytest.raises(ConfigError):
        fdp_k_grid(1)
    with pytest.raises(ConfigError):
        subsampled_gaussian_profile(sample_rate=0.0, noise_multiplier=1.0, steps=1, delta=DELTA)
