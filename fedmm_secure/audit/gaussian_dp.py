"""Exact (eps, delta) of the Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8).

Used as ground truth when checking that an audit never claims more leakage than a mechanism
with known privacy. ``mu`` is sensitivity / noise std.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr

from ..errors import ConfigError

__all__ = ["gaussian_delta", "gaussian_epsilon"]


def gaussian_delta(*, mu: float, epsilon: float) -> float:
    """delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu): tight for the Gaussian."""
    if not (mu > 0 and math.isfinite(mu)):
        raise ConfigError("mu", f"must be finite and > 0, got {mu!r}")
    if not (epsilon >= 0):
        raise ConfigError("epsilon", f"must be >= 0, got {epsilon!r}")
    a = log_ndtr(mu / 2 - epsilon / mu)
    b = epsilon + log_ndtr(-mu / 2 - epsilon / mu)
    # exp(a) - exp(b) computed as exp(a) * (1 - exp(b - a)) to keep precision in the tail.
    return float(math.exp(a) * -math.expm1(min(b - a, 0.0)))


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Smallest eps with delta(eps) <= delta for the Gaussian mechanism."""
    if not (0 < delta < 1):
        raise ConfigError("delta", f"must be in (0, 1), got {delta!r}")
    if gaussian_delta(mu=mu, epsilon=0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu=mu, epsilon=hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(mu=mu, epsilon=e) - delta, 0.0, hi, xtol=1e-12))
