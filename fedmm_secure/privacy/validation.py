"""Differentially private use of validation rows: model selection and Platt calibration.

Validation rows are raw interactions like training rows; whatever is computed from them and
shapes what leaves a market (the kept model, the two Platt parameters of the served model) is a
release. Under DP every such release here is a **Gaussian mechanism on a bounded, decomposable
statistic summed over privacy units** (rows grouped by the run's unit: record, interaction or
user; each unit contributes the *mean* over its rows, so one unit moves the sum by at most the
per-unit bound, whatever its number of rows):

* selection: the sum over units of the difference of two candidates' Brier scores (each unit's
  mean Brier score is in [0, 1], so the difference is in [-1, 1]: L2 sensitivity 1 under
  add/remove of one unit), plus N(0, sigma^2); the candidate is kept when the noisy difference
  favours it. One comparison = one Gaussian mechanism.
* calibration: damped Newton steps on the two Platt parameters, each step releasing the
  per-unit sums of the gradient and the Hessian of the log loss of ``sigmoid(a * x + b)`` with
  ``x = clip(logit, -LOGIT_BOUND, LOGIT_BOUND) / LOGIT_BOUND`` in [-1, 1]: the gradient part has
  norm <= sqrt(2) and the Hessian part <= sqrt(3) / 4 per unit, so sensitivity
  ``PLATT_SENSITIVITY`` = sqrt(2 + 3/16) with no clipping bias; noise N(0, (sigma * S)^2) per
  coordinate. One Newton step = one Gaussian mechanism.

Each mechanism is accounted as ``SubsampledGaussianEvent(sample_rate=1.0, noise_multiplier=
sigma, steps=k, unit)``: with q = 1 the event *is* the Gaussian mechanism (k adaptive
compositions), so the PLD accountant composes it with DP-SGD exactly, and the ledger, ``budget
check`` and the report need nothing new. The validation rows of a unit are disjoint from its
training rows at the record and interaction level; the accountant still composes both on one
ledger (conservative), and at the user level the same user is in both, which composition covers.

The number of such releases of a run is known before training, so the run's epsilon target is
split up front (:class:`~fedmm_secure.privacy.session.PrivacySession`): the validation releases
alone would spend ``VALIDATION_SHARE`` of the target, and the DP-SGD noise is calibrated so that
training plus validation compose to the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.market import MarketSplit
from ..errors import ConfigError
from ..models.calibration import PlattScaling
from .randomness import RandomSource, normal_

__all__ = ["VALIDATION_SHARE", "LOGIT_BOUND", "PLATT_STEPS", "PLATT_SENSITIVITY", "ValidationAccess", "EXACT",
           "unit_index", "brier_rows", "difference_sum", "noisy_difference", "noisy_scores", "platt_statistics",
           "private_platt"]

# Share of the run's epsilon target that the validation releases alone would spend. Measured
# (bench/RESULTS_fedmm_dp.md): at epsilon 8 it raises the DP-SGD noise multiplier by 1.3-3.3%,
# because the PLD composition of a few full-batch Gaussian releases with many subsampled steps
# costs far less than the sum of their epsilons.
VALIDATION_SHARE = 0.3
# Public bound on the logits the private Platt fit reads (|logit| <= 6: p in [0.0025, 0.9975]);
# larger logits are clipped in the fit only, the map itself is applied to the raw logits.
LOGIT_BOUND = 6.0
# Newton steps of the private Platt fit: each is one release, so few; from the identity map two
# or three damped steps are enough (the log loss of two parameters is nearly quadratic there).
PLATT_STEPS = 3
PLATT_SENSITIVITY = math.sqrt(2.0 + 3.0 / 16.0)
_MAX_STEP = 2.0   # cap on one Newton step in (a, b): a noisy Hessian must not throw the map far


@dataclass(frozen=True)
class ValidationAccess:
    """How a market may read its validation rows for one release.

    ``mode``: ``"exact"`` (a non-private run: today's exact computation), ``"private"`` (add
    Gaussian noise of std ``noise_multiplier * sensitivity``; the event is on the ledger
    already; rows are grouped by ``unit``) or ``"refused"`` (the budget refused the release: read nothing, decide without
    data).
    """

    mode: str
    noise_multiplier: float = 0.0
    source: RandomSource | None = None
    reason: str = ""
    unit: str = "record"   # the run's privacy unit: how validation rows group into units

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "private", "refused"):
            raise ConfigError("mode", f"unknown validation access {self.mode!r}", allowed="exact, private, refused")
        if self.mode == "private" and (self.source is None or not self.noise_multiplier > 0):
            raise ConfigError("noise_multiplier", "a private release needs a noise multiplier > 0 and a source")

    def noise(self, size: int, sensitivity: float) -> np.ndarray:
        """``size`` draws of N(0, (noise_multiplier * sensitivity)^2)."""
        assert self.source is not None
        out = torch.empty(size, dtype=torch.float64)
        return normal_(self.source, out, self.noise_multiplier * sensitivity).numpy()


EXACT = ValidationAccess("exact")


def unit_index(split: MarketSplit, unit: str) -> tuple[np.ndarray, int]:
    """Dense privacy-unit index of every row of ``split`` (0..U-1) and the number of units U:
    one unit per row (``record``), per interaction (a positive and its sampled negatives) or
    per user."""
    if unit == "record":
        ids = np.arange(len(split), dtype=np.int64)
    elif unit == "interaction":
        ids = split.interaction_ids()
    elif unit == "user":
        ids = np.asarray(split.users)
    else:
        raise ConfigError("privacy.unit", f"validation rows cannot be grouped by {unit!r}",
                          allowed="record, interaction, user")
    _, inverse = np.unique(ids, return_inverse=True)
    return inverse.astype(np.int64), (int(inverse.max()) + 1 if len(inverse) else 0)


def _unit_means(values: np.ndarray, index: np.ndarray, n_units: int) -> np.ndarray:
    """Mean of ``values`` (rows x d) over each unit's rows: (n_units x d)."""
    counts = np.bincount(index, minlength=n_units).astype(np.float64)
    sums = np.zeros((n_units, values.shape[1]))
    np.add.at(sums, index, values)
    return sums / np.maximum(counts, 1.0)[:, None]


def brier_rows(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-row Brier score ``(p - y)^2``, in [0, 1]."""
    return (np.asarray(probs, np.float64) - np.asarray(labels, np.float64)) ** 2


def difference_sum(candidate: np.ndarray, incumbent: np.ndarray, index: np.ndarray, n_units: int) -> float:
    """The selection statistic before noise: the sum over units of each unit's mean of
    ``candidate - incumbent`` (per-row scores clipped to [0, 1]); one unit moves it by <= 1."""
    diff = np.clip(candidate, 0, 1) - np.clip(incumbent, 0, 1)
    return float(_unit_means(diff[:, None], index, n_units)[:, 0].sum())


def noisy_difference(candidate: np.ndarray, incumbent: np.ndarray, index: np.ndarray, n_units: int,
                     access: ValidationAccess) -> float:
    """Mean over units of ``candidate - incumbent`` per-row scores in [0, 1] (negative: the
    candidate is better), with Gaussian noise of sensitivity 1 on the sum when private.

    The number of units is public (as market sizes are: DP-SGD's sample rate is set from them)."""
    if access.mode != "private":
        raise ConfigError("access", f"noisy_difference needs a private release, got {access.mode!r}")
    return float((difference_sum(candidate, incumbent, index, n_units) + access.noise(1, 1.0)[0]) / max(n_units, 1))


def noisy_scores(candidates: list[np.ndarray], index: np.ndarray, n_units: int, access: ValidationAccess) -> np.ndarray:
    """Mean over units of each candidate's per-row scores in [0, 1], each with Gaussian noise of
    sensitivity 1 on its sum: ``len(candidates)`` releases (report-noisy-min over them is
    post-processing)."""
    if access.mode != "private":
        raise ConfigError("access", f"noisy_scores needs a private release, got {access.mode!r}")
    sums = np.array([_unit_means(np.clip(c, 0, 1)[:, None], index, n_units)[:, 0].sum() for c in candidates])
    return (sums + access.noise(len(candidates), 1.0)) / max(n_units, 1)


def _sigmoid(u: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -u))


def platt_statistics(x: np.ndarray, y: np.ndarray, a: float, b: float, index: np.ndarray, n_units: int) -> np.ndarray:
    """One Newton step's statistic before noise, for ``sigmoid(a * x + b)`` with ``x`` in
    [-1, 1]: per-unit means of ``[r x, r, w x^2, w x, w]`` (``r = p - y``, ``w = p (1 - p)``)
    summed over units; one unit moves it by at most ``PLATT_SENSITIVITY`` in L2."""
    p = _sigmoid(a * x + b)
    r, w = p - y, p * (1.0 - p)
    rows = np.stack([r * x, r, w * x * x, w * x, w], axis=1)
    return _unit_means(rows, index, n_units).sum(axis=0)


def private_platt(logits: np.ndarray, labels: np.ndarray, index: np.ndarray, n_units: int,
                  access: ValidationAccess, steps: int = PLATT_STEPS) -> PlattScaling:
    """Platt scaling by ``steps`` damped Newton steps (``access`` must grant that many
    releases), each on noisy per-unit sums of the log loss's gradient and Hessian (see the
    module doc). Starts from the identity map; a refused access leaves it; returns the identity
    when the fitted scale is not positive."""
    z = np.clip(np.asarray(logits, np.float64).ravel(), -LOGIT_BOUND, LOGIT_BOUND) / LOGIT_BOUND
    y = np.asarray(labels, np.float64).ravel()
    if z.shape != y.shape or z.shape != index.shape:
        raise ConfigError("labels", f"need one label and unit per logit, got {z.shape}, {y.shape}, {index.shape}")
    a, b = LOGIT_BOUND, 0.0          # a * x + b == logit for |logit| <= LOGIT_BOUND
    ridge = 1e-3 * max(n_units, 1)  # public: keeps the noisy Hessian invertible
    if access.mode == "refused":
        return PlattScaling()
    if access.mode != "private":
        raise ConfigError("access", f"private_platt needs a private release, got {access.mode!r}")
    for _ in range(steps):
        s = platt_statistics(z, y, a, b, index, n_units) + access.noise(5, PLATT_SENSITIVITY)
        g = s[:2]
        h = np.array([[s[2], s[3]], [s[3], s[4]]])
        # Project the noisy Hessian onto the positive semi-definite cone, then add the ridge.
        vals, vecs = np.linalg.eigh(h)
        h = (vecs * np.maximum(vals, 0.0)) @ vecs.T + ridge * np.eye(2)
        step = np.linalg.solve(h, g)
        norm = float(np.linalg.norm(step))
        if norm > _MAX_STEP:
            step *= _MAX_STEP / norm
        a, b = a - float(step[0]), b - float(step[1])
    scale = a / LOGIT_BOUND
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(b)):
        return PlattScaling()
    return PlattScaling(scale, b)
