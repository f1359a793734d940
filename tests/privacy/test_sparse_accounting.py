"""The epsilon of sparse DP-SGD: selection and gradient noise on one Poisson sample are one
subsampled Gaussian mechanism at sigma_eff = (sigma1^-2 + sigma2^-2)^-1/2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from fedmm_secure.privacy.accountant import make_accountant
from fedmm_secure.privacy.events import NoiseSplit, SubsampledGaussianEvent
from fedmm_secure.privacy.sparse_selection import effective_noise_multiplier, split_noise_multiplier

from .test_accountant_pld import dp_accounting_pld


@pytest.mark.parametrize("q,sigma,steps,share", [(0.01, 0.8, 300, 0.2), (0.05, 1.2, 200, 0.5), (0.1, 0.6, 100, 0.1)])
def test_split_event_epsilon_matches_dp_accounting_at_sigma_eff(q, sigma, steps, share):
    s1, s2 = split_noise_multiplier(sigma, share)
    event = SubsampledGaussianEvent(q, effective_noise_multiplier(s1, s2), steps, "interaction",
                                    split=NoiseSplit(s1, s2, 3.0, 1.0))
    ours = make_accountant("pld").predict_epsilon([event], 1e-5)
    ref = dp_accounting_pld(q, sigma, steps, 1e-5)
    assert abs(ours - ref) <= 0.01 * ref
    # Accounting only the gradient part (sigma2 > sigma_eff) would under-report the spend.
    assert dp_accounting_pld(q, s2, steps, 1e-5) < 0.97 * ref


def test_two_gaussians_compose_to_one_at_sigma_eff_with_dp_accounting():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    s1, s2 = split_noise_multiplier(0.9, 0.3)

    def eps(events) -> float:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for e in events:
            acc.compose(e)
        return float(acc.get_epsilon(1e-5))
    both = eps([dp_event.GaussianDpEvent(s1), dp_event.GaussianDpEvent(s2)])
    assert abs(both - eps([dp_event.GaussianDpEvent(0.9)])) < 2e-3 * both


def _hockey_stick_2d(q: float, mu: np.ndarray, eps: float, *, remove: bool) -> float:
    """delta(eps) of the 2-D whitened mechanism x = mu * 1[unit sampled] + N(0, I), by
    integration on a grid: P = (1-q) N(0, I) + q N(mu, I) against Q = N(0, I) (and back)."""
    t = np.linspace(-10, 10 + float(mu.max()), 1601)
    h = t[1] - t[0]
    a, b = np.meshgrid(t, t, indexing="ij")
    base = np.exp(-(a ** 2 + b ** 2) / 2) / (2 * math.pi)
    shifted = np.exp(-((a - mu[0]) ** 2 + (b - mu[1]) ** 2) / 2) / (2 * math.pi)
    p = (1 - q) * base + q * shifted
    x, y = (p, base) if remove else (base, p)
    return float(np.clip(x - math.exp(eps) * y, 0, None).sum() * h * h)


def _hockey_stick_1d(q: float, m: float, eps: float, *, remove: bool) -> float:
    """The same for the 1-D subsampled Gaussian with shift m, in closed form (Gaussian CDFs)."""
    from scipy.optimize import brentq

    # The likelihood ratio is monotone in x: the integrand is positive on a half-line [c, inf)
    # for the first direction and (-inf, c] for the second.
    if remove:   # P = (1-q)N(0,1)+qN(m,1) vs e^eps N(0,1); ratio 1-q+q exp(m x - m^2/2) >= e^eps
        c = (math.log((math.exp(eps) - (1 - q)) / q) + m * m / 2) / m
        return float((1 - q) * ndtr(-c) + q * ndtr(m - c) - math.exp(eps) * ndtr(-c))

    def f(x: float) -> float:
        return math.log(1 - q + q * math.exp(m * x - m * m / 2)) + eps
    c = brentq(f, -100, 100) if f(-100) < 0 else -100.0
    return float(ndtr(c) - math.exp(eps) * ((1 - q) * ndtr(c) + q * ndtr(c - m)))


# The add direction's ratio is at most 1/(1-q) (log 0.22 at q = 0.2): its delta is 0 above.
@pytest.mark.parametrize("remove,eps", [(True, 0.5), (True, 1.5), (False, 0.05), (False, 0.15)])
def test_the_joint_mechanism_is_the_one_dimensional_gaussian_at_sigma_eff(remove, eps):
    # One unit moves the counts by at most C1 and the gradient by at most C2; whitened by the
    # noise stds, the worst shift is (1/sigma1, 1/sigma2), of length 1/sigma_eff. The 2-D
    # subsampled mechanism's privacy profile equals the 1-D one at that shift (and is larger
    # than the gradient part's alone).
    q, sigma, share = 0.2, 0.7, 0.3
    s1, s2 = split_noise_multiplier(sigma, share)
    two_d = _hockey_stick_2d(q, np.array([1 / s1, 1 / s2]), eps, remove=remove)
    one_d = _hockey_stick_1d(q, 1 / sigma, eps, remove=remove)
    assert one_d > 1e-3 and abs(two_d - one_d) < 1e-4 * one_d
    assert _hockey_stick_1d(q, 1 / s2, eps, remove=remove) < 0.9 * one_d
