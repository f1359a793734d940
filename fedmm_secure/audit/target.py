"""What an audit needs from the thing being audited: a pool and a way to train on part of it.

The audit never sees a model, a dataset or the federation. A target hands over an opaque index
space ``0 .. pool_size - 1`` of candidate records and a training callback; everything else
(features, labels, DP-SGD, markets) stays behind the callback. This keeps ``audit`` free of
imports from ``federation`` and lets the same attacks run on any model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ..errors import ConfigError

__all__ = ["ScoreFn", "TrainFn", "MarketAuditTarget"]


class ScoreFn(Protocol):
    """Scores pool records under one trained model.

    Returns, for each index, the logit-scaled confidence of the true label
    phi = log(p_true / (1 - p_true)) (see :mod:`fedmm_secure.audit.scores`). Higher = the model
    fits the record better.
    """

    def __call__(self, indices: np.ndarray, /) -> np.ndarray: ...


# train_fn(member_mask, seed): train one model on the target's fixed training data plus the pool
# records where member_mask is True (DP or not, as the target is configured), with all
# training randomness drawn from ``seed``; return the model's ScoreFn.
TrainFn = Callable[[np.ndarray, int], ScoreFn]


@dataclass(frozen=True)
class MarketAuditTarget:
    """One market's model-training procedure, exposed for auditing.

    ``pool_size``/``train_fn`` serve the loss and LiRA attacks. For the canary audit a target may
    supply crafted canaries (for example mislabeled or out-of-distribution records, which leak
    more than typical ones) as a second pool; without one the canary audit uses the main pool.
    ``accountant_epsilon`` is the epsilon the privacy accountant reports for exactly the
    training configuration ``train_fn`` runs, at the audit's delta (None for non-private
    training).
    """

    name: str
    pool_size: int
    train_fn: TrainFn
    accountant_epsilon: float | None = None
    canary_pool_size: int | None = None
    canary_train_fn: TrainFn | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pool_size, int) or self.pool_size < 4:
            raise ConfigError("pool_size", f"need an int >= 4, got {self.pool_size!r}")
        if not callable(self.train_fn):
            raise ConfigError("train_fn", "must be callable")
        if (self.canary_pool_size is None) != (self.canary_train_fn is None):
            raise ConfigError("canary_pool_size", "give both canary_pool_size and canary_train_fn, or neither")
        if self.canary_pool_size is not None and self.canary_pool_size < 4:
            raise ConfigError("canary_pool_size", f"need >= 4, got {self.canary_pool_size!r}")
        if self.accountant_epsilon is not None and not (self.accountant_epsilon >= 0):
            raise ConfigError("accountant_epsilon", f"must be >= 0, got {self.accountant_epsilon!r}")

    def canary_pool(self) -> tuple[int, TrainFn]:
        if self.canary_train_fn is not None and self.canary_pool_size is not None:
            return self.canary_pool_size, self.canary_train_fn
        return self.pool_size, self.train_fn
