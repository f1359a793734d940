"""Pre-run roster pinning on the Flower runtime: an aggregator that adds a market, swaps one
market's key or shows markets a split roster is refused by every honest market before anything
but its ``hello`` answer leaves it (no training, no secure-aggregation message).

Everything runs through the real :class:`Coordinator` and :class:`MarketWorker`; the attacks are
played by rewriting what the coordinator sends (the aggregator holds its own keys, so it can make
and sign any bundle it likes, but not with a market's identity key). Each attack is also played
against markets that do not pin (the defence disabled, as before identity keys persisted): there
it gets through, so every test here fails without the pin.
"""

from __future__ import annotations

import pytest

from fedmm_secure.errors import AbortError, ConfigError, ProtocolError
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.wire import b64, pack_json, unpack_json
from fedmm_secure.runtime.flower.worker import MarketRules, MarketWorker
from fedmm_secure.secagg import create_backend
from fedmm_secure.secagg.identity import IdentityRoster, endorse
from fedmm_secure.workflows.flower_local import tiny_flower_config

FAILED = (AbortError, ProtocolError)
LENGTH = 16


def _names(n):
    return [f"m{i}" for i in range(n)]


class Keys:
    """Every party's long-term identity key, made before the run, and the roster of them."""

    def __init__(self, markets):
        self.ids = {m: IdentityPrivateKey.generate() for m in markets}
        self.agg = IdentityPrivateKey.generate()
        self.roster = IdentityRoster({m: k.public_key() for m, k in self.ids.items()},
                                     aggregator=self.agg.public_key())


class Recording(InProcessLinks):
    """Records the kind of every reply and the text of every error; ``meddle`` rewrites what a
    market is sent (the malicious aggregator)."""

    def __init__(self, workers, meddle=None):
        super().__init__(workers)
        self.meddle = meddle or (lambda m, kind, msg: msg)
        self.kinds = {m: [] for m in workers}
        self.errors = {m: [] for m in workers}

    def _call(self, m, kind, payload):
        if kind in ("hello", "start"):
            payload = pack_json(self.meddle(m, kind, unpack_json(payload)))
        out = super()._call(m, kind, payload)
        self.kinds[m].append(out[0])
        if out[0] == "error":
            self.errors[m].append(out[1].decode(errors="replace"))
        return out


def _workers(keys, *, pin, names=None, digest_only=False):
    names = names or list(keys.ids)
    if not pin:
        rules = MarketRules(backends=frozenset({"masking", "ckks"}))
    elif digest_only:
        rules = MarketRules(backends=frozenset({"masking", "ckks"}), roster_digest=keys.roster.digest())
    else:
        rules = MarketRules(backends=frozenset({"masking", "ckks"}), roster=keys.roster)
    return {m: MarketWorker(market=m, rules=rules, identity=keys.ids[m]) for m in names}


def _run(keys, links, *, markets, secagg="masking", run_id="pin"):
    cfg = tiny_flower_config(markets=markets, rounds=1, secagg=secagg, seed=7)
    co = Coordinator(cfg=cfg, run_id=run_id, links=links, stage_timeout=1, step_timeout=60,
                     workload={"name": "secure-sum", "length": LENGTH, "rounds": 1},
                     identity=keys.agg, identity_roster=keys.roster)
    return co.run()


def _puppet(name, run_id="pin", backend="masking"):
    """A market the aggregator runs itself: a real per-run bundle, endorsed by a key it made."""
    bundle = create_backend(backend, allow_insecure=False).create_market(name).public_bundle()
    sig = endorse(IdentityPrivateKey.generate(), run_id=run_id, backend=backend, name=name, bundle=bundle)
    return b64(bundle), b64(sig)


def _nothing_left(links, workers):
    """No market trained or sent a secure-aggregation message: only hello answers and errors."""
    return all(set(links.kinds[m]) <= {"hello", "error"} for m in workers) and \
        all(w._pipeline is None for w in workers.values())


def _accepted(links, m):
    """``m`` took the roster ``start`` showed it: it installed it and its pipeline ran up to its
    first request (the honest coordinator here holds the honest roster, so the sum that follows
    fails; a malicious aggregator would run it over the roster it showed)."""
    return links.kinds[m][:2] == ["hello", "request"]


# -- positive control ----------------------------------------------------------------------------

@pytest.mark.parametrize("secagg", ["masking", "ckks"])
@pytest.mark.parametrize("digest_only", [False, True])
def test_pinned_roster_run_completes_with_the_exact_sum(secagg, digest_only):
    keys = Keys(_names(3))
    workers = _workers(keys, pin=True, digest_only=digest_only)
    res = _run(keys, Recording(workers), markets=3, secagg=secagg)
    assert not res["dropped"]
    assert all(v["max_abs_error"] < 1e-4 for v in res["markets"].values())
    assert all(w.result is not None for w in workers.values())


# -- the aggregator adds a fake market -----------------------------------------------------------

def _add_at_start(m, kind, msg):
    if kind == "start":
        bundle, sig = _puppet("m9")
        msg["roster"]["m9"], msg["n_markets"] = bundle, len(msg["roster"]) + 1
        msg.setdefault("endorsements", {})["m9"] = sig
    return msg


def _add_at_hello(m, kind, msg):
    # A roster with the puppet's identity key in it, for every market.
    if kind == "hello" and "identity_roster" in msg:
        shown = IdentityRoster.from_json(msg["identity_roster"])
        msg["identity_roster"] = IdentityRoster({**shown.markets, "m9": IdentityPrivateKey.generate().public_key()},
                                                aggregator=shown.aggregator).to_json()
    return msg


@pytest.mark.parametrize("meddle, where", [(_add_at_start, "start"), (_add_at_hello, "hello")])
def test_aggregator_adding_a_market_is_refused_before_anything_is_sent(meddle, where):
    keys = Keys(_names(3))
    workers = _workers(keys, pin=True)
    links = Recording(workers, meddle)
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert _nothing_left(links, workers)
    if where == "start":
        assert all(k == ["hello", "error"] for k in links.kinds.values())
        assert all("m9" in links.errors[m][-1] and "not on the pinned roster" in links.errors[m][-1]
                   for m in workers)
    else:   # refused before the market answered anything
        assert all(k == ["error"] for k in links.kinds.values())
        assert all("differs from the one this market pinned" in links.errors[m][-1] for m in workers)


def test_aggregator_adding_a_market_gets_through_without_the_pin():
    keys = Keys(_names(3))
    workers = _workers(keys, pin=False)
    links = Recording(workers, _add_at_start)
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert all(_accepted(links, m) for m in workers)
    assert all(w._endpoint._keys.keys() == {"m0", "m1", "m2", "m9"} for w in workers.values())


# -- the aggregator swaps one market's key -------------------------------------------------------

def _puppet_at_start(victim_of):
    # At start, market m is shown the aggregator's puppet key under the name victim_of(m).
    def meddle(m, kind, msg):
        if kind == "start":
            victim = victim_of(m)
            bundle, sig = _puppet(victim)
            msg["roster"][victim] = bundle
            msg.setdefault("endorsements", {})[victim] = sig
        return msg
    return meddle


def _swap(victim):
    return _puppet_at_start(lambda m: victim)


def test_aggregator_swapping_a_key_is_refused_by_every_market():
    keys = Keys(_names(4))
    workers = _workers(keys, pin=True)
    links = Recording(workers, _swap("m3"))
    with pytest.raises(FAILED):
        _run(keys, links, markets=4)
    assert _nothing_left(links, workers)
    assert all("m3's key on the roster is not signed by m3's pinned identity key" in links.errors[m][-1]
               for m in workers)


def test_aggregator_swapping_a_key_in_the_roster_it_shows_at_hello_is_refused():
    # A digest-only pin: the market learns the keys from the aggregator's roster, which must hash
    # to the pin; one key swapped changes the hash.
    keys = Keys(_names(4))
    workers = _workers(keys, pin=True, digest_only=True)

    def meddle(m, kind, msg):
        if kind == "hello":
            shown = IdentityRoster.from_json(msg["identity_roster"])
            msg["identity_roster"] = IdentityRoster(
                {**shown.markets, "m3": IdentityPrivateKey.generate().public_key()},
                aggregator=shown.aggregator).to_json()
        return msg

    links = Recording(workers, meddle)
    with pytest.raises(FAILED):
        _run(keys, links, markets=4)
    assert all(k == ["error"] for k in links.kinds.values())
    assert _nothing_left(links, workers)


def test_aggregator_swapping_its_own_key_is_refused():
    keys = Keys(_names(3))
    workers = _workers(keys, pin=True)

    def meddle(m, kind, msg):
        if kind == "start":
            impostor = IdentityPrivateKey.generate()
            msg["aggregator_endorsement"] = b64(impostor.sign(b"anything"))
        return msg

    links = Recording(workers, meddle)
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert _nothing_left(links, workers)
    assert all("aggregator's key on the roster is not signed" in links.errors[m][-1] for m in workers)


def test_aggregator_swapping_a_key_gets_through_without_the_pin():
    keys = Keys(_names(4))
    workers = _workers(keys, pin=False)
    links = Recording(workers, _swap("m3"))
    with pytest.raises(FAILED):
        _run(keys, links, markets=4)   # m3 itself sees a foreign key under its name and refuses
    assert all(_accepted(links, m) for m in ("m0", "m1", "m2"))


# -- the aggregator shows the markets a split roster ---------------------------------------------

def _split(names):
    # Each market sees a roster in which the next market's key is the aggregator's: a view per
    # market, each one internally consistent, none the same.
    return _puppet_at_start(lambda m: names[(names.index(m) + 1) % len(names)])


def test_split_roster_is_refused_by_every_market():
    names = _names(4)
    keys = Keys(names)
    workers = _workers(keys, pin=True)
    links = Recording(workers, _split(names))
    with pytest.raises(FAILED):
        _run(keys, links, markets=4)
    assert _nothing_left(links, workers)
    assert all("is not signed by" in links.errors[m][-1] for m in workers)


def test_split_roster_at_hello_leaves_every_market_refusing():
    # m0 alone is shown a roster with a puppet in it and refuses at hello; the others are shown
    # the pinned roster, but the run's roster then omits m0, which they refuse at start.
    names = _names(3)
    keys = Keys(names)
    workers = _workers(keys, pin=True)
    links = Recording(workers, lambda m, kind, msg: _add_at_hello(m, kind, msg) if m == "m0" else msg)
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert links.kinds["m0"] == ["error"]
    assert all("omits pinned markets: m0" in links.errors[m][-1] for m in ("m1", "m2"))
    assert _nothing_left(links, workers)


def test_split_roster_gets_through_without_the_pin():
    names = _names(4)
    keys = Keys(names)
    workers = _workers(keys, pin=False)
    links = Recording(workers, _split(names))
    with pytest.raises(FAILED):
        _run(keys, links, markets=4)
    assert all(_accepted(links, m) for m in names)   # each took its own view


# -- the market's own setup ----------------------------------------------------------------------

def test_an_endorsement_from_another_run_is_refused():
    # The aggregator replays m1's hello answer (bundle and endorsement) of an earlier run.
    keys = Keys(_names(3))
    old = {}

    def meddle(m, kind, msg):
        if kind == "start":
            old.setdefault("bundle", create_backend("masking", allow_insecure=False).create_market("m1").public_bundle())
            msg["roster"]["m1"] = b64(old["bundle"])
            msg["endorsements"]["m1"] = b64(endorse(keys.ids["m1"], run_id="earlier", backend="masking",
                                                    name="m1", bundle=old["bundle"]))
        return msg

    workers = _workers(keys, pin=True)
    links = Recording(workers, meddle)
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert _nothing_left(links, workers)


def test_a_pinning_market_needs_its_identity_key_and_a_roster_holding_it():
    keys = Keys(_names(3))
    with pytest.raises(ConfigError, match="identity key"):
        MarketWorker(market="m0", rules=MarketRules(roster=keys.roster))
    # m0's worker started with m1's key: the pinned roster does not hold it under m0.
    w = MarketWorker(market="m0", rules=MarketRules(roster=keys.roster), identity=keys.ids["m1"])
    links = Recording({"m0": w})
    with pytest.raises(FAILED):
        _run(keys, links, markets=3)
    assert "does not hold this market's identity key" in links.errors["m0"][-1]
    with pytest.raises(ConfigError, match="does not hash"):
        MarketRules(roster=keys.roster, roster_digest=bytes(32))


def test_coordinator_identity_must_match_the_roster():
    keys = Keys(_names(3))
    cfg = tiny_flower_config(markets=3, rounds=1, secagg="masking", seed=7)
    with pytest.raises(ConfigError, match="another aggregator"):
        Coordinator(cfg=cfg, run_id="x", links=Recording({}), stage_timeout=1, step_timeout=1,
                    identity=IdentityPrivateKey.generate(), identity_roster=keys.roster)
    with pytest.raises(ConfigError, match="go together"):
        Coordinator(cfg=cfg, run_id="x", links=Recording({}), stage_timeout=1, step_timeout=1,
                    identity=keys.agg)


def test_honest_aggregator_names_a_market_whose_bundle_is_not_endorsed():
    # A market (or whoever sits between it and the aggregator) answers hello with a bundle its
    # identity key did not sign: the pinning markets would refuse start; the aggregator stops
    # first and says which market.
    keys = Keys(_names(3))
    workers = _workers(keys, pin=True)

    class Tampered(Recording):
        def hello(self, payload, *, timeout):
            out = super().hello(payload, timeout=timeout)
            kind, body = out["m1"]
            msg = unpack_json(body)
            msg["bundle"] = _puppet("m1")[0]
            out["m1"] = (kind, pack_json(msg))
            return out

    links = Tampered(workers)
    with pytest.raises(AbortError, match="market m1's bundle is not endorsed"):
        _run(keys, links, markets=3)
    assert all(k == ["hello"] for k in links.kinds.values())
