"""Platt scaling: a monotone post-hoc map of a model's logits, fitted on held-out rows.

DP-SGD leaves models that rank but are badly calibrated: clipping scales some records' gradients
down more than others (for the ESMM loss, conversions and non-clicks more than clicks) and the
noise inflates logits. Under DP epsilon 8 the PF-MSMTrec models had a CTCVR LogLoss worse than
predicting the base rate (bench/RESULTS_pf_msmtrec.md). ``sigmoid(scale * z + shift)`` with
``scale > 0`` keeps every ranking, so AUC does not move, and fitted by maximum likelihood on a
validation split it cannot do worse there than the uncalibrated model (``scale=1, shift=0`` is a
candidate). It reads only the rows it is fitted on; in PF-MSMTrec those are the client's own
validation rows and the result never leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError

__all__ = ["PlattScaling", "fit_platt", "binary_logloss", "calibrate_metrics", "served_metrics"]


@dataclass(frozen=True)
class PlattScaling:
    """``p = sigmoid(scale * logit + shift)``; the identity is ``PlattScaling()``."""

    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and np.isfinite(self.shift) and self.scale > 0):
            raise DataError(f"Platt scaling needs a finite positive scale and finite shift, "
                            f"got {self.scale!r}, {self.shift!r}")

    def logits(self, z: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(z, dtype=np.float64) + self.shift

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        return _sigmoid(self.logits(z))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _nll(z: np.ndarray, y: np.ndarray, s: float, t: float) -> float:
    u = s * z + t
    # -log sigmoid(u) = logaddexp(0, -u); -log(1 - sigmoid(u)) = logaddexp(0, u): no overflow.
    return float(np.mean(y * np.logaddexp(0.0, -u) + (1.0 - y) * np.logaddexp(0.0, u)))


def binary_logloss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of labels ``y`` under logits ``z`` (computed from logits, so
    saturated predictions do not need clipping)."""
    y = np.asarray(y, dtype=np.float64)
    return _nll(np.asarray(z, dtype=np.float64), y, 1.0, 0.0)


def fit_platt(logits: np.ndarray, labels: np.ndarray, *, iterations: int = 100,
              tolerance: float = 1e-10) -> PlattScaling:
    """Maximum-likelihood ``(scale, shift)`` by damped Newton steps (two parameters: exact
    Hessian, backtracking keeps every step a descent). Returns the identity when the labels hold
    one class only (nothing to fit) or when the best scale is not positive (the map would
    reverse the ranking: a model that ranks backwards is not repaired by calibration)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape or not len(z):
        raise DataError(f"calibration needs one label per logit, got {z.shape} logits and {y.shape} labels")
    if not np.all(np.isfinite(z)):
        raise DataError("calibration logits must be finite")
    if not np.all((y == 0) | (y == 1)):
        raise DataError("calibration labels must be 0 or 1")
    if y.min() == y.max():
        return PlattScaling()
    s, t = 1.0, 0.0
    loss = _nll(z, y, s, t)
    for _ in range(iterations):
        p = _sigmoid(s * z + t)
        r = p - y
        g = np.array([np.mean(r * z), np.mean(r)])
        w = p * (1.0 - p)
        h = np.array([[np.mean(w * z * z), np.mean(w * z)], [np.mean(w * z), np.mean(w)]]) + 1e-12 * np.eye(2)
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = g
        lr = 1.0
        while lr > 1e-8:
            s_new, t_new = s - lr * step[0], t - lr * step[1]
            new = _nll(z, y, s_new, t_new)
            if new <= loss:
                break
            lr *= 0.5
        else:
            break
        done = loss - new < tolerance
        s, t, loss = s_new, t_new, new
        if done:
            break
    if not (s > 0 and np.isfinite(s) and np.isfinite(t)):
        return PlattScaling()
    return PlattScaling(float(s), float(t))


def calibrate_metrics(metrics: dict, *, valid_logits: np.ndarray, valid_labels: np.ndarray,
                      test_logits: np.ndarray, test_labels: np.ndarray) -> dict:
    """Report a served model's metrics after Platt scaling fitted on ``valid``: ``logloss``
    becomes the calibrated test LogLoss, the raw one moves to ``logloss_uncalibrated``, the map
    goes to ``platt``; every other entry (AUC, ranking metrics: unchanged by a monotone map)
    stays. Returns a new dict."""
    return served_metrics(metrics, fit_platt(valid_logits, valid_labels), test_logits=test_logits,
                          test_labels=test_labels)


def served_metrics(metrics: dict, platt: PlattScaling, *, test_logits: np.ndarray, test_labels: np.ndarray) -> dict:
    """``metrics`` of a model served through ``platt`` (already fitted): ``logloss`` becomes the
    calibrated test LogLoss, the raw one moves to ``logloss_uncalibrated``, the map goes to
    ``platt``. Returns a new dict."""
    out = dict(metrics)
    out["logloss_uncalibrated"] = metrics["logloss"]
    out["logloss"] = binary_logloss(test_labels, platt.logits(test_logits))
    out["platt"] = [platt.scale, platt.shift]
    return out
