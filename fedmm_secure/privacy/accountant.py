"""Privacy accountants: compose DP events of one market and report epsilon at a delta.

* ``"pld"`` (default): certified upper bound from the pessimistic PLD of :mod:`.pld`, composed
  by FFT power with per-event spectra cached and the composition updated incrementally, so the
  hot path (epsilon after every round) costs one inverse FFT per round.
* ``"rdp"``: Renyi-DP (Mironov et al.) via Opacus' analysis; a valid but loose upper bound
  (typically 8-45% over), so it is only a flagged fallback: ``certified`` is False.
* ``"gdp"`` is refused: the Gaussian-DP CLT approximation *under*-reports epsilon
  (2.51 where the PRV lower bound is 3.13 at q=0.01, sigma=0.8, 1000 steps).

One accountant per market: markets differ in sample rate and steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
from scipy import fft as sp_fft
from scipy.special import gammaln, logsumexp

from ..errors import ConfigError
from . import pld as _pld
from .events import SubsampledGaussianEvent, event_from_dict

__all__ = [
    "EpsilonReport",
    "PrivacyAccountant",
    "PLDAccountant",
    "RDPAccountant",
    "register_accountant",
    "make_accountant",
    "accountant_from_dict",
    "available_accountants",
    "check_delta",
]

_STATE_VERSION = 1
_DIRECTIONS: tuple[_pld.Direction, ...] = ("remove", "add")
_EventKey = tuple[float, float]  # (sample_rate, noise_multiplier)


def check_delta(delta: float) -> float:
    """Validate a target delta: a real number in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) \
            or not 0.0 < delta < 1.0:
        raise ConfigError("delta", f"must be a finite number in (0, 1), got {delta!r}")
    return float(delta)


def _check_events(events: Iterable[SubsampledGaussianEvent]) -> list[SubsampledGaussianEvent]:
    out = list(events)
    for e in out:
        if not isinstance(e, SubsampledGaussianEvent):
            raise ConfigError("event", f"unsupported DP event {type(e).__name__}",
                              allowed="SubsampledGaussianEvent")
    return out


@dataclass(frozen=True)
class EpsilonReport:
    """What an accountant reports: ``certified`` is False for loose fallbacks (RDP)."""

    epsilon: float
    delta: float
    accountant: str
    certified: bool
    bound: str  # "certified upper bound" or "loose upper bound"
    steps: int

    def to_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
                "certified": self.certified, "bound": self.bound, "steps": self.steps}


class PrivacyAccountant(ABC):
    """Composes the DP events of one market; thin state over pure math."""

    name: ClassVar[str]
    certified: ClassVar[bool]

    def __init__(self) -> None:
        self._events: list[SubsampledGaussianEvent] = []
        self._unit: str | None = None

    # -- state ---------------------------------------------------------------------------
    @property
    def events(self) -> tuple[SubsampledGaussianEvent, ...]:
        """Every event composed so far, in order."""
        return tuple(self._events)

    @property
    def steps(self) -> int:
        """Total DP steps composed so far."""
        return sum(e.steps for e in self._events)

    @property
    def unit(self) -> str | None:
        """Privacy unit of the composed events (``None`` before the first)."""
        return self._unit

    def compose(self, event: SubsampledGaussianEvent) -> None:
        """Record that ``event`` was spent."""
        (event,) = _check_events([event])
        self._check_unit([event])
        self._events.append(event)
        if self._unit is None:
            self._unit = event.unit

    def _check_unit(self, events: Sequence[SubsampledGaussianEvent]) -> None:
        units = {e.unit for e in events} | ({self._unit} if self._unit else set())
        if len(units) > 1:
            raise ConfigError("event.unit", f"one accountant tracks one privacy unit, got {sorted(units)}")

    # -- queries ---------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (an upper bound; see ``certified``)."""
        return self._epsilon(self._events, check_delta(delta))

    def predict_epsilon(self, extra_events: Iterable[SubsampledGaussianEvent], delta: float) -> float:
        """Epsilon the accountant WOULD report after also spending ``extra_events``.

        Does not change the accountant's state.
        """
        extra = _check_events(extra_events)
        self._check_unit(extra)
        return self._epsilon(self._events + extra, check_delta(delta))

    def report(self, delta: float) -> EpsilonReport:
        """Epsilon at ``delta`` with how it is bounded (certified or not)."""
        return EpsilonReport(
            epsilon=self.get_epsilon(delta), delta=float(delta), accountant=self.name,
            certified=self.certified,
            bound="certified upper bound" if self.certified else "loose upper bound",
            steps=self.steps,
        )

    @abstractmethod
    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float: ...

    # -- persistence -----------------------------------------------------------------------
    def options(self) -> dict:
        """Constructor keyword arguments that reproduce this accountant's numerics."""
        return {}

    def to_dict(self) -> dict:
        """JSON-able state (name, options, events); :meth:`from_dict` restores it."""
        return {"version": _STATE_VERSION, "accountant": self.name, "options": self.options(),
                "events": [e.to_dict() for e in self._events]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PrivacyAccountant":
        """Rebuild an accountant from :meth:`to_dict` output; ConfigError if foreign."""
        acc = accountant_from_dict(d)
        if not isinstance(acc, cls):
            raise ConfigError("accountant", f"state is for {acc.name!r}, not {cls.name!r}")
        return acc


def _counts(events: Sequence[SubsampledGaussianEvent]) -> dict[_EventKey, int]:
    out: dict[_EventKey, int] = {}
    for e in events:
        if e.steps:
            k = (float(e.sample_rate), float(e.noise_multiplier))
            out[k] = out.get(k, 0) + e.steps
    return out


class _Plan:
    """A grid (mesh + circular window) for one neighbouring direction, with cached spectra.

    Valid for compositions of up to ``capacity`` steps of the event kinds it holds; the
    accountant re-plans (doubling the capacity) when a composition outgrows it.
    """

    def __init__(self, direction: _pld.Direction, mesh: float, capacity: int,
                 counts_now: Mapping[_EventKey, int], counts_cap: Mapping[_EventKey, int]) -> None:
        self.direction = direction
        self.mesh = mesh
        self.capacity = capacity
        self.disc: dict[_EventKey, _pld.DiscretePLD] = {
            k: self._discretize(k) for k in counts_cap}
        self.window = _pld.choose_window(self.parts(counts_now), self.parts(counts_cap), mesh=mesh)
        self._spec: dict[_EventKey, np.ndarray] = {}
        self._pow: dict[tuple[_EventKey, int], np.ndarray] = {}
        self._last_counts: dict[_EventKey, int] = {}
        self._last_spec: np.ndarray | None = None
        self.last_epsilon: float | None = None
        self.last_slack = 0.0

    def _discretize(self, k: _EventKey) -> _pld.DiscretePLD:
        return _pld.discretize_subsampled_gaussian(
            sample_rate=k[0], noise_multiplier=k[1], mesh=self.mesh, direction=self.direction)

    def holds(self, counts: Mapping[_EventKey, int]) -> bool:
        if sum(counts.values()) > self.capacity:
            return False
        for k in counts:
            if k not in self.disc:
                self.disc[k] = self._discretize(k)
        parts = self.parts(counts)
        if self.window.size > (1 << 16) and \
                self.window.size > 4 * _pld.choose_window(parts, mesh=self.mesh).size:
            return False  # made for a much wider composition (e.g. a calibration probe)
        return (_pld.upper_tail_bound(parts, self.window.top) <= 1e3 * _pld.WINDOW_TAIL
                and _pld.lower_tail_bound(parts, self.window.k_lo * self.mesh) <= 1e-9)

    def parts(self, counts: Mapping[_EventKey, int]) -> list[tuple[_pld.DiscretePLD, int]]:
        return [(self.disc[k], n) for k, n in counts.items()]

    def _power(self, k: _EventKey, n: int) -> np.ndarray:
        key = (k, n)
        got = self._pow.get(key)
        if got is None:
            spec = self._spec.get(k)
            if spec is None:
                spec = self._spec[k] = _pld.single_spectrum(self.disc[k], self.window)
            got = spec ** n
            # Bounded memory: at most ~2^24 cached coefficients (256 MiB) per plan.
            if len(self._pow) >= max(2, (1 << 24) // spec.size):
                self._pow.clear()
            self._pow[key] = got
        return got

    def spectrum(self, counts: Mapping[_EventKey, int]) -> np.ndarray:
        last = self._last_counts
        if self._last_spec is not None and all(counts.get(k, 0) >= n for k, n in last.items()):
            spec = self._last_spec
            for k, n in counts.items():
                extra = n - last.get(k, 0)
                if extra:
                    spec = spec * self._power(k, extra)
        else:
            spec = np.ones(self.window.size // 2 + 1, dtype=np.complex128)
            for k, n in counts.items():
                spec = spec * self._power(k, n)
        self._last_counts = dict(counts)
        self._last_spec = spec
        return spec

    def epsilon(self, counts: Mapping[_EventKey, int], delta: float) -> float:
        parts = self.parts(counts)
        n_total = sum(counts.values())
        w = self.window
        spec = self.spectrum(counts)
        circ = sp_fft.irfft(spec, n=w.size)
        shift = sum(self.disc[k].k_min * n for k, n in counts.items())
        pmf = np.roll(circ, shift - w.k_lo)
        np.maximum(pmf, 0.0, out=pmf)  # FFT noise below zero: raising it is pessimistic
        log_fin = sum(n * math.log1p(-self.disc[k].inf_mass) if self.disc[k].inf_mass < 1 else -math.inf
                      for k, n in counts.items())
        inf_mass = -math.expm1(log_fin)
        tail = _pld.upper_tail_bound(parts, w.top)
        # Rounding error of the FFT power: per coefficient at most ~(n + log M) ulp of |S_j|,
        # so per output cell at most (1/M) sum_j of that; only cells above epsilon >= 0 enter
        # delta, so charge it for every cell above 0.
        per_cell = 8.0 * (n_total + math.log2(w.size)) * np.finfo(np.float64).eps \
            * (2.0 * float(np.abs(spec).sum())) / w.size
        values_start = w.k_lo * self.mesh
        cells_above_zero = min(w.size, max(0, w.size + w.k_lo))
        fft_err = per_cell * cells_above_zero
        delta_err = delta * 1e-3
        target = delta - delta_err - tail - fft_err
        if target <= 0.0:
            raise ConfigError("delta", f"{delta!r} is too small for numerically certified accounting")
        eps_t = _pld.epsilon_from_pmf(pmf, values_start=values_start, mesh=self.mesh,
                                      inf_mass=inf_mass, delta=target)
        bias = sum(self.disc[k].bias_lb * n for k, n in counts.items())
        slack = _pld.hoeffding_slack(mesh=self.mesh, steps=n_total, delta_err=delta_err)
        eps = max(0.0, eps_t - bias + slack)
        self.last_epsilon, self.last_slack = eps, slack
        return eps


class PLDAccountant(PrivacyAccountant):
    """Certified PLD accountant (pessimistic discretization, FFT composition).

    ``relative_error``: target for the discretization slack as a fraction of epsilon (the
    reported value is an upper bound that exceeds the exact epsilon by about this much);
    ``absolute_error``: floor of that slack, which matters only for tiny epsilons.
    """

    name = "pld"
    certified = True

    def __init__(self, *, relative_error: float = 3e-3, absolute_error: float = 5e-4,
                 max_window: int = 1 << 22) -> None:
        super().__init__()
        for field, v in (("relative_error", relative_error), ("absolute_error", absolute_error)):
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ConfigError(field, f"must be in (0, 1), got {v!r}")
        if isinstance(max_window, bool) or not isinstance(max_window, int) or max_window < 1024:
            raise ConfigError("max_window", f"must be an int >= 1024, got {max_window!r}")
        self._rel = float(relative_error)
        self._abs = float(absolute_error)
        self._max_window = int(max_window)
        self._plans: dict[tuple[str, float, float], _Plan] = {}
        self._growth = 2
        self._memo: dict[tuple, float] = {}

    def options(self) -> dict:
        return {"relative_error": self._rel, "absolute_error": self._abs,
                "max_window": self._max_window}

    def _mesh_for(self, slack: float, steps: int, delta: float) -> float:
        return slack / math.sqrt(steps * math.log(1.0 / (delta * 1e-3)) / 2.0)

    def _make_plan(self, direction: _pld.Direction, counts: Mapping[_EventKey, int],
                   delta: float, rel: float, hint: float | None) -> _Plan:
        n = sum(counts.values())
        # Capacity 2x: few re-plans on the 50-round hot path. The mesh is sized for the slack
        # wanted *now* (rel * epsilon now); since the slack grows like sqrt(steps) and epsilon
        # grows at least about as fast, the relative slack stays near ``rel`` up to capacity
        # (and ``_epsilon`` re-plans if it does not).
        capacity = max(self._growth * n, 16)
        counts_cap = {k: -(-v * capacity // n) for k, v in counts.items()}
        if hint is None:
            # Coarse pass (slack 0.05) sizes the fine grid from the epsilon it is going to reach.
            coarse_slack = 0.05
            coarse = _Plan(direction, self._mesh_for(coarse_slack, n, delta), capacity, counts, counts_cap)
            eps_c = coarse.epsilon(counts, delta)
            slack = max(rel * max(eps_c - coarse_slack, 0.0), self._abs)
            if slack >= coarse_slack:
                return coarse
        else:
            slack = max(rel * hint, self._abs)
        mesh = self._mesh_for(slack, n, delta)
        plan = _Plan(direction, mesh, capacity, counts, counts_cap)
        while plan.window.size > self._max_window:
            mesh *= plan.window.size / self._max_window * 1.05
            plan = _Plan(direction, mesh, capacity, counts, counts_cap)
        return plan

    def _direction_epsilon(self, direction: _pld.Direction, counts: Mapping[_EventKey, int],
                           delta: float, rel: float) -> float:
        key = (direction, delta, rel)
        plan = self._plans.get(key)
        if plan is None or not plan.holds(counts):
            hint = plan.last_epsilon if plan is not None else None
            plan = self._plans[key] = self._make_plan(direction, counts, delta, rel, hint)
        eps = plan.epsilon(counts, delta)
        if plan.last_slack > 2.5 * max(rel * eps, self._abs):
            # Grid too coarse for this epsilon (it grew slower than sqrt(steps)): refine once.
            plan = self._plans[key] = self._make_plan(direction, counts, delta, rel, eps)
            eps = plan.epsilon(counts, delta)
        return eps

    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        counts = _counts(events)
        if not counts:
            return 0.0
        memo_key = (tuple(sorted(counts.items())), delta)
        if memo_key in self._memo:
            # The round loop asks predict_epsilon (budget check) and then get_epsilon for
            # the same composition: answer the second from memory.
            return self._memo[memo_key]
        eps = self._direction_epsilon("remove", counts, delta, self._rel)
        # The add direction is almost always smaller: bound it on a 10x coarser grid first and
        # only compute it finely when that bound is not already dominated.
        eps_add = self._direction_epsilon("add", counts, delta, 10 * self._rel)
        if eps_add > eps:
            eps_add = self._direction_epsilon("add", counts, delta, self._rel)
        if len(self._plans) > 12:  # many distinct deltas: keep memory bounded
            for key in list(self._plans)[:-6]:
                del self._plans[key]
        result = max(eps, eps_add)
        if len(self._memo) > 256:
            self._memo.clear()
        self._memo[memo_key] = result
        return result


def _rdp_subsampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP of order ``alpha`` (integer >= 2) of one Poisson-subsampled Gaussian step.

    Exact for integer orders (Mironov, Talwar, Zhang 2019, eq. for the binomial expansion):
    A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).
    """
    if q == 1.0:
        return alpha / (2.0 * sigma * sigma)
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma * sigma)
    return float(logsumexp(terms)) / (alpha - 1)


class RDPAccountant(PrivacyAccountant):
    """Renyi-DP fallback (loose upper bound). Flagged: ``certified`` is False.

    Integer orders only (exact RDP there), converted with the improved bound of Balle et al.
    2020 as in Opacus: eps = rdp - (log delta + log a) / (a - 1) + log((a - 1) / a).
    """

    name = "rdp"
    certified = False
    _ORDERS = tuple(list(range(2, 65)) + [80, 96, 128, 192, 256])

    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        counts = _counts(events)
        if not counts:
            return 0.0
        orders = np.asarray(self._ORDERS, dtype=np.float64)
        total = np.zeros(orders.size)
        for (q, sigma), n in counts.items():
            total += n * np.array([_rdp_subsampled_gaussian(q, sigma, a) for a in self._ORDERS])
        eps = total - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
        return float(max(0.0, np.nanmin(eps)))


# -- registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., PrivacyAccountant]] = {}
_REFUSED = {
    "gdp": "Gaussian-DP (CLT) under-reports epsilon (2.51 where the PRV lower bound is 3.13 at "
           "q=0.01, sigma=0.8, 1000 steps); it is not a guarantee",
}


def register_accountant(name: str, factory: Callable[..., PrivacyAccountant]) -> None:
    """Make ``make_accountant(name)`` build ``factory(**options)``."""
    if name in _REFUSED:
        raise ConfigError("accountant", f"{name!r} is refused: {_REFUSED[name]}")
    if not isinstance(name, str) or not name:
        raise ConfigError("accountant", "name must be a non-empty string")
    _REGISTRY[name] = factory


def available_accountants() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_accountant(name: str = "pld", **options) -> PrivacyAccountant:
    """Build a registered accountant; ``"gdp"`` raises ConfigError explaining why."""
    if name in _REFUSED:
        raise ConfigError("accountant", f"{name!r} is refused: {_REFUSED[name]}",
                          allowed=", ".join(available_accountants()))
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError("accountant", f"unknown accountant {name!r}",
                          allowed=", ".join(available_accountants()))
    return factory(**options)


def accountant_from_dict(d: Mapping) -> PrivacyAccountant:
    """Rebuild an accountant (kind, options and composed events) from ``to_dict`` output."""
    if not isinstance(d, Mapping) or d.get("version") != _STATE_VERSION:
        raise ConfigError("accountant", "not an accountant state of a supported version")
    acc = make_accountant(d.get("accountant", ""), **dict(d.get("options") or {}))
    for ev in d.get("events", []):
        acc.compose(event_from_dict(ev))
    return acc


register_accountant("pld", PLDAccountant)
register_accountant("rdp", RDPAccountant)
