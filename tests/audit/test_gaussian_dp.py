"""Ground-truth epsilon of the Gaussian mechanism used to judge audits."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy.stats import norm

from fedmm_secure.audit import gaussian_delta, gaussian_epsilon
from fedmm_secure.errors import ConfigError


def test_delta_at_zero_epsilon_is_total_variation():
    for mu in (0.3, 1.0, 3.0):
        assert gaussian_delta(mu=mu, epsilon=0.0) == pytest.approx(2 * norm.cdf(mu / 2) - 1, rel=1e-12)


@pytest.mark.parametrize("mu,delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (0.25, 1e-3)])
def test_epsilon_matches_dp_accounting_pld(mu, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(1 / mu))
    pld_eps = acc.get_epsilon(delta)
    exact = gaussian_epsilon(mu=mu, delta=delta)
    # PLD is a pessimistic (upper) bound on the exact value, and close to it.
    assert exact <= pld_eps + 1e-9
    assert exact == pytest.approx(pld_eps, rel=0.01)
    assert gaussian_delta(mu=mu, epsilon=exact) == pytest.approx(delta, rel=1e-6)


def test_bad_parameters_raise():
    with pytest.raises(ConfigError):
        gaussian_epsilon(mu=1.0, delta=0.0)
    with pytest.raises(ConfigError):
        gaussian_delta(mu=-1.0, epsilon=1.0)
    assert gaussian_epsilon(mu=1e-9, delta=0.5) == 0.0
    assert math.isfinite(gaussian_epsilon(mu=8.0, delta=1e-10))
