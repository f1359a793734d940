"""Label protocol for implicit feedback, applied identically to every method and every loader.

Protocol (see docs/data.md for the rationale):

1. **Positives.** Every observed interaction the loader marks as a click is a positive. Repeated
   (user, item) pairs are collapsed to the earliest one (earliest time, then file order), so an
   item cannot be a training positive and a held-out positive at once.
2. **Time-ordered split per user (leave-last-out).** A user's positives are ordered by time,
   ties broken by file order (deterministic, independent of the seed). The last one is the test
   positive, the second-last the validation positive, the rest are training positives; every
   held-out interaction is therefore no earlier than any of that user's training interactions.
   Users with fewer than ``min_user_interactions`` (>= 3) positives keep all of them in training.
3. **Sampled negatives.** Each positive in train, valid and test gets
   ``negatives_per_positive`` negatives (click = conversion = 0), distinct within the group,
   drawn uniformly from the market's items the user never interacted with at all (in any split,
   including interactions that were not clicks, e.g. low MovieLens ratings). Negatives therefore
   never collide with a positive.
4. **Ranking sets.** Each test positive is ranked against ``ranking_negatives`` (99, the
   XMRec/FOREC protocol) distinct sampled negatives from the same pool, column 0 being the
   positive; the same is built for validation (``meta["valid_ranking"]``) for model selection.

Randomness comes only from the ``np.random.Generator`` passed in; :func:`market_rng` derives one
stream per (seed, market name) so a market's labels do not depend on which other markets were
loaded alongside it.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError, DataError
from .market import MarketData, MarketSplit, RankingSet

__all__ = [
    "ImplicitProtocol",
    "InteractionIndex",
    "market_rng",
    "first_occurrences",
    "leave_last_out",
    "sample_negatives",
    "labelled_split",
    "build_implicit_market",
]


@dataclass(frozen=True)
class ImplicitProtocol:
    negatives_per_positive: int = 4
    ranking_negatives: int = 99
    min_user_interactions: int = 3
    min_test_users: int = 1  # a market with fewer held-out users is refused, not silently kept

    def __post_init__(self) -> None:
        if not isinstance(self.negatives_per_positive, int) or self.negatives_per_positive < 1:
            raise ConfigError("data.negatives_per_positive", f"got {self.negatives_per_positive!r}",
                              allowed="an integer >= 1")
        if not isinstance(self.ranking_negatives, int) or self.ranking_negatives < 1:
            raise ConfigError("data.ranking_negatives", f"got {self.ranking_negatives!r}",
                              allowed="an integer >= 1 (99 for the XMRec protocol)")
        if not isinstance(self.min_user_interactions, int) or self.min_user_interactions < 3:
            raise ConfigError("data.min_user_interactions", f"got {self.min_user_interactions!r}",
                              allowed="an integer >= 3 (one train, one valid, one test positive)")
        if not isinstance(self.min_test_users, int) or self.min_test_users < 1:
            raise ConfigError("data.min_test_users", f"got {self.min_test_users!r}",
                              allowed="an integer >= 1")


def market_rng(seed: int, market: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, market).

    Not cryptographic: this only drives negative sampling and data splits.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"got {seed!r}", allowed="a non-negative integer")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), zlib.crc32(market.encode())])))


class InteractionIndex:
    """Set membership for (user, item) pairs, vectorized through sorted int64 keys."""

    def __init__(self, users: np.ndarray, items: np.ndarray, *, n_users: int, n_items: int) -> None:
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.keys = np.unique(np.asarray(users, np.int64) * self.n_items + np.asarray(items, np.int64))
        self.counts = np.bincount(self.keys // self.n_items, minlength=self.n_users)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = np.asarray(users, np.int64) * self.n_items + np.asarray(items, np.int64)
        if len(self.keys) == 0:
            return np.zeros(q.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q

    def items_of(self, user: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.keys, [user * self.n_items, (user + 1) * self.n_items])
        return self.keys[lo:hi] - user * self.n_items


def first_occurrences(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Indices of the earliest row (by time, then position) of every distinct (user, item)."""
    n = len(users)
    order = np.lexsort((np.arange(n), times, items, users))
    u, i = users[order], items[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    return np.sort(order[first])


def leave_last_out(
    users: np.ndarray, times: np.ndarray, *, min_user_interactions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) row indices; ties in time are broken by row position."""
    n = len(users)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    order = np.lexsort((np.arange(n), times, users))
    su = users[order]
    start = np.ones(n, dtype=bool)
    start[1:] = su[1:] != su[:-1]
    group = np.cumsum(start) - 1
    starts = np.flatnonzero(start)
    counts = np.diff(np.append(starts, n))
    from_end = counts[group] - 1 - (np.arange(n) - starts[group])
    eligible = counts[group] >= min_user_interactions
    test = eligible & (from_end == 0)
    valid = eligible & (from_end == 1)
    train = ~(test | valid)
    return np.sort(order[train]), np.sort(order[valid]), np.sort(order[test])


def _within_row_duplicates(block: np.ndarray) -> np.ndarray:
    """Mask of entries that repeat an earlier entry of the same row."""
    if block.shape[1] < 2:
        return np.zeros(block.shape, dtype=bool)
    order = np.argsort(block, axis=1, kind="stable")
    s = np.take_along_axis(block, order, axis=1)
    dup_sorted = np.zeros(block.shape, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    mask = np.zeros(block.shape, dtype=bool)
    np.put_along_axis(mask, order, dup_sorted, axis=1)
    return mask


def sample_negatives(
    users: np.ndarray,
    k: int,
    *,
    interacted: InteractionIndex,
    rng: np.random.Generator,
    context: str,
) -> np.ndarray:
    """(len(users), k) items, distinct within a row, none of which the row's user interacted with.

    Rejection sampling, vectorized; users whose pool of non-interacted items is small relative to
    the catalogue (where rejection would be slow) are sampled exactly from their complement.
    """
    users = np.asarray(users, np.int64)
    n_items = interacted.n_items
    out = np.zeros((len(users), k), dtype=np.int64)
    if len(users) == 0:
        return out
    pool = n_items - interacted.counts[users]
    if np.any(pool < k):
        u = int(users[np.argmin(pool)])
        raise DataError(
            f"{context}: user {u} has only {int(pool.min())} items they never interacted with, "
            f"but {k} distinct negatives are required; lower the number of negatives"
        )
    exact = (pool < 2 * k) | (2 * pool < n_items)
    fast = np.flatnonzero(~exact)
    if len(fast):
        fu = users[fast]
        block = rng.integers(0, n_items, size=(len(fast), k))
        rows = np.arange(len(fast))
        for _ in range(200):
            sub = block[rows]
            bad = interacted.contains(fu[rows, None], sub) | _within_row_duplicates(sub)
            if not bad.any():
                rows = rows[:0]
                break
            sub[bad] = rng.integers(0, n_items, size=int(bad.sum()))
            block[rows] = sub
            rows = rows[bad.any(axis=1)]
        if len(rows):  # astronomically unlikely with pool >= n_items / 2; stay correct anyway
            exact[fast[rows]] = True
        out[fast] = block
    all_items = np.arange(n_items, dtype=np.int64)
    for r in np.flatnonzero(exact):
        complement = np.setdiff1d(all_items, interacted.items_of(int(users[r])), assume_unique=True)
        out[r] = rng.choice(complement, size=k, replace=False)
    return out


def labelled_split(
    users: np.ndarray, items: np.ndarray, conversion: np.ndarray, negatives: np.ndarray
) -> MarketSplit:
    """One positive row followed by its negatives, for every positive; rows derived from the
    i-th positive carry interaction id i."""
    k = negatives.shape[1]
    n = len(users)
    all_items = np.concatenate([np.asarray(items, np.int64)[:, None], negatives], axis=1).ravel()
    click = np.zeros((n, k + 1), dtype=np.float32)
    click[:, 0] = 1.0
    conv = np.zeros((n, k + 1), dtype=np.float32)
    conv[:, 0] = np.asarray(conversion, dtype=np.float32)
    return MarketSplit(
        users=np.repeat(np.asarray(users, np.int64), k + 1),
        items=all_items,
        click=click.ravel(),
        conversion=conv.ravel(),
        interaction=np.repeat(np.arange(n, dtype=np.int64), k + 1),
    )


def build_implicit_market(
    name: str,
    *,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    conversion: np.ndarray,
    n_users: int,
    n_items: int,
    protocol: ImplicitProtocol,
    rng: np.random.Generator,
    also_interacted: tuple[np.ndarray, np.ndarray] | None = None,
    user_features: np.ndarray | None = None,
    user_feature_cards: tuple[int, ...] = (),
    item_keys: np.ndarray | None = None,
    meta: dict | None = None,
) -> MarketData:
    """Apply the protocol to one market's positive interactions (rows in file order).

    ``also_interacted`` lists (user, item) pairs that were observed but are not positives (for
    example low ratings): they are never sampled as negatives.
    """
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    times = np.asarray(times, np.int64)
    conversion = np.asarray(conversion, bool)
    if len(users) == 0:
        raise DataError(f"market {name!r}: no positive interactions")
    keep = first_occurrences(users, items, times)
    u, i, t, c = users[keep], items[keep], times[keep], conversion[keep]
    tr, va, te = leave_last_out(u, t, min_user_interactions=protocol.min_user_interactions)
    if len(te) < protocol.min_test_users:
        raise DataError(
            f"market {name!r}: only {len(te)} users have >= {protocol.min_user_interactions} distinct "
            f"interactions, at least {protocol.min_test_users} needed for a test set"
        )
    ex_u, ex_i = u, i
    if also_interacted is not None:
        ex_u = np.concatenate([u, np.asarray(also_interacted[0], np.int64)])
        ex_i = np.concatenate([i, np.asarray(also_interacted[1], np.int64)])
    index = InteractionIndex(ex_u, ex_i, n_users=n_users, n_items=n_items)
    ctx = f"market {name!r}"
    k, r = protocol.negatives_per_positive, protocol.ranking_negatives
    splits = {}
    for split_name, idx in (("train", tr), ("valid", va), ("test", te)):
        neg = sample_negatives(u[idx], k, interacted=index, rng=rng, context=ctx)
        splits[split_name] = labelled_split(u[idx], i[idx], c[idx], neg)
    rank_neg = sample_negatives(u[te], r, interacted=index, rng=rng, context=ctx)
    ranking = RankingSet(users=u[te].copy(), items=np.concatenate([i[te, None], rank_neg], axis=1))
    vrank_neg = sample_negatives(u[va], r, interacted=index, rng=rng, context=ctx)
    valid_ranking = RankingSet(users=u[va].copy(), items=np.concatenate([i[va, None], vrank_neg], axis=1))
    info = dict(meta or {})
    info.update(
        interactions=int(len(u)),
        duplicates_dropped=int(len(users) - len(u)),
        positives={"train": int(len(tr)), "valid": int(len(va)), "test": int(len(te))},
        protocol=asdict(protocol),
        valid_ranking=valid_ranking,
    )
    return MarketData(
        name=name,
        n_users=int(n_users),
        n_items=int(n_items),
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        user_features=user_features,
        user_feature_cards=tuple(user_feature_cards),
        item_keys=item_keys,
        ranking=ranking,
        meta=info,
    )
