"""Noise calibration: the smallest noise multiplier whose accounted epsilon meets a target.

Uses the same accountant that will account the run, so the calibrated sigma is never rejected
by the budget check for the planned number of steps.

Calibration is a pure function of its arguments and costs tens to hundreds of accountant
evaluations (0.1-1 s each on a loaded machine), while a run asks the same question many times:
every DP method of a run plans the same (sample rate, steps) per market, and an evaluation
harness repeats them for every seed. Answers are therefore memoised per process, keyed by every
argument and the accountant's class, so a cached sigma is the one a fresh bisection returns.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from ..errors import ConfigError
from .accountant import PrivacyAccountant, check_delta, make_accountant
from .events import SubsampledGaussianEvent

__all__ = ["calibrate_noise_multiplier", "clear_calibration_cache"]

# (accountant class, accountant name, target, delta, q, steps, unit, tolerance, fixed events) -> sigma.
_CACHE: dict[tuple, float] = {}
_CACHE_MAX = 4096   # a harness invocation asks a few hundred distinct questions at most
_CACHE_LOCK = threading.Lock()


def clear_calibration_cache() -> None:
    """Forget every memoised calibration (tests; a process never needs it for correctness)."""
    with _CACHE_LOCK:
        _CACHE.clear()


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
    key = (type(acc), accountant, float(target_epsilon), delta, float(sample_rate), steps, unit, float(tolerance),
           tuple(fixed))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    sigma = _bisect(acc, target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                    unit=unit, tolerance=tolerance, fixed=fixed)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))   # oldest first: dicts keep insertion order
        _CACHE[key] = sigma
    return sigma


def _bisect(acc: PrivacyAccountant, *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
            unit: str, tolerance: float, fixed: list[SubsampledGaussianEvent]) -> float:
    """The bisection behind :func:`calibrate_noise_multiplier` (arguments already checked)."""
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
