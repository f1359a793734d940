"""Public catalogue keys: what anchors the markets' disjoint ID spaces at no epsilon cost.

A market's *interactions* are private; its *catalogue* (which products it lists, under which
public key, e.g. an ASIN) is not: it is on the market's storefront. Products listed by at least
two markets get one row each in a **shared-key table** that every market holds with the same
row order; a market's item is mapped to its product's row, or to the last row ("listed only
here") for products no other market lists. The shared-key table is trained by each market's
DP-SGD like any other parameter and averaged row by row through the secure sum: the average of
DP-trained parameters is post-processing, so it costs no epsilon, and the same product ends up
at the same place in every market.

Row-wise averaging needs per-row weights: a market that does not list a product has trained
that row on nothing but DP noise, so it contributes weight 0 to it. The upload is
``[w * listed_r * theta_r for every row r, w * listed_r for every row r]`` with the market's
public weight ``w``; the sum gives every row's weighted average without revealing which market
contributed what beyond the (public) catalogue membership.

The public weight ``w`` is the market's training-set size by default. A product's interactions
are not spread over markets by size, though: on XMRec a small market's interactions with shared
products are mostly with products it holds a large share of (``in``: 3% of the listing markets'
rows, 41% of the product's interactions), so size weights replace what a small market learned
about its own popular products by the large markets' noise. ``model.key_weights: counts``
weights each row by the market's number of training interactions with that product instead
(the pooled gradient's weighting), released once per run with Gaussian noise
(:func:`key_counts`: one privacy unit moves the count vector by at most 1 in L2), accounted on
the market's ledger like the validation releases; the upload carries per-row weights
:func:`count_weights` in (0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PublicCatalogue", "keyed_upload", "apply_keyed_sum", "key_counts", "count_weights", "COUNT_CAP"]

# Public cap of a count weight: counts are clipped to [1, COUNT_CAP] and divided by it, so every
# uploaded weight is in (0, 1] (the bound the secure sum announces) and a listed row's own weight
# stays above apply_keyed_sum's guard; counts above the cap (rare: XMRec's median product has
# 11-69 interactions in a market) weigh as the cap.
COUNT_CAP = 512.0


@dataclass(frozen=True)
class PublicCatalogue:
    """The public keys listed by at least ``min_markets`` markets, in one agreed order."""

    shared_keys: tuple[str, ...]

    @classmethod
    def from_listings(cls, listings: Mapping[str, Sequence[str]], *, min_markets: int = 2) -> PublicCatalogue:
        """``listings``: market -> the public keys of the products it lists (its catalogue)."""
        counts: dict[str, int] = {}
        for keys in listings.values():
            for k in set(map(str, keys)):
                counts[k] = counts.get(k, 0) + 1
        return cls(tuple(sorted(k for k, c in counts.items() if c >= min_markets)))

    @property
    def n_rows(self) -> int:
        """Rows of the shared-key table: one per shared key plus the "listed only here" row."""
        return len(self.shared_keys) + 1

    @property
    def private_row(self) -> int:
        return len(self.shared_keys)

    def key_column(self, item_keys: Sequence[str]) -> np.ndarray:
        """Row of every local item (int64): its shared key's row, or :attr:`private_row`."""
        index = {k: i for i, k in enumerate(self.shared_keys)}
        return np.array([index.get(str(k), self.private_row) for k in item_keys], dtype=np.int64)

    def listed_rows(self, item_keys: Sequence[str]) -> np.ndarray:
        """0/1 per table row: does this market list the row's product (the private row counts
        as listed when the market has at least one product no other market lists)."""
        listed = np.zeros(self.n_rows, dtype=np.float64)
        listed[np.unique(self.key_column(item_keys))] = 1.0
        return listed


def key_counts(rows: np.ndarray, positive: np.ndarray, unit: np.ndarray, n_units: int, n_rows: int) -> np.ndarray:
    """Training interactions per table row, counted by privacy unit (before noise).

    ``rows``: the table row of every training row's item; ``positive``: its label (negatives
    are sampled, not chosen by anyone, and are not counted); ``unit``: its privacy unit (0..n_units-1).
    Each unit's positive rows share a total of 1 (one each when a unit has one positive row, as
    a record or an interaction has), so adding or removing a unit moves the vector by at most 1
    in L1 and hence in L2: sensitivity 1.
    """
    pos = np.asarray(positive) > 0
    r, u = np.asarray(rows, np.int64)[pos], np.asarray(unit, np.int64)[pos]
    per_unit = np.bincount(u, minlength=n_units).astype(np.float64)
    return np.bincount(r, weights=1.0 / per_unit[u], minlength=n_rows)[:n_rows]


def count_weights(counts: np.ndarray) -> np.ndarray:
    """Upload weights in (0, 1] from (noisy) counts: clipped to [1, COUNT_CAP], over COUNT_CAP."""
    return np.clip(np.asarray(counts, np.float64), 1.0, COUNT_CAP) / COUNT_CAP


def keyed_upload(table: np.ndarray, listed: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """One market's upload for the row-wise weighted average of a shared-key table.

    ``table``: (rows, dim) DP-trained parameters; ``listed``: (rows,) 0/1; ``weight`` in (0, 1],
    one for the whole table or one per row.
    """
    if table.shape[0] != listed.shape[0]:
        raise ValueError(f"table has {table.shape[0]} rows, listing has {listed.shape[0]}")
    w = np.asarray(weight, np.float64) * listed
    if w.shape != listed.shape:
        raise ValueError(f"weights have shape {np.shape(weight)}, expected one or {listed.shape}")
    if not np.all((w >= 0) & (w <= 1)):
        raise ValueError("weights must be in [0, 1]")
    return np.concatenate([(w[:, None] * table).ravel(), w])


def apply_keyed_sum(table: np.ndarray, listed: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The market's table after the secure sum of every market's :func:`keyed_upload`.

    Rows this market lists take the weighted average; rows it does not list keep its own
    values (they are never read by its model: none of its items maps to them).
    """
    rows, dim = table.shape
    if total.shape != (rows * (dim + 1),):
        raise ValueError(f"sum has shape {total.shape}, expected {(rows * (dim + 1),)}")
    sums, weights = total[:rows * dim].reshape(rows, dim), total[rows * dim:]
    out = table.copy()
    # A listed row always has the market's own positive weight in the sum; the guard only
    # matters when market-level noise makes a summed weight tiny.
    use = (listed > 0) & (weights > 1e-3)
    out[use] = sums[use] / weights[use, None]
    return out
