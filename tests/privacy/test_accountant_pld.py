"""The PLD accountant against independent references and exact values.

References: dp-accounting's PLDAccountant (pessimistic, value_discretization_interval 1e-4), the
PRV *lower* bound of Opacus' PRV analysis, and the closed form of the composed Gaussian
(q = 1). Step counts are moderate; the full-size comparison lives in bench/.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import ndtr

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy import pld
from fedmm_secure.privacy.accountant import (
    PLDAccountant,
    make_accountant,
    register_accountant,
)
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev

# (q, sigma, steps, delta): q small/large, sigma below/above 1, full batch, small delta.
SETTINGS = [
    (0.01, 0.8, 300, 1e-5),
    (0.001, 1.0, 2000, 1e-6),
    (0.1, 2.0, 200, 1e-5),
    (0.05, 1.2, 400, 1e-5),
    (1.0, 5.0, 100, 1e-5),
]


def dp_accounting_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def prv_lower_bound(q: float, sigma: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    eps_error, delta_error = 0.01, delta / 1000
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta_error)
    lower, _, _ = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(lower)


def gaussian_exact_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang)."""
    def d(eps: float) -> float:
        return ndtr(-eps / mu + mu / 2) - math.exp(eps) * ndtr(-eps / mu - mu / 2) - delta
    return brentq(d, 0.0, 200.0, xtol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inside Opacus PRV at q = 1
@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_within_one_percent_of_dp_accounting_and_above_prv_lower(q, sigma, steps, delta):
    acc = PLDAccountant()
    acc.compose(Ev(q, sigma, steps))
    ours = acc.get_epsilon(delta)
    ref = dp_accounting_pld(q, sigma, steps, delta)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)
    assert ours >= prv_lower_bound(q, sigma, steps, delta)


@pytest.mark.parametrize("sigma,steps,delta", [(5.0, 100, 1e-5), (2.0, 30, 1e-6), (20.0, 400, 1e-5), (1.0, 1, 1e-3)])
def test_full_batch_is_an_upper_bound_of_the_exact_gaussian(sigma, steps, delta):
    exact = gaussian_exact_epsilon(math.sqrt(steps) / sigma, delta)
    acc = PLDAccountant()
    acc.compose(Ev(1.0, sigma, steps))
    ours = acc.get_epsilon(delta)
    assert exact <= ours <= exact * 1.01 + 1e-3, (ours, exact)


def test_heterogeneous_events_match_dp_accounting():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(1.0)), 150)
    ref.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.5)), 100)
    acc = PLDAccountant()
    acc.compose(Ev(0.02, 1.0, 150))
    acc.compose(Ev(0.05, 1.5, 100))
    r = ref.get_epsilon(1e-5)
    assert abs(acc.get_epsilon(1e-5) - r) / r < 0.01


def test_incremental_rounds_match_fresh_accountants():
    inc = PLDAccountant()
    for r in range(1, 9):
        inc.compose(Ev(0.02, 1.0, 25))
        fresh = PLDAccountant()
        fresh.compose(Ev(0.02, 1.0, 25 * r))
        a, b = inc.get_epsilon(1e-5), fresh.get_epsilon(1e-5)
        assert a == pytest.approx(b, rel=5e-3)


def test_rdp_is_looser_and_flagged():
    pld_acc, rdp_acc = make_accountant("pld"), make_accountant("rdp")
    for a in (pld_acc, rdp_acc):
        a.compose(Ev(0.01, 0.8, 300))
    assert rdp_acc.get_epsilon(1e-5) > pld_acc.get_epsilon(1e-5)
    assert rdp_acc.report(1e-5).certified is False
    assert rdp_acc.report(1e-5).bound == "loose upper bound"
    assert pld_acc.report(1e-5).certified is True


def test_gdp_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="under-reports"):
        make_accountant("gdp")
    with pytest.raises(ConfigError, match="under-reports"):
        register_accountant("gdp", PLDAccountant)
    with pytest.raises(ConfigError, match="unknown accountant"):
        make_accountant("moments")


def test_register_accountant_makes_it_available():
    class Dummy(PLDAccountant):
        name = "_test_dummy"

    register_accountant("_test_dummy", Dummy)
    try:
        assert isinstance(make_accountant("_test_dummy"), Dummy)
    finally:
        from fedmm_secure.privacy import accountant as mod
        mod._REGISTRY.pop("_test_dummy", None)


def test_options_validated():
    with pytest.raises(ConfigError):
        PLDAccountant(relative_error=0.0)
    with pytest.raises(ConfigError):
        PLDAccountant(absolute_error=2.0)
    with pytest.raises(ConfigError):
        PLDAccountant(max_window=10)


# -- pure math --------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(q=st.floats(1e-3, 1.0), sigma=st.floats(0.5, 10.0), direction=st.sampled_from(["remove", "add"]),
       mesh=st.sampled_from([1e-3, 3e-4]))
def test_discretization_is_a_distribution_with_bounded_bias(q, sigma, direction, mesh):
    d = pld.discretize_subsampled_gaussian(sample_rate=q, noise_multiplier=sigma, mesh=mesh, direction=direction)
    assert (d.pmf >= 0).all()
    assert d.pmf.sum() + d.inf_mass == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= d.bias_lb <= mesh
    assert d.inf_mass <= 1e-12


@settings(max_examples=20, deadline=None)
@given(q=st.floats(0.005, 1.0), sigma=st.floats(0.6, 5.0))
def test_rounded_up_mean_dominates_kl(q, sigma):
    """Mean of the rounded loss minus the certified bias bound is still >= E[L] - mesh."""
    mesh = 2e-4
    d = pld.discretize_subsampled_gaussian(sample_rate=q, noise_multiplier=sigma, mesh=mesh, direction="remove")
    v = (d.k_min + np.arange(d.pmf.size)) * mesh
    mean_rounded = float((d.pmf * v).sum())
    # Monte-Carlo-free check against numerical integration of E_P[L].
    from scipy import integrate
    def integrand(x):
        mix = (1 - q) * np.exp(-x * x / (2 * sigma ** 2)) + q * np.exp(-(x - 1) ** 2 / (2 * sigma ** 2))
        loss = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, np.log(q) + (2 * x - 1) / (2 * sigma ** 2))
        return mix / (sigma * math.sqrt(2 * math.pi)) * loss
    kl, _ = integrate.quad(integrand, -12 * sigma, 1 + 12 * sigma, limit=400)
    assert mean_rounded - d.bias_lb >= kl - 1e-9
    assert mean_rounded - d.bias_lb <= kl + mesh


@settings(max_examples=150, deadline=None)
@given(p=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=30), start=st.integers(-10, 5),
       inf_mass=st.floats(0.0, 0.05), delta=st.floats(1e-4, 0.2))
def test_epsilon_from_pmf_matches_brute_force(p, start, inf_mass, delta):
    p = np.asarray(p)
    if p.sum() == 0:
        return
    p = p / p.sum() * (1 - inf_mass)
    mesh = 0.25
    v = (start + np.arange(p.size)) * mesh
    got = pld.epsilon_from_pmf(p, values_start=start * mesh, mesh=mesh, inf_mass=inf_mass, delta=delta)

    def dlt(eps):
        return inf_mass + float((p * np.clip(1 - np.exp(eps - v), 0, None)).sum())

    if inf_mass >= delta:
        assert got == math.inf
        return
    assert got >= 0.0
    assert dlt(got) <= delta + 1e-9
    if got > 1e-9:
        assert dlt(got - 1e-6) > delta - 1e-9


def test_hoeffding_slack():
    assert pld.hoeffding_slack(mesh=1e-3, steps=0, delta_err=1e-8) == 0.0
    t = pld.hoeffding_slack(mesh=1e-3, steps=100, delta_err=1e-8)
    assert math.exp(-2 * t * t / (100 * 1e-6)) == pytest.approx(1e-8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=6, deadline=None)
@given(q=st.floats(0.005, 0.5), sigma=st.floats(0.6, 3.0), steps=st.integers(1, 300),
       delta=st.sampled_from([1e-4, 1e-5, 1e-6]))
def test_between_prv_lower_and_upper_bounds(q, sigma, steps, delta):
    from opacus.accountants import PRVAccountant

    acc = PLDAccountant()
    acc.compose(Ev(q, sigma, steps))
    ours = acc.get_epsilon(delta)
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    lower, _, upper = prv._get_dprv(eps_error=0.01, delta_error=delta / 1000).compute_epsilon(
        delta, delta / 1000, 0.01)
    assert lower <= ours <= max(upper * 1.01, upper + 1e-3)
