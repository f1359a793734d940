"""Noise calibration: the smallest noise multiplier whose accounted epsilon meets a target.

Uses the same accountant that will account the run, so the calibrated sigma is never rejected
by the budget check for the planned number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from .accountant import check_delta, make_accountant
from .events import SubsampledGaussianEvent

__all__ = ["calibrate_noise_multiplier"]


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    unit: str = "record",
    tolerance: float = 0.01,
    fixed_events: Sequence[SubsampledGaussianEvent] = (),
) -> float:
    """Smallest sigma (within ``tolerance`` relative) with epsilon(sigma) <= ``target_epsilon``.

    Bisection on sigma: epsilon is decreasing in the noise multiplier. The returned sigma is
    the upper end of the final bracket, so its epsilon is guaranteed <= target.
    ``fixed_events``: other releases of the same run (e.g. noisy validation scores) composed
    with the calibrated event; the target then covers all of them.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) \
            or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError("target_epsilon", f"must be a finite number > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ConfigError("tolerance", f"must be in (0, 1), got {tolerance!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError("steps", f"must be an int >= 1, got {steps!r}")
    SubsampledGaussianEvent(sample_rate, 1.0, steps, unit)  # validates the rest
    fixed = list(fixed_events)
    if any(not isinstance(e, SubsampledGaussianEvent) or e.unit != unit for e in fixed):
        raise ConfigError("fixed_events", f"must be SubsampledGaussianEvents of unit {unit!r}")

    # One accountant for every probe: its grids and spectra are reused across sigmas.
    acc = make_accountant(accountant)

    def eps_of(sigma: float) -> float:
        return acc.predict_epsilon([SubsampledGaussianEvent(sample_rate, sigma, steps, unit), *fixed], delta)

    # Bracket by steps of 1.5x from sigma = 1 (no wild probes: tiny sigmas are costly to
    # account and irrelevant), then bisect.
    hi = 1.0
    if eps_of(hi) > target_epsilon:
        lo = hi
        while eps_of(hi) > target_epsilon:
            lo, hi = hi, hi * 1.5
            if hi > 1e4:
                raise ConfigError("target_epsilon", f"{target_epsilon} is unreachable at delta="
                                  f"{delta} with sample_rate={sample_rate}, steps={steps}")
    else:
        lo = hi / 1.5
        while eps_of(lo) <= target_epsilon:
            hi, lo = lo, lo / 1.5
            if lo < 1e-3:
                return hi
    while (hi - lo) > tolerance * hi:
        mid = 0.5 * (lo + hi)
        if eps_of(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
