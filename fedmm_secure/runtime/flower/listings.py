"""The public catalogue a market worker uses, built by the market from listings it reads itself.

Secrets and policy are the markets': the shared-key list decides which rows of the key table a
market uploads with weight, and the secure sum of one such row over the markets that list it is
that row's weighted average. A list handed out by the aggregator could mark a product only one
market lists as shared; the sum of that row is then that market's own DP-trained row, in the
clear for the aggregator (and the secure sum's minimum cohort does not help: the other markets
add zeros). So the market builds the list itself from public listings (a market's catalogue is
public, its interactions are not) and refuses any list the aggregator offers that differs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...errors import ConfigError, PolicyError
from ...federation.catalogue import PublicCatalogue

__all__ = ["market_catalogue", "check_offered_keys", "read_listings"]


def read_listings(path: Path) -> dict[str, list[str]]:
    """``{market: [public key, ...]}`` from a JSON file (the markets' public catalogues)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("listings", f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ConfigError("listings", f"{path} is not a JSON object of market -> list of keys")
    return {str(m): [str(k) for k in keys] for m, keys in raw.items()}


def market_catalogue(order: Sequence[str], listings: Mapping[str, Sequence[str] | None]) -> PublicCatalogue | None:
    """The shared keys of the run's markets ``order`` from their public ``listings``.

    ``None`` (no key sharing, as in the embedded runtime) when fewer than two markets run or a
    market has no public keys. A market of the run missing from ``listings`` is an error: a
    catalogue built from fewer listings than the other markets use would give another table.
    """
    missing = [m for m in order if m not in listings]
    if missing:
        raise ConfigError("listings", f"no public listing for market(s) {', '.join(missing)}",
                          allowed="a listing for every market of the run")
    if len(order) < 2 or any(listings[m] is None for m in order):
        return None
    return PublicCatalogue.from_listings({m: listings[m] for m in order})


def check_offered_keys(offered: object, own: PublicCatalogue | None) -> None:
    """Refuse a shared-key list from the aggregator unless it is the market's own, key for key."""
    if offered is None:
        return
    if not isinstance(offered, list):
        raise PolicyError("the aggregator's shared-key list is not a list")
    mine = list(own.shared_keys) if own is not None else []
    theirs = [str(k) for k in offered]
    if theirs != mine:
        extra = sorted(set(theirs) - set(mine))
        detail = f"; keys not shared in this market's listings: {extra[:5]}" if extra else ""
        raise PolicyError(f"the aggregator's shared-key list ({len(theirs)} keys) differs from the one this "
                          f"market built from public listings ({len(mine)} keys){detail}")
