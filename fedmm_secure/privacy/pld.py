"""Privacy loss distributions of the Poisson-subsampled Gaussian: pure math, no state, no I/O.

Everything here returns *upper bounds* on the hockey-stick divergence, so an epsilon derived from
it is certified (up to floating point), in the style of Gopi et al. 2021 ("Numerical composition
of differential privacy", the PRV accountant) and of dp-accounting's pessimistic PLD:

* **Discretization.** The privacy loss ``L`` of one step is rounded *up* to a grid of mesh ``h``
  (``Y = ceil(L / h) * h``); values above the truncation point become an infinite-loss atom,
  values below the lowest cell are raised to it. Rounding up alone would over-count by about
  ``n * h / 2`` after ``n`` steps; instead we subtract a certified lower bound ``beta`` of the mean
  rounding error ``E[Y - L]`` per step and pay for the remaining fluctuation with Hoeffding's
  inequality (the errors ``Y_i - L_i`` are independent and lie in ``[0, h]``): with probability at
  least ``1 - delta_err`` the true total loss is at most ``T - n*beta + h*sqrt(n*ln(1/delta_err)/2)``.
  The over-count thus grows like ``h * sqrt(n)`` instead of ``h * n``, which is what lets a
  coarse grid (small FFT) stay within a fraction of a percent.
* **Composition.** Losses add, so the composed PMF is a convolution: an FFT power on a circular
  window. Mass that wraps from below the window lands *inside* it (more loss: pessimistic); mass
  above the window's top is bounded by a Chernoff bound computed from the exact moment generating
  function of the discretized loss, and added to delta.
* **Both neighbouring directions** (add and remove one unit) are composed separately; epsilon is
  the maximum of the two, as in dp-accounting's ``ADD_OR_REMOVE_ONE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import fft as sp_fft
from scipy.special import ndtr, ndtri

__all__ = [
    "WINDOW_TAIL",
    "Direction",
    "DiscretePLD",
    "Window",
    "discretize_subsampled_gaussian",
    "hoeffding_slack",
    "upper_tail_bound",
    "lower_tail_bound",
    "choose_window",
    "single_spectrum",
    "epsilon_from_pmf",
]

Direction = Literal["remove", "add"]

# Per-step mass left outside the discretized support (upper side: infinite loss). With 1e4 steps
# it contributes ~1e-11 to delta.
_SINGLE_TAIL = 1e-15
# Chernoff target for the composed window's tails (lower tail affects tightness only); the
# accountant also checks a cached window against it.
WINDOW_TAIL = 1e-14
# Tilts for the Chernoff bounds: wide enough for tiny sample rates (loss ~ q) and for q = 1.
_LAMBDAS = np.geomspace(1e-2, 2e3, 16)


@dataclass(frozen=True)
class DiscretePLD:
    """Pessimistic discretization of one step's privacy loss.

    ``pmf[i]`` is the probability that the rounded-up loss equals ``(k_min + i) * mesh``;
    ``inf_mass`` is the probability of an infinite (truncated) loss; ``bias_lb`` is a certified
    lower bound on ``E[Y - L]`` (the mean over-count introduced by rounding up), and
    ``logmgf_pos[j] = log E[exp(+lambda_j Y); Y finite]``, ``logmgf_neg`` the same with
    ``-lambda_j``, for the Chernoff bounds of the composition.
    """

    mesh: float
    k_min: int
    pmf: np.ndarray
    inf_mass: float
    bias_lb: float
    logmgf_pos: np.ndarray
    logmgf_neg: np.ndarray


def _x_cdf_sf(x: np.ndarray, *, q: float, sigma: float, mixture: bool) -> tuple[np.ndarray, np.ndarray]:
    """CDF and survival function of the Gaussian (or the q-mixture N(1) / N(0)) at x."""
    if mixture:
        cdf = (1.0 - q) * ndtr(x / sigma) + q * ndtr((x - 1.0) / sigma)
        sf = (1.0 - q) * ndtr(-x / sigma) + q * ndtr((1.0 - x) / sigma)
    else:
        cdf = ndtr(x / sigma)
        sf = ndtr(-x / sigma)
    return cdf, sf


def _loss_cdf_sf(v: np.ndarray, *, q: float, sigma: float, direction: Direction):
    """P(L <= v) and P(L > v) for the privacy loss L of one subsampled Gaussian step.

    remove: x ~ (1-q) N(0, s^2) + q N(1, s^2), L(x) = log(1 - q + q exp((2x-1)/(2 s^2))),
            increasing in x;
    add:    x ~ N(0, s^2), L(x) = -log(1 - q + q exp((2x-1)/(2 s^2))), decreasing in x.
    Both are inverted in closed form, so each cell's mass is a difference of normal CDFs.
    """
    s2 = sigma * sigma
    sign = 1.0 if direction == "remove" else -1.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.expm1(sign * v) / q
        # r <= -1: v is beyond the loss's bound (below log(1-q) for remove, above -log(1-q)
        # for add), where no x maps; x = -inf gives the right CDF/SF there.
        x = np.where(r > -1.0, s2 * np.log1p(np.maximum(r, -1.0)) + 0.5, -np.inf)
    cdf_x, sf_x = _x_cdf_sf(x, q=q, sigma=sigma, mixture=(direction == "remove"))
    if direction == "remove":
        return cdf_x, sf_x
    return sf_x, cdf_x


def _loss_of_x(x: float, *, q: float, sigma: float, direction: Direction) -> float:
    z = (2.0 * x - 1.0) / (2.0 * sigma * sigma)
    base = -math.inf if q == 1.0 else math.log1p(-q)
    val = float(np.logaddexp(base, math.log(q) + z))
    return val if direction == "remove" else -val


def _stable_mass(cdf_a, sf_a, cdf_b, sf_b):
    """P(a < L <= b) from CDF/SF at a and b, subtracting whichever pair is small (no 1 - 1)."""
    return np.where(sf_a < 0.5, sf_a - sf_b, cdf_b - cdf_a).clip(min=0.0)


def discretize_subsampled_gaussian(
    *, sample_rate: float, noise_multiplier: float, mesh: float, direction: Direction
) -> DiscretePLD:
    """Round one step's privacy loss up to the grid ``mesh * Z`` (see module docstring)."""
    q, sigma, h = float(sample_rate), float(noise_multiplier), float(mesh)
    z = float(-ndtri(_SINGLE_TAIL))
    if direction == "remove":
        lo_l = _loss_of_x(-sigma * z, q=q, sigma=sigma, direction=direction)
        hi_l = _loss_of_x(1.0 + sigma * z, q=q, sigma=sigma, direction=direction)
    else:
        lo_l = _loss_of_x(sigma * z, q=q, sigma=sigma, direction=direction)
        hi_l = _loss_of_x(-sigma * z, q=q, sigma=sigma, direction=direction)
        if q < 1.0:
            hi_l = -math.log1p(-q)  # exact supremum of the add-direction loss
    k_a = int(math.floor(lo_l / h))
    k_b = int(math.ceil(hi_l / h))
    if k_b <= k_a:
        k_b = k_a + 1
    ks = np.arange(k_a - 1, k_b + 1, dtype=np.float64)
    edges = ks * h  # edges[j] = (k_a - 1 + j) h
    cdf, sf = _loss_cdf_sf(edges, q=q, sigma=sigma, direction=direction)
    mids = (ks[1:] - 0.5) * h
    cdf_m, sf_m = _loss_cdf_sf(mids, q=q, sigma=sigma, direction=direction)

    # Cell k covers ((k-1)h, kh]; the first cell also takes everything below (clamped up).
    mass = _stable_mass(cdf[:-1], sf[:-1], cdf[1:], sf[1:])
    half = _stable_mass(cdf[:-1], sf[:-1], cdf_m, sf_m)
    clamp = float(cdf[0])
    mass[0] += clamp
    inf_mass = float(sf[-1])

    # E[Y - L; cell] = integral over the cell of P((k-1)h < L <= v) dv (plus the clamped atom's
    # share in the first cell). Simpson on [0, half, mass]; the gap to the 2-panel trapezoid
    # (far larger than Simpson's own error) is subtracted as a safety margin.
    simpson = h / 6.0 * (4.0 * half + (mass - np.r_[clamp, np.zeros(mass.size - 1)]))
    trap = h / 4.0 * (2.0 * half + (mass - np.r_[clamp, np.zeros(mass.size - 1)]))
    bias = float(simpson.sum()) + h * clamp
    margin = float(np.abs(simpson - trap).sum())
    bias_lb = max(0.0, bias - margin)

    values = (np.arange(k_a, k_b + 1, dtype=np.float64)) * h
    logmgf_pos = _logmgf(mass, values, _LAMBDAS)
    logmgf_neg = _logmgf(mass, values, -_LAMBDAS)
    return DiscretePLD(
        mesh=h, k_min=k_a, pmf=mass, inf_mass=inf_mass, bias_lb=bias_lb,
        logmgf_pos=logmgf_pos, logmgf_neg=logmgf_neg,
    )


def _logmgf(mass: np.ndarray, values: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """log sum_k mass_k exp(lambda v_k) for each lambda, shifted by the extreme value so no
    term overflows (the dominant terms are the ones near that extreme)."""
    keep = mass > 0
    m, v = mass[keep], values[keep]
    out = np.empty(lambdas.size)
    if m.size == 0:
        out.fill(-np.inf)
        return out
    for j, lam in enumerate(lambdas):
        ref = v[-1] if lam > 0 else v[0]
        # (multiply-and-sum, not np.dot: BLAS threads are slow to wake on a loaded machine)
        out[j] = lam * ref + math.log(float((np.exp(lam * (v - ref)) * m).sum()))
    return out


def hoeffding_slack(*, mesh: float, steps: int, delta_err: float) -> float:
    """t with P(sum of ``steps`` centred errors in [0, mesh] < -t) <= delta_err."""
    if steps == 0:
        return 0.0
    return mesh * math.sqrt(steps * math.log(1.0 / delta_err) / 2.0)


def _sum_logmgf(parts: Sequence[tuple[DiscretePLD, int]], positive: bool) -> np.ndarray:
    total = np.zeros_like(_LAMBDAS)
    for d, n in parts:
        total += n * (d.logmgf_pos if positive else d.logmgf_neg)
    return total


def upper_tail_bound(parts: Sequence[tuple[DiscretePLD, int]], threshold: float) -> float:
    """Chernoff bound on P(all finite and sum of rounded losses > threshold)."""
    if not parts or sum(n for _, n in parts) == 0:
        return 0.0 if threshold >= 0 else 1.0
    logb = _sum_logmgf(parts, True) - _LAMBDAS * threshold
    return float(min(1.0, math.exp(min(0.0, float(np.min(logb))))))


@dataclass(frozen=True)
class Window:
    """Composed values ``(k_lo + i) * mesh`` for ``i in range(size)``."""

    mesh: float
    k_lo: int
    size: int

    @property
    def top(self) -> float:
        return (self.k_lo + self.size - 1) * self.mesh


def lower_tail_bound(parts: Sequence[tuple[DiscretePLD, int]], threshold: float) -> float:
    """Chernoff bound on P(all finite and sum of rounded losses < threshold)."""
    if not parts or sum(n for _, n in parts) == 0:
        return 0.0 if threshold <= 0 else 1.0
    logb = _sum_logmgf(parts, False) + _LAMBDAS * threshold
    return float(min(1.0, math.exp(min(0.0, float(np.min(logb))))))


def choose_window(*compositions: Sequence[tuple[DiscretePLD, int]], mesh: float) -> Window:
    """Smallest window holding all but ~WINDOW_TAIL of the composed mass on each side, for
    every one of ``compositions`` (the accountant passes the current one and the largest it
    plans for: the tail quantiles of n*mu +- c*sqrt(n) are extreme at the ends of the range).
    """
    log_tail = math.log(WINDOW_TAIL)
    hi = max(float(np.min((_sum_logmgf(p, True) - log_tail) / _LAMBDAS)) for p in compositions)
    lo = min(float(np.max((log_tail - _sum_logmgf(p, False)) / _LAMBDAS)) for p in compositions)
    # Never narrower than one step's support: the FFT must at least hold a single PMF sensibly.
    widest = max(d.pmf.size for p in compositions for d, _ in p)
    k_lo = int(math.floor(lo / mesh)) - 1
    k_hi = int(math.ceil(hi / mesh)) + 1
    size = max(k_hi - k_lo + 1, widest, 64)
    size = sp_fft.next_fast_len(size, real=True)
    size += size % 2
    return Window(mesh=mesh, k_lo=k_lo, size=size)


def single_spectrum(d: DiscretePLD, window: Window) -> np.ndarray:
    """rfft of one step's finite PMF folded onto the circular window (index = k - k_min)."""
    idx = np.arange(d.pmf.size) % window.size
    folded = np.bincount(idx, weights=d.pmf, minlength=window.size)
    return sp_fft.rfft(folded)


def epsilon_from_pmf(
    pmf: np.ndarray, *, values_start: float, mesh: float, inf_mass: float, delta: float
) -> float:
    """Smallest eps >= 0 with inf_mass + sum_v pmf(v) (1 - e^(eps - v))^+ <= delta.

    Returns ``inf`` when even an infinite epsilon cannot reach ``delta`` (infinite-loss mass
    at least delta). Only values above 0 matter because eps >= 0.
    """
    if inf_mass >= delta:
        return math.inf
    n = pmf.size
    first = max(0, int(math.floor(-values_start / mesh)))
    if first >= n:
        return 0.0
    # Scan from the top in chunks: epsilon usually sits in the upper part of the window, so
    # most of the (long) lower part never needs suffix sums.
    a_above = 0.0  # sum of pmf strictly above the current chunk
    b_above = 0.0  # sum of pmf * exp(v_ref - v) above the current chunk
    v_ref = values_start + mesh * (n - 1)  # exp(v_ref - v) >= 1 and grows downwards
    stop = n
    chunk = 1 << 15
    while stop > first:
        start = max(first, stop - chunk)
        p = pmf[start:stop]
        v = values_start + mesh * np.arange(start, stop, dtype=np.float64)
        w = np.exp(np.minimum(v_ref - v, 700.0))
        a = np.cumsum(p[::-1])[::-1] + a_above
        b = np.cumsum((p * w)[::-1])[::-1] + b_above
        a_next = np.r_[a[1:], a_above]
        b_next = np.r_[b[1:], b_above]
        # delta at eps = v_i uses the cells strictly above v_i.
        delta_at = inf_mass + a_next - np.exp(v - v_ref) * b_next
        bad = np.nonzero(delta_at > delta)[0]
        if bad.size:
            j = int(bad[-1])  # eps lies in (v_j, v_{j+1}]: cells from j+1 upwards count
            a_j = float(a_next[j])
            b_j = float(b_next[j])
            num = inf_mass + a_j - delta
            lo_v = float(v[j])
            if j + 1 < v.size:
                hi_v = float(v[j + 1])
            else:
                hi_v = lo_v + mesh
            if num <= 0 or b_j <= 0:
                return max(0.0, lo_v)
            eps = v_ref + math.log(num / b_j)
            return max(0.0, min(max(eps, lo_v), hi_v))
        a_above, b_above = float(a[0]), float(b[0])
        stop = start
    # delta(v_first) <= delta already: epsilon is at most v_first, where every cell counts.
    v_first = values_start + mesh * first
    num = inf_mass + a_above - delta
    if v_first <= 0 or num <= 0 or b_above <= 0:
        return 0.0
    return max(0.0, min(v_ref + math.log(num / b_above), v_first))
