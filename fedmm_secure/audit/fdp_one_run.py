"""One-run audit of a claimed f-DP tradeoff curve (Mahloujifar, Melis, Chaudhuri 2024).

Why not the (eps, delta) bound of :mod:`.one_run`. Steinke et al.'s Theorem 3.1 tests one
(eps, delta) pair, pays ``2 m delta`` for it, and even with every guess right cannot reject an
eps above about ``ln(m / ln(G / alpha))``: about 7.4 for m = 10^4, 9.7 for m = 10^5. Rejecting
the default run's epsilon 8 at delta 1e-5 needs m >= 3 * 10^4 canaries, where ``2 m delta``
alone is 0.6; auditing at a smaller delta instead moves the accountant's epsilon up faster than
the ceiling (eps 7.8 at 1e-5 is 12.0 at 1e-8 for the default "rich" market). The claim is
tested here as a whole tradeoff curve instead, which has no ``m delta`` term: the accountant
certifies ``(eps_j, delta_j)``-DP for every delta_j it is asked about, so the mechanism is f-DP
for ``f = max_j f_{eps_j, delta_j}`` (Dong, Roth, Su 2019, Prop. 2.12), a curve below the
accountant's own (finitely many pairs: a weaker claim, so a valid one to test).

The test (Mahloujifar et al., "audit with cap", one-sided guesses). ``m`` canaries, each in with
probability 1/2; the auditor guesses "in" for its ``k`` highest scores and abstains on the rest;
``v`` of the ``k`` guesses are right. Starting from ``r = alpha v / m`` (correct) and
``h = alpha (k - v) / m`` (incorrect), for ``i = v-1, ..., 0``::

    h' = max(h, f(1 - r)),   r' = min(r + i / (k - i) * (h' - h), 1)

until ``h`` stops changing. The claim "the mechanism is f-DP" is rejected at level ``alpha``
when ``r + h > k / m``. A guesser chosen after seeing the scores is a multiple test: every
``k`` of a grid fixed up front is tested at ``alpha / len(grid)`` (Bonferroni).

Empirical epsilon. A family of claims ordered from weakest to strongest (for DP-SGD: the same
sampling rate and steps with noise multipliers ``s`` from small to large, each curve computed by
the project's accountant) is tested; the reported lower bound is the epsilon (at the run's
delta) of the weakest claim ``c`` such that ``c`` and every stronger claim of the family are
rejected. Validity: if the mechanism is truly f_c*-DP for a member c* of the family (the
ledger's claim, for a correct run), reporting more than eps(c*) means c* itself was rejected,
which happens with probability <= alpha. No monotonicity of the test in ``f`` is assumed: the
rule takes the rejected set's longest strong end. The achievable ceiling is the same bound with
every guess right (``v = k``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["PrivacyProfile", "FdpBound", "PROFILE_DELTAS", "fdp_rejects", "fdp_k_grid", "fdp_family_bound",
           "noise_family", "subsampled_gaussian_profile"]


@dataclass(frozen=True)
class PrivacyProfile:
    """``(epsilons[j], deltas[j])``-DP for every j: the tradeoff curve it implies.

    ``label_epsilon`` is the epsilon the claim is reported as (at the run's delta).
    """

    epsilons: tuple[float, ...]
    deltas: tuple[float, ...]
    label_epsilon: float

    def __post_init__(self) -> None:
        if len(self.epsilons) != len(self.deltas) or not self.epsilons:
            raise ConfigError("profile", "needs as many epsilons as deltas, at least one")
        if any(not (e >= 0 and math.isfinite(e)) for e in self.epsilons) or \
                any(not (0 <= d < 1) for d in self.deltas):
            raise ConfigError("profile", "epsilons must be finite >= 0 and deltas in [0, 1)")

    def tradeoff(self, alpha: np.ndarray) -> np.ndarray:
        """Smallest type II error at type I error ``alpha`` that the pairs allow."""
        return _tradeoff(np.asarray(alpha, float)[:, None], np.asarray(self.epsilons)[None],
                         np.asarray(self.deltas)[None])


def _tradeoff(alpha: np.ndarray, eps: np.ndarray, delta: np.ndarray) -> np.ndarray:
    # f_{eps,delta}(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)); max over the pairs.
    with np.errstate(over="ignore"):
        a = 1.0 - delta - np.exp(eps) * alpha
    b = np.exp(-eps) * (1.0 - delta - alpha)
    return np.maximum(np.maximum(a, b).max(axis=-1), 0.0)


def fdp_rejects(eps: np.ndarray, delta: np.ndarray, *, m: int, k: np.ndarray, v: np.ndarray,
                alpha: float | np.ndarray) -> np.ndarray:
    """For each problem p: is "f_p-DP" rejected at level ``alpha`` by ``v[p]`` right of ``k[p]``?

    ``eps``/``delta``: (P, J) profiles (pad with a repeated pair); ``k``, ``v``: (P,). Runs the
    recursion of the module docstring for every problem at once.
    """
    eps, delta = np.asarray(eps, float), np.asarray(delta, float)
    k, v = np.asarray(k, np.int64), np.asarray(v, np.int64)
    alpha = np.broadcast_to(np.asarray(alpha, float), k.shape)
    if np.any(v < 0) or np.any(v > k) or np.any(k > m) or np.any(k < 1):
        raise ConfigError("guesses", "need 0 <= correct <= guesses <= m and guesses >= 1")
    r = alpha * v / m
    h = alpha * (k - v) / m
    i = v - 1
    active = i >= 0
    while active.any():
        idx = np.nonzero(active)[0]
        hn = np.maximum(h[idx], _tradeoff(1.0 - r[idx, None], eps[idx], delta[idx]))
        moved = hn > h[idx]
        idx, hn = idx[moved], hn[moved]
        ii = i[idx]
        r[idx] = np.minimum(r[idx] + ii / (k[idx] - ii) * (hn - h[idx]), 1.0)
        h[idx] = hn
        still = np.zeros_like(active)
        still[idx] = True
        i = i - 1
        active = still & (i >= 0)
    return r + h > k / m


def fdp_k_grid(m: int) -> tuple[int, ...]:
    """Data-independent guess counts for ``m`` canaries (few confident guesses win at large eps)."""
    if m < 2:
        raise ConfigError("m", f"need at least 2 canaries, got {m}")
    return tuple(sorted({k for k in (10, 30, 100, 300, 1000, 3000, 10000, 30000) if k <= m // 2}
                        | {max(1, m // 2)}))


@dataclass(frozen=True)
class FdpBound:
    """One audit's outcome: empirical lower bound and achievable ceiling, both at the run's delta."""

    epsilon_lower_bound: float
    ceiling: float
    claim_rejected: bool      # was the claimed curve itself (the ledger's) rejected?
    confidence: float
    m: int
    k: int                    # guesses of the pair that gave the bound (0: nothing rejected)
    correct: int
    n_hypotheses: int

    def to_dict(self) -> dict:
        return asdict(self)


def _pad(family: Sequence[PrivacyProfile]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p.epsilons) for p in family)
    eps = np.array([list(p.epsilons) + [p.epsilons[-1]] * (width - len(p.epsilons)) for p in family])
    dl = np.array([list(p.deltas) + [p.deltas[-1]] * (width - len(p.deltas)) for p in family])
    return eps, dl


def _strong_end(rejected: np.ndarray) -> np.ndarray:
    """Per row (family ordered weakest -> strongest): index of the weakest member whose every
    stronger member is rejected too; len(row) when the strongest is not rejected."""
    n = rejected.shape[-1]
    tail_ok = np.flip(np.cumprod(np.flip(rejected, -1), -1), -1).astype(bool)
    first = np.where(tail_ok.any(-1), np.argmax(tail_ok, -1), n)
    return first


def fdp_family_bound(scores: np.ndarray, included: np.ndarray, family: Sequence[PrivacyProfile], *,
                     claimed: int, alpha: float = 0.05,
                     k_grid: tuple[int, ...] | None = None) -> list[FdpBound]:
    """Audit every row of ``scores`` (repeats x m; higher = "in") against ``family``.

    ``family`` is ordered weakest (largest epsilon) to strongest; ``family[claimed]`` is the
    accountant's claim for the run. Returns one :class:`FdpBound` per repeat.
    """
    scores = np.atleast_2d(np.asarray(scores, float))
    included = np.atleast_2d(np.asarray(included, bool))
    if scores.shape != included.shape:
        raise DataError(f"scores {scores.shape} and inclusion {included.shape} must match")
    if not np.all(np.isfinite(scores)):
        raise DataError("scores contain NaN or infinity")
    if not (0 < alpha < 1):
        raise ConfigError("alpha", f"must be in (0, 1), got {alpha!r}")
    if not family or not (0 <= claimed < len(family)):
        raise ConfigError("family", "needs the claimed member among at least one profile")
    labels = [p.label_epsilon for p in family]
    if any(a < b for a, b in zip(labels, labels[1:])):
        raise ConfigError("family", "must be ordered weakest (largest epsilon) to strongest")
    n_rep, m = scores.shape
    grid = np.array(k_grid if k_grid is not None else fdp_k_grid(m))
    if grid.size == 0 or grid.min() < 1 or grid.max() > m:
        raise ConfigError("k_grid", f"guess counts must be in [1, {m}]")
    level = alpha / grid.size
    # Ties broken by canary index: the guesser stays a function of the output alone.
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.cumsum(np.take_along_axis(included, order, axis=1), axis=1)
    correct = hits[:, grid - 1]                                   # (R, G)
    eps, dl = _pad(family)
    n_fam = len(family)
    # Problems: (repeat or ceiling row) x k x family member; the ceiling row has v = k.
    v_all = np.concatenate([correct, grid[None]], axis=0)         # (R+1, G)
    rows, g, f = np.meshgrid(np.arange(n_rep + 1), np.arange(grid.size), np.arange(n_fam), indexing="ij")
    rej = fdp_rejects(eps[f.ravel()], dl[f.ravel()], m=m, k=grid[g.ravel()], v=v_all[rows.ravel(), g.ravel()],
                      alpha=level).reshape(n_rep + 1, grid.size, n_fam)
    first = _strong_end(rej)                                      # (R+1, G)
    lab = np.array(labels + [0.0])
    bound = lab[first]
    out = []
    ceiling = float(bound[-1].max())
    for row in range(n_rep):
        j = int(np.argmax(bound[row]))
        got = bound[row, j] > 0 and first[row, j] < n_fam
        out.append(FdpBound(epsilon_lower_bound=float(bound[row, j]), ceiling=ceiling,
                            claim_rejected=bool(rej[row, :, claimed].any()), confidence=1 - alpha, m=int(m),
                            k=int(grid[j]) if got else 0, correct=int(correct[row, j]) if got else 0,
                            n_hypotheses=int(grid.size)))
    return out


# Deltas at which each claim's profile is read: large ones shape the curve's middle (many
# guesses), small ones its ends (few confident guesses: pairs well below alpha / m matter);
# below 1e-14 the PLD's truncated tail dominates.
PROFILE_DELTAS: tuple[float, ...] = tuple(float(d) for d in np.logspace(-0.1, -14, 40))


def subsampled_gaussian_profile(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float,
                                deltas: Sequence[float] = PROFILE_DELTAS,
                                discretization: float = 2e-3) -> PrivacyProfile:
    """The (eps, delta) profile of ``steps`` Poisson-subsampled Gaussian steps (add or remove
    one unit), from dp_accounting's pessimistic PLD: every pair is an upper bound, so the curve
    is implied by the mechanism. Labelled with its epsilon at ``delta``."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if not (0 < sample_rate <= 1) or not (noise_multiplier > 0) or steps < 1:
        raise ConfigError("mechanism", f"need 0 < q <= 1, sigma > 0, steps >= 1; got q={sample_rate}, "
                          f"sigma={noise_multiplier}, steps={steps}")
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=float(noise_multiplier), sensitivity=1.0, sampling_prob=float(sample_rate),
        value_discretization_interval=discretization, pessimistic_estimate=True).self_compose(int(steps))
    pairs = [(float(pld.get_epsilon_for_delta(d)), float(d)) for d in deltas]
    pairs = [(e, d) for e, d in pairs if math.isfinite(e)]
    return PrivacyProfile(tuple(e for e, _ in pairs), tuple(d for _, d in pairs),
                          float(pld.get_epsilon_for_delta(delta)))


def noise_family(noise_multiplier: float, *, steps_per_octave: int = 12,
                 octaves: tuple[float, float] = (1.0, 1.0), fine: int = 4) -> tuple[list[float], int]:
    """Noise multipliers ``sigma * 2^x`` for x from ``-octaves[0]`` to ``+octaves[1]``, ascending
    (weakest claim first), and the index of ``sigma`` itself in that list.

    ``fine`` extra members sit between the claim and the next weaker grid point (steps of
    ``1 / (steps_per_octave * (fine + 1))`` octave): a bound just above the claimed epsilon needs
    a rejected member whose epsilon is just above it.
    """
    lo = -int(round(octaves[0] * steps_per_octave))
    hi = int(round(octaves[1] * steps_per_octave))
    xs = {j / steps_per_octave for j in range(lo, hi + 1)}
    xs |= {-j / (steps_per_octave * (fine + 1)) for j in range(1, fine + 1)} if lo < 0 else set()
    ordered = sorted(xs)
    return [noise_multiplier * 2.0 ** x for x in ordered], ordered.index(0.0)
