"""The dataset contract: what every registered loader must return.

A check takes ``load``, a zero-argument callable returning the markets of one small instance
(a registered dataset's ``sample``, or ``lambda: load_markets("name:PATH", seed=0)``).

The rules, and why:

* **local ID spaces**: each market numbers its users ``0..n_users-1`` (every one of them in some
  split) and its items within ``0..n_items-1``; an ID never refers to another market's space
  (the method must not be able to join markets on IDs), and ``item_keys``, kept only for
  evaluation, name each local item once;
* **labels**: clicks and conversions are float32 in {0, 1}, a conversion implies a click;
* **splits**: train, valid and test are non-empty, and no (user, item) positive of valid or
  test is a positive of train (leakage), unless the market declares
  ``meta["repeated_impressions"] = True`` (impression logs where a pair is shown again);
* **required fields**: int64 1-D id columns, feature matrices matching their cardinalities, a
  well-formed ranking set when present;
* **determinism**: loading twice gives the same markets (splits and negatives come from the
  seed, not from global randomness).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.market import MarketData, MarketSplit
from .base import require

__all__ = ["DATASET_CHECKS", "check_dataset"]

Load = Callable[[], list[MarketData]]


def _markets(load: Load) -> list[MarketData]:
    markets = load()
    require(isinstance(markets, list) and len(markets) > 0, "the loader must return a non-empty list")
    require(all(isinstance(m, MarketData) for m in markets), "every market must be a MarketData")
    names = [m.name for m in markets]
    require(len(set(names)) == len(names), f"market names must be unique, got {names}")
    return markets


def _splits(m: MarketData) -> dict[str, MarketSplit]:
    return {"train": m.train, "valid": m.valid, "test": m.test}


def check_required_fields(load: Load) -> None:
    for m in _markets(load):
        require(isinstance(m.name, str) and m.name != "", "market name must be a non-empty str")
        for f in ("n_users", "n_items"):
            v = getattr(m, f)
            require(isinstance(v, (int, np.integer)) and bool(v > 0), f"{m.name}: {f} must be a positive int, got {v!r}")
        for s, split in _splits(m).items():
            for col in ("users", "items", "click", "conversion"):
                a = getattr(split, col)
                require(isinstance(a, np.ndarray) and a.ndim == 1, f"{m.name}.{s}.{col} must be a 1-D array")
            require(split.users.dtype == np.int64 and split.items.dtype == np.int64,
                    f"{m.name}.{s}: users and items must be int64")
        for kind in ("user", "item"):
            feats, cards = getattr(m, f"{kind}_features"), getattr(m, f"{kind}_feature_cards")
            if feats is None:
                require(len(cards) == 0, f"{m.name}: {kind}_feature_cards given without features")
                continue
            n = m.n_users if kind == "user" else m.n_items
            require(feats.dtype == np.int64 and feats.ndim == 2 and feats.shape[0] == n,
                    f"{m.name}: {kind}_features must be int64 ({n}, k)")
            require(len(cards) == feats.shape[1], f"{m.name}: one cardinality per {kind} feature column")
            if feats.size:
                require(bool(np.all(feats >= 0)) and bool(np.all(feats < np.asarray(cards)[None, :])),
                        f"{m.name}: {kind} feature values must lie in [0, cardinality)")
        if m.ranking is not None:
            r = m.ranking
            require(r.items.ndim == 2 and r.items.shape[1] >= 2 and r.items.shape[0] == len(r.users),
                    f"{m.name}: ranking items must be (n, 1 + negatives) with one user per row")
            if len(r.users):
                require(0 <= r.users.min() and r.users.max() < m.n_users, f"{m.name}: ranking user out of range")
                require(0 <= r.items.min() and r.items.max() < m.n_items, f"{m.name}: ranking item out of range")


def check_local_id_spaces(load: Load) -> None:
    for m in _markets(load):
        users = np.unique(np.concatenate([s.users for s in _splits(m).values()]))
        require(len(users) == m.n_users and (len(users) == 0 or (users[0] == 0 and users[-1] == m.n_users - 1)),
                f"{m.name}: user ids must be the market's own 0..n_users-1, each used "
                f"(found {len(users)} distinct ids for n_users={m.n_users}); an id space shared "
                "with other markets would let the method join them")
        for s, split in _splits(m).items():
            if len(split):
                require(split.items.min() >= 0 and split.items.max() < m.n_items, f"{m.name}.{s}: item id out of range")
        if m.item_keys is not None:
            keys = np.asarray(m.item_keys)
            require(len(keys) == m.n_items, f"{m.name}: item_keys must have n_items entries")
            require(len(np.unique(keys)) == len(keys), f"{m.name}: item_keys must name each local item once")


def check_label_ranges(load: Load) -> None:
    for m in _markets(load):
        for s, split in _splits(m).items():
            for col in ("click", "conversion"):
                a = getattr(split, col)
                require(a.dtype == np.float32, f"{m.name}.{s}.{col} must be float32, got {a.dtype}")
                require(bool(np.all((a == 0) | (a == 1))), f"{m.name}.{s}.{col} must be 0 or 1")
            require(bool(np.all(split.conversion <= split.click)), f"{m.name}.{s}: a conversion without a click")


def check_splits_do_not_overlap(load: Load) -> None:
    for m in _markets(load):
        for s, split in _splits(m).items():
            require(len(split) > 0, f"{m.name}: the {s} split is empty")
        if m.meta.get("repeated_impressions"):
            continue

        def positives(split: MarketSplit) -> set[tuple[int, int]]:
            keep = split.click > 0
            return set(zip(split.users[keep].tolist(), split.items[keep].tolist()))

        train = positives(m.train)
        for s in ("valid", "test"):
            leaked = train & positives(getattr(m, s))
            require(not leaked, f"{m.name}: {len(leaked)} positive (user, item) pairs of {s} are also "
                    "train positives; set meta['repeated_impressions'] only for impression logs")


def check_deterministic(load: Load) -> None:
    a, b = _markets(load), _markets(load)
    require([m.name for m in a] == [m.name for m in b], "market names differ between two loads")
    for x, y in zip(a, b):
        for s in ("train", "valid", "test"):
            for col in ("users", "items", "click", "conversion"):
                require(np.array_equal(getattr(getattr(x, s), col), getattr(getattr(y, s), col)),
                        f"{x.name}.{s}.{col} differs between two loads with the same seed")
        if x.ranking is not None:
            require(y.ranking is not None and np.array_equal(x.ranking.items, y.ranking.items),
                    f"{x.name}: ranking negatives differ between two loads with the same seed")


DATASET_CHECKS: dict[str, Callable[[Load], None]] = {
    "required_fields": check_required_fields,
    "local_id_spaces": check_local_id_spaces,
    "label_ranges": check_label_ranges,
    "splits_do_not_overlap": check_splits_do_not_overlap,
    "deterministic": check_deterministic,
}


def check_dataset(load: Load) -> None:
    """Run every dataset check on ``load()``; raises :class:`ContractViolation` on the first
    broken rule (MarketData's own validation errors propagate as they are)."""
    for check in DATASET_CHECKS.values():
        check(load)


