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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PublicCatalogue", "keyed_upload", "apply_keyed_sum"]


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


def keyed_upload(table: np.ndarray, listed: np.ndarray, weight: float) -> np.ndarray:
    """One market's upload for the row-wise weighted average of a shared-key table.

    ``table``: (rows, dim) DP-trained parameters; ``listed``: (rows,) 0/1; ``weight`` in (0, 1].
    """
    if table.shape[0] != listed.shape[0]:
        raise ValueError(f"table has {table.shape[0]} rows, listing has {listed.shape[0]}")
    w = weight * listed
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
