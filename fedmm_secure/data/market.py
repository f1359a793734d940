"""The one market-dataset interface every generator and loader produces.

IDs are local to a market (0..n-1) and spaces are disjoint across markets by construction: the
method never joins them. ``item_keys`` keeps the original item identifiers (for example ASINs)
only so that evaluation can check code alignment across markets; no training code may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

__all__ = ["MarketSplit", "RankingSet", "MarketData"]


@dataclass(frozen=True)
class MarketSplit:
    """Labelled rows: one per (user, item) impression, or, for implicit feedback, one per
    positive interaction and one per negative sampled for it."""

    users: np.ndarray       # int64 (n,)
    items: np.ndarray       # int64 (n,)
    click: np.ndarray       # float32 (n,), 0/1
    conversion: np.ndarray  # float32 (n,), 0/1; conversion implies click (post-click conversion)
    # int64 (n,): the interaction each row derives from (its positive and its sampled negatives
    # share one id), so DP can protect the interaction, not one derived row. None: every row is
    # its own interaction (synthetic impressions, AliExpress logs).
    interaction: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.users)
        for name in ("items", "click", "conversion") + (("interaction",) if self.interaction is not None else ()):
            if len(getattr(self, name)) != n:
                raise DataError(f"split field {name!r} has {len(getattr(self, name))} rows, expected {n}")
        if n and np.any((self.conversion > 0) & (self.click <= 0)):
            raise DataError("a conversion without a click: conversions must be post-click")

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, idx: np.ndarray) -> "MarketSplit":
        """The rows at ``idx`` (an index array or boolean mask), as a new split."""
        return MarketSplit(self.users[idx], self.items[idx], self.click[idx], self.conversion[idx],
                           None if self.interaction is None else self.interaction[idx])

    def interaction_ids(self) -> np.ndarray:
        """The interaction of every row (``arange`` when each row is its own interaction)."""
        return np.arange(len(self), dtype=np.int64) if self.interaction is None else self.interaction

    @property
    def n_interactions(self) -> int:
        """How many distinct interactions the rows derive from."""
        return len(self) if self.interaction is None else int(len(np.unique(self.interaction)))


@dataclass(frozen=True)
class RankingSet:
    """Sampled-ranking evaluation: row i ranks ``items[i, 0]`` (the held-out positive) against
    ``items[i, 1:]`` (sampled negatives) for ``users[i]``."""

    users: np.ndarray  # int64 (n,)
    items: np.ndarray  # int64 (n, 1 + negatives)


@dataclass(frozen=True)
class MarketData:
    """One market's data, as every dataset loader returns it.

    IDs are local (users ``0..n_users-1``, items ``0..n_items-1``); ``train``/``valid``/``test``
    are :class:`MarketSplit` s; side features are int64 category matrices with their
    cardinalities; ``item_keys`` (original item ids) and ``item_cluster`` are for evaluation
    only. Out-of-range ids or an empty train split raise DataError.
    """

    name: str
    n_users: int
    n_items: int
    train: MarketSplit
    valid: MarketSplit
    test: MarketSplit
    user_features: np.ndarray | None = None   # int64 (n_users, fu) categorical side features
    item_features: np.ndarray | None = None   # int64 (n_items, fi) categorical side features
    user_feature_cards: tuple[int, ...] = ()
    item_feature_cards: tuple[int, ...] = ()
    item_cluster: np.ndarray | None = None    # ground-truth shared cluster per item (synthetic only)
    item_keys: np.ndarray | None = None       # original item ids, for evaluation-only alignment checks
    ranking: RankingSet | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in (self.train, self.valid, self.test):
            if len(split) and (split.users.min() < 0 or split.users.max() >= self.n_users):
                raise DataError(f"market {self.name!r}: user id out of range")
            if len(split) and (split.items.min() < 0 or split.items.max() >= self.n_items):
                raise DataError(f"market {self.name!r}: item id out of range")
        if self.item_features is not None and len(self.item_features) != self.n_items:
            raise DataError(f"market {self.name!r}: item_features has wrong number of rows")
        if self.user_features is not None and len(self.user_features) != self.n_users:
            raise DataError(f"market {self.name!r}: user_features has wrong number of rows")
        if len(self.train) == 0:
            raise DataError(f"market {self.name!r} has no training rows")
