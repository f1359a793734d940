"""One-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023): epsilon lower bounds.

Setting. ``m`` canaries are each included in the training data independently with
probability 1/2 (the vector ``S``); the model is trained once; an attacker scores every canary
and, for a *fixed* pair ``(k_plus, k_minus)``, guesses "in" for the ``k_plus`` highest scores,
"out" for the ``k_minus`` lowest, and abstains on the rest. ``r = k_plus + k_minus`` guesses are
made and ``v`` of them are correct.

Theorem 3.1 of the paper: if training is (eps, delta)-DP with respect to one canary, then for
every v

    P[V >= v] <= f(v) + 2 m delta * max_{i in 1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

The right-hand side is the p-value of "the mechanism is (eps, delta)-DP" given the observed v.
The reported lower bound is the largest eps that this test rejects at level ``alpha``.

Monotonicity (why bisection is valid). Write q = e^eps/(1+e^eps), beta(q) = f(v) and
S_i(q) = f(v - i) - f(v). d beta/dq = r * pmf_{r-1}(v-1) and
d S_i/dq = -r * (pmf_{r-1}(v-1) - pmf_{r-1}(v-i-1)) >= -d beta/dq, so each
beta + c S_i / i is non-decreasing in q when c = 2 m delta <= 1, and so is their maximum. Hence
the p-value is non-decreasing in eps, the rejected set is an interval [0, eps_lb), and
P[eps_lb > eps_true] = P[test rejects eps_true] <= alpha. We refuse 2 m delta > 1 (the bound is
near-vacuous there anyway) rather than lose this property.

Choosing (k_plus, k_minus). The theorem holds for a guesser fixed before the data are seen.
Taking the best of several pairs after seeing the scores is a multiple test: we test every pair
of a grid declared up front at level ``alpha / len(grid)`` (Bonferroni) and report the largest
bound. The union bound keeps P[any pair rejects eps_true] <= alpha. A grid of one pair is a
pre-registered choice and pays no correction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammaln

from ..errors import ConfigError, DataError

__all__ = [
    "OneRunBound",
    "one_run_p_value",
    "epsilon_lower_bound",
    "default_k_grid",
    "count_correct_guesses",
    "one_run_audit",
    "one_run_ceiling",
]

# Search ceiling for eps. Computations are in log space, so 200 is safe numerically; reaching it
# would need about e^200 guesses, so in practice the search always ends below it.
_EPS_CEILING = 200.0


@dataclass(frozen=True)
class OneRunBound:
    """Result of a one-run audit: the best (Bonferroni-corrected) bound over the k grid."""

    epsilon_lower_bound: float
    confidence: float  # 1 - alpha, for the whole grid jointly
    delta: float
    m: int  # number of randomised canaries
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    n_hypotheses: int  # size of the k grid (Bonferroni divisor)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_delta(m: np.ndarray, delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1 and math.isfinite(delta)):
        raise ConfigError("delta", f"must be in [0, 1), got {delta!r}")
    if np.any(2 * m * delta > 1):
        raise ConfigError(
            "delta",
            f"2 * m * delta must be <= 1 for the one-run bound (m={int(np.max(m))}, delta={delta})",
            allowed="delta <= 1 / (2 m)",
        )


class _PValue:
    """Theorem 3.1 p-value for a batch of (m, r, v), as a function of eps (vectorised).

    The log binomial coefficients depend only on (r, v), so they are computed once per batch
    and reused across every bisection step.
    """

    def __init__(self, r: np.ndarray, v: np.ndarray, m: np.ndarray, delta: float) -> None:
        self.r = r.astype(np.int64)
        self.v = v.astype(np.int64)
        self.c = 2.0 * m.astype(float) * delta
        width = int(self.r.max()) + 1 if self.r.size else 1
        k = np.arange(width)[None, :]
        rr = self.r[:, None]
        vv = self.v[:, None]
        self.valid = k <= rr
        self.k = np.where(self.valid, k, 0)
        self.rk = rr - self.k
        self.log_coef = gammaln(rr + 1) - gammaln(self.k + 1) - gammaln(self.rk + 1)
        self.at_or_above = (k >= vv) & self.valid
        self.below = k < vv
        self.inv_i = 1.0 / np.maximum(vv - k, 1)

    def __call__(self, eps: np.ndarray) -> np.ndarray:
        # log q and log(1 - q) for q = sigmoid(eps), stable for large eps.
        log_q = -np.log1p(np.exp(-eps))[:, None]
        log_1mq = -eps[:, None] + log_q
        pmf = np.exp(self.log_coef + self.k * log_q + self.rk * log_1mq)
        beta = np.where(self.at_or_above, pmf, 0.0).sum(axis=1)
        below = np.where(self.below, pmf, 0.0)
        # tail[j] = P[j <= B < v] = f(v - i) - f(v) with i = v - j, summed from the top so that
        # nothing cancels.
        tail = np.flip(np.cumsum(np.flip(below, axis=1), axis=1), axis=1)
        alpha_term = np.where(self.below, tail * self.inv_i, 0.0).max(axis=1)
        p = beta + alpha_term * self.c
        p = np.where(self.v <= 0, 1.0, p)
        return np.minimum(p, 1.0)


def _p_values(r: np.ndarray, v: np.ndarray, eps: np.ndarray, m: np.ndarray, delta: float) -> np.ndarray:
    return _PValue(r, v, m, delta)(eps)


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "(epsilon, delta)-DP" after ``v`` correct out of ``r`` guesses on ``m`` canaries."""
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ConfigError("epsilon", f"must be finite and >= 0, got {epsilon!r}")
    _check_delta(np.asarray([m]), delta)
    return float(_p_values(np.asarray([r]), np.asarray([v]), np.asarray([float(epsilon)]),
                           np.asarray([m]), delta)[0])


def _check_counts(m, r, v) -> None:
    m, r, v = np.asarray(m), np.asarray(r), np.asarray(v)
    if np.any(v < 0) or np.any(v > r) or np.any(r > m) or np.any(r < 0):
        raise ConfigError("guesses", "need 0 <= correct <= guesses <= m")


def epsilon_lower_bound(*, m, r, v, delta: float, alpha: float, iterations: int = 40) -> np.ndarray:
    """Largest eps rejected at level ``alpha`` for each (m, r, v) (vectorised, broadcast).

    Returns an array (0-d for scalar inputs). 0 means "no evidence of any leakage". The value
    returned is the lower end of the final bisection bracket, so it is always a rejected eps.
    """
    if not (0 < alpha < 1):
        raise ConfigError("alpha", f"must be in (0, 1), got {alpha!r}")
    m_a, r_a, v_a = np.broadcast_arrays(np.asarray(m), np.asarray(r), np.asarray(v))
    shape = m_a.shape
    m_a, r_a, v_a = (x.reshape(-1).astype(np.int64) for x in (m_a, r_a, v_a))
    _check_counts(m_a, r_a, v_a)
    _check_delta(m_a, delta)
    # Repeats of one audit share few distinct (m, r, v); solve each once.
    triples, inverse = np.unique(np.stack([m_a, r_a, v_a], axis=1), axis=0, return_inverse=True)
    p_of = _PValue(triples[:, 1], triples[:, 2], triples[:, 0], delta)
    n = triples.shape[0]
    lo = np.zeros(n)
    rejected_at_zero = p_of(lo) < alpha
    hi = np.ones(n)
    # Grow hi until eps = hi is not rejected (p >= alpha) for every problem.
    need = rejected_at_zero & (p_of(hi) < alpha)
    while need.any():
        lo = np.where(need, hi, lo)
        hi = np.where(need, np.minimum(hi * 2, _EPS_CEILING), hi)
        # At the ceiling the bracket [lo, hi] stays: bisection then returns a rejected eps < 200,
        # which is smaller than the truth would be, so still a valid lower bound.
        need = need & (hi < _EPS_CEILING) & (p_of(hi) < alpha)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        rej = p_of(mid) < alpha
        lo = np.where(rej, mid, lo)
        hi = np.where(rej, hi, mid)
    out = np.where(rejected_at_zero, lo, 0.0)[inverse.reshape(-1)]
    return out.reshape(shape)


def default_k_grid(m: int) -> tuple[tuple[int, int], ...]:
    """A data-independent grid of (k_plus, k_minus) pairs for ``m`` canaries.

    Geometric guess counts (few, confident guesses win at large eps; many guesses at small eps),
    each tried as "in"-only and as symmetric in/out.
    """
    if m < 2:
        raise ConfigError("m", f"need at least 2 canaries, got {m}")
    ks = sorted({k for k in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if k <= m // 2}
                | {max(1, m // 2)})
    grid: list[tuple[int, int]] = []
    for k in ks:
        grid.append((k, 0))
        grid.append((k, k))
    return tuple(grid)


def count_correct_guesses(scores: np.ndarray, included: np.ndarray,
                          k_grid: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Correct guesses per grid pair; ``scores``/``included`` may have a leading repeat axis.

    Higher score = "in". Ties are broken by canary index (independent of which canaries were
    included, so the guesser stays a function of the output alone).
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim not in (1, 2):
        raise DataError(f"scores {scores.shape} and inclusion {included.shape} must match (1-D or 2-D)")
    if not np.all(np.isfinite(scores)):
        raise DataError("scores contain NaN or infinity")
    two_d = scores.ndim == 2
    if not two_d:
        scores, included = scores[None], included[None]
    m = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(included, order, axis=1)
    cum_in = np.concatenate([np.zeros((s_sorted.shape[0], 1), np.int64), np.cumsum(s_sorted, axis=1)], axis=1)
    cum_out_from_end = np.concatenate(
        [np.zeros((s_sorted.shape[0], 1), np.int64), np.cumsum(~s_sorted[:, ::-1], axis=1)], axis=1)
    result = np.empty((scores.shape[0], len(k_grid)), np.int64)
    for j, (kp, km) in enumerate(k_grid):
        if kp < 0 or km < 0 or kp + km > m or kp + km == 0:
            raise ConfigError("k_grid", f"pair {(kp, km)} invalid for m={m}",
                              allowed="k_plus, k_minus >= 0, 0 < k_plus + k_minus <= m")
        result[:, j] = cum_in[:, kp] + cum_out_from_end[:, km]
    return result if two_d else result[0]


def one_run_audit(scores: np.ndarray, included: np.ndarray, *, delta: float, alpha: float = 0.05,
                  k_grid: tuple[tuple[int, int], ...] | None = None) -> OneRunBound | list[OneRunBound]:
    """Epsilon lower bound at confidence ``1 - alpha`` from one training run.

    ``included[i]`` must be the independent fair coin that put canary i into training. With a
    2-D input (repeats x canaries) a list of bounds is returned, one per repeat, computed in one
    vectorised pass.
    """
    scores = np.asarray(scores, dtype=float)
    m = scores.shape[-1]
    grid = tuple(k_grid) if k_grid is not None else default_k_grid(m)
    if not grid:
        raise ConfigError("k_grid", "must not be empty")
    correct = count_correct_guesses(scores, included, grid)
    two_d = correct.ndim == 2
    correct = correct if two_d else correct[None]
    r = np.array([kp + km for kp, km in grid])
    level = alpha / len(grid)
    eps = epsilon_lower_bound(m=m, r=np.broadcast_to(r, correct.shape), v=correct, delta=delta, alpha=level)
    best = np.argmax(eps, axis=1)
    results = []
    for row in range(correct.shape[0]):
        j = int(best[row])
        results.append(OneRunBound(
            epsilon_lower_bound=float(eps[row, j]), confidence=1 - alpha, delta=float(delta), m=int(m),
            k_plus=grid[j][0], k_minus=grid[j][1], guesses=int(r[j]), correct=int(correct[row, j]),
            n_hypotheses=len(grid)))
    return results if two_d else results[0]


def one_run_ceiling(m: int, *, delta: float, alpha: float = 0.05,
                    k_grid: tuple[tuple[int, int], ...] | None = None) -> float:
    """The achievable ceiling: the bound :func:`one_run_audit` reports if every guess is right.

    No audit of ``m`` canaries at this ``delta`` and grid can report more, so an accountant
    epsilon at or above it cannot be contradicted by the audit whatever the attack.
    """
    grid = tuple(k_grid) if k_grid is not None else default_k_grid(m)
    if not grid:
        raise ConfigError("k_grid", "must not be empty")
    r = np.array([kp + km for kp, km in grid])
    return float(np.max(epsilon_lower_bound(m=m, r=r, v=r, delta=delta, alpha=alpha / len(grid))))
