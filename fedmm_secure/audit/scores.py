"""Per-example confidence scores for membership inference.

LiRA works on the logit-scaled confidence of the true label, phi = log(p / (1 - p)), because
it is close to Gaussian across shadow models where p itself is not. For a binary CTR model
with logit z, p_true = sigmoid(z) for y = 1 and sigmoid(-z) for y = 0, so phi = (2y - 1) z
exactly, with no rounding at confident predictions. phi is a decreasing function of the
cross-entropy loss (loss = log(1 + e^-phi)), so thresholding phi is the loss attack.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ..errors import DataError

__all__ = ["phi_from_binary_logits", "phi_from_binary_probs", "phi_from_multiclass_logits",
           "loss_from_phi"]


def _labels01(labels, n: int) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size != n:
        raise DataError(f"{y.size} labels for {n} predictions")
    if not np.all((y == 0) | (y == 1)):
        raise DataError("binary labels must be 0 or 1")
    return y.astype(float)


def phi_from_binary_logits(logits, labels) -> np.ndarray:
    z = np.asarray(logits, dtype=float).reshape(-1)
    y = _labels01(labels, z.size)
    return (2 * y - 1) * z


def phi_from_binary_probs(probs, labels, *, floor: float = 1e-12) -> np.ndarray:
    """From predicted P(y = 1); probabilities are clipped to [floor, 1 - floor] first."""
    p = np.clip(np.asarray(probs, dtype=float).reshape(-1), floor, 1 - floor)
    y = _labels01(labels, p.size)
    p_true = np.where(y == 1, p, 1 - p)
    return np.log(p_true) - np.log1p(-p_true)


def phi_from_multiclass_logits(logits, labels) -> np.ndarray:
    """phi = z_y - logsumexp_{j != y} z_j (= log p_y - log(1 - p_y)), computed stably."""
    z = np.asarray(logits, dtype=float)
    if z.ndim != 2:
        raise DataError("multiclass logits must be 2-D (examples x classes)")
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.size != z.shape[0] or np.any(y < 0) or np.any(y >= z.shape[1]):
        raise DataError("labels must index the classes, one per example")
    rows = np.arange(z.shape[0])
    zy = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return zy - logsumexp(others, axis=1)


def loss_from_phi(phi) -> np.ndarray:
    """Cross-entropy of the true label, log(1 + e^-phi)."""
    return np.logaddexp(0.0, -np.asarray(phi, dtype=float))
