"""The identity roster (what markets pin before a run) and endorsements of per-run bundles."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError, PolicyError
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.secagg import Roster
from fedmm_secure.secagg.identity import AGGREGATOR_ROLE, IdentityRoster, check_session_roster, endorse

NAMES = st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), min_size=1, max_size=5, unique=True)


def _seeded(i: int) -> IdentityPrivateKey:
    return IdentityPrivateKey.generate(entropy=lambda n: bytes([i % 256, i // 256]) * (n // 2))


def _roster(names, offset=0):
    return IdentityRoster({m: _seeded(offset + i + 1).public_key() for i, m in enumerate(names)},
                          aggregator=_seeded(offset).public_key())


@settings(max_examples=40, deadline=None)
@given(NAMES, st.data())
def test_digest_survives_json_and_order_but_not_any_change(names, data):
    r = _roster(names)
    assert IdentityRoster.from_json(r.to_json()).digest() == r.digest()
    reordered = IdentityRoster(dict(reversed(list(r.markets.items()))), aggregator=r.aggregator)
    assert reordered.digest() == r.digest()
    victim = data.draw(st.sampled_from(names))
    swapped = IdentityRoster({**r.markets, victim: _seeded(9999).public_key()}, aggregator=r.aggregator)
    assert swapped.digest() != r.digest()
    added = IdentityRoster({**r.markets, "zz-extra": _seeded(9998).public_key()}, aggregator=r.aggregator)
    assert added.digest() != r.digest()
    if len(names) > 1:
        dropped = IdentityRoster({m: k for m, k in r.markets.items() if m != victim}, aggregator=r.aggregator)
        assert dropped.digest() != r.digest()
    other_agg = IdentityRoster(r.markets, aggregator=_seeded(9997).public_key())
    assert other_agg.digest() != r.digest()
    renamed = IdentityRoster({(m + "x" if m == victim else m): k for m, k in r.markets.items()},
                             aggregator=r.aggregator)
    assert renamed.digest() != r.digest()


def test_roster_needs_an_aggregator_and_distinct_keys():
    k = _seeded(1).public_key()
    with pytest.raises(ConfigError, match="aggregator"):
        IdentityRoster({"US": k})
    with pytest.raises(ConfigError, match="share one identity key"):
        IdentityRoster({"US": k}, aggregator=k)
    with pytest.raises(ConfigError, match="lists no market"):
        IdentityRoster({}, aggregator=k)
    with pytest.raises(ConfigError, match="invalid identifier"):
        IdentityRoster({"a b": _seeded(2).public_key()}, aggregator=k)


def _session(names, run_id="r1", backend="masking"):
    ids = {m: _seeded(i + 1) for i, m in enumerate(names)}
    agg = _seeded(0)
    bundles = {m: IdentityPrivateKey.generate().public_key().to_bytes() for m in names}
    agg_bundle = IdentityPrivateKey.generate().public_key().to_bytes()
    ends = {m: endorse(ids[m], run_id=run_id, backend=backend, name=m, bundle=bundles[m]) for m in names}
    agg_end = endorse(agg, run_id=run_id, backend=backend, name=AGGREGATOR_ROLE, bundle=agg_bundle,
                      role=AGGREGATOR_ROLE)
    return _roster(names), Roster(bundles, aggregator=agg_bundle), ends, agg_end


def test_endorsed_session_roster_is_accepted():
    pinned, roster, ends, agg_end = _session(["US", "DE", "FR"])
    check_session_roster(pinned, roster, ends, aggregator_endorsement=agg_end, run_id="r1", backend="masking")


@pytest.mark.parametrize("run_id, backend", [("r2", "masking"), ("r1", "ckks")])
def test_endorsement_is_bound_to_its_run_and_backend(run_id, backend):
    pinned, roster, ends, agg_end = _session(["US", "DE", "FR"])
    with pytest.raises(PolicyError, match="not signed"):
        check_session_roster(pinned, roster, ends, aggregator_endorsement=agg_end, run_id=run_id, backend=backend)


def test_endorsement_is_bound_to_its_owner_and_role():
    pinned, roster, ends, agg_end = _session(["US", "DE", "FR"])
    # DE's endorsement presented for US; a market's endorsement presented for the aggregator.
    with pytest.raises(PolicyError, match="US's key"):
        check_session_roster(pinned, roster, {**ends, "US": ends["DE"]}, aggregator_endorsement=agg_end,
                             run_id="r1", backend="masking")
    with pytest.raises(PolicyError, match="aggregator's key"):
        check_session_roster(pinned, roster, ends, aggregator_endorsement=ends["US"], run_id="r1",
                             backend="masking")
    with pytest.raises(PolicyError, match="FR's key"):
        check_session_roster(pinned, roster, {m: s for m, s in ends.items() if m != "FR"},
                             aggregator_endorsement=agg_end, run_id="r1", backend="masking")


def test_added_or_omitted_markets_are_named():
    pinned, roster, ends, agg_end = _session(["US", "DE", "FR"])
    extra = Roster({**roster.entries, "XX": b"k"}, aggregator=roster.aggregator)
    with pytest.raises(PolicyError, match="not on the pinned roster: XX"):
        check_session_roster(pinned, extra, ends, aggregator_endorsement=agg_end, run_id="r1", backend="masking")
    fewer = Roster({m: b for m, b in roster.entries.items() if m != "DE"}, aggregator=roster.aggregator)
    with pytest.raises(PolicyError, match="omits pinned markets: DE"):
        check_session_roster(pinned, fewer, ends, aggregator_endorsement=agg_end, run_id="r1", backend="masking")
