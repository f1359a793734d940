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

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...errors import AbortError, ConfigError, PolicyError
from ...federation.catalogue import PublicCatalogue

__all__ = ["market_catalogue", "check_offered_keys", "read_listings", "catalogue_record", "same_catalogue"]


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


def catalogue_record(cat: PublicCatalogue | None) -> dict:
    """What a market reports of the shared-key list it used: its size and SHA-256 (of the keys,
    one per line, in table order); 0 keys when it ran without key sharing."""
    keys = cat.shared_keys if cat is not None else ()
    return {"shared_keys": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}


def same_catalogue(records: Mapping[str, Mapping]) -> dict:
    """The one shared-key record every reporting market has; :class:`AbortError` if they differ.

    Markets whose listings disagree build different lists; lists of different lengths already
    fail the sums, but two lists of one length would average unrelated products row by row."""
    digests = {m: r.get("sha256") for m, r in records.items()}
    if len(set(digests.values())) > 1:
        detail = ", ".join(f"{m}: {d[:16]}" for m, d in sorted(digests.items()))
        raise AbortError(f"the markets used different shared-key lists ({detail}); do not use this run's results")
    return dict(next(iter(records.values()))) if records else {}
