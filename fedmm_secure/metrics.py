"""Evaluation metrics: CTR (AUC, LogLoss) and sampled ranking (HR@k, NDCG@k).

:func:`evaluate_ctr` scores predicted click probabilities against labels; every model family
reports it. For the ranking metrics on a :class:`~fedmm_secure.data.market.RankingSet`,
``scores`` has one row per ranking query; column 0 is the held-out positive, the other columns
are its sampled negatives (99 in the XMRec/FOREC protocol). Ties are counted pessimistically: a
negative scoring *equal* to the positive is ranked above it, so a constant scorer gets HR = 0
instead of a flattering 1.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from .errors import ConfigError, DataError

__all__ = ["evaluate_ctr", "positive_ranks", "hit_rate_at_k", "ndcg_at_k"]


def evaluate_ctr(y: np.ndarray, p: np.ndarray) -> dict:
    """AUC (NaN when ``y`` has one class only) and LogLoss of probabilities ``p`` (clipped to
    [1e-7, 1 - 1e-7] so one confident miss cannot make the loss infinite)."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"auc": auc, "logloss": logloss}


def positive_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of the positive in each row (number of negatives scoring >= it)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2 or s.shape[0] < 1:
        raise DataError(f"scores must be a 2-D array (queries, 1 + negatives), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise DataError("scores contain NaN or infinite values")
    return np.count_nonzero(s[:, 1:] >= s[:, :1], axis=1)


def _check_k(k: int, width: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= width:
        raise ConfigError("k", f"got {k!r}", allowed=f"an integer in [1, {width}]")


def hit_rate_at_k(scores: np.ndarray, k: int) -> float:
    """Fraction of rows whose positive is ranked in the top ``k``."""
    ranks = positive_ranks(scores)
    _check_k(k, np.shape(scores)[1])
    return float(np.mean(ranks < k))


def ndcg_at_k(scores: np.ndarray, k: int) -> float:
    """Mean NDCG@k with a single relevant item per row: 1 / log2(rank + 2) if rank < k, else 0."""
    ranks = positive_ranks(scores)
    _check_k(k, np.shape(scores)[1])
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))
