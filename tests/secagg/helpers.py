"""Builds a federation the way a deployment does: keys first, then a roster with the
aggregator's key, then each market's own policy pinning that roster."""

from __future__ import annotations

import hashlib
import itertools

from fedmm_secure.secagg import MarketPolicy, Roster


def det_entropy(seed: bytes):
    """Reproducible entropy for tests only (SHAKE-256 in counter mode)."""
    counter = itertools.count()
    return lambda n: hashlib.shake_256(seed + next(counter).to_bytes(8, "big")).digest(n)


def federation(backend, ids, *, min_cohort=None, colluders=1, privacy=None):
    """(aggregator endpoint, market endpoints, roster, policy) with every roster installed."""
    markets = {m: backend.create_market(m) for m in ids}
    agg = backend.create_aggregator()
    roster = Roster({m: markets[m].public_bundle() for m in ids}, aggregator=agg.public_bundle())
    if min_cohort is None:
        min_cohort = min(max(3, -(-2 * len(ids) // 3)), len(ids))
    policy = MarketPolicy.pin(roster, backends={backend.name}, privacy=privacy or {},
                              min_cohort=min_cohort, colluders=colluders)
    agg.install_roster(roster)
    for m in ids:
        markets[m].install_roster(roster, policy=policy)
    return agg, markets, roster, policy
