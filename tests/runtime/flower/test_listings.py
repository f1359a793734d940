"""Public catalogue keys on the Flower runtime: the market builds the shared-key list itself.

Workers run in process through the real coordinator and worker code (as the other Flower
tests); the markets' data is the tiny Flower config with overlapping public item keys.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedmm_secure.data import loaders
from fedmm_secure.errors import AbortError, ConfigError, PolicyError
from fedmm_secure.federation.catalogue import PublicCatalogue
from fedmm_secure.federation.fedmm import run_method
from fedmm_secure.runtime.embedded import EmbeddedSecureSum
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.listings import (catalogue_record, check_offered_keys, market_catalogue,
                                                  read_listings, same_catalogue)
from fedmm_secure.runtime.flower.wire import pack_json, unpack_json
from fedmm_secure.runtime.flower.worker import MarketRules, MarketWorker

from .reference import CFG, OPTS, RULES

_real_load = loaders.load_data
N_SHARED = 30   # items 0..29 of every market are the same products p0..p29


def _keyed(cfg, **kw):
    """The run's synthetic markets with public item keys: p0..p29 listed by every market, the
    rest listed by one market only (e.g. ``m0-50``)."""
    # Real-data runs (a node config naming a data source) read the same markets here.
    markets = _real_load(dataclasses.replace(cfg, data="synthetic"), **kw)
    return [dataclasses.replace(m, item_keys=np.array([f"p{i}" if i < N_SHARED else f"{m.name}-{i}"
                                                       for i in range(m.n_items)]))
            for m in markets]


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setattr(loaders, "load_data", _keyed)


class _Recording(InProcessLinks):
    def __init__(self, workers, meddle=None):
        super().__init__(workers)
        self.kinds = {m: [] for m in workers}
        self.meddle = meddle or (lambda m, kind, payload: payload)

    def _call(self, m, kind, payload):
        out = super()._call(m, kind, self.meddle(m, kind, payload))
        self.kinds[m].append(out[0])
        return out


def _flower():
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    res = Coordinator(cfg=CFG, run_id=f"run-{CFG.seed}", links=InProcessLinks(workers), stage_timeout=1,
                      step_timeout=60, backend_options=OPTS).run()
    return res, workers


def test_flower_fedmm_uses_the_catalogue_like_the_embedded_run(keyed):
    markets = loaders.load_data(CFG)
    ss = EmbeddedSecureSum(backend=CFG.secagg, markets=[m.name for m in markets], run_id=f"run-{CFG.seed}",
                           allow_insecure=False, min_cohort=2, colluders=0)
    out = run_method("fedmm", markets, CFG.model, rounds=CFG.rounds, seed=CFG.seed, secure_sum=ss)
    ref = out["runs"]
    res, workers = _flower()
    runs = {m: w.result["run"] for m, w in workers.items()}
    for m, r in runs.items():
        # Key sharing is on, with the table the embedded run builds from the same listings.
        assert r.history["n_shared_rows"] == ref[m].history["n_shared_rows"] == N_SHARED
        # The shared-key table after the row-wise secure averages, as in the embedded run (equal
        # up to float32 rounding: the sums are taken in another order).
        np.testing.assert_allclose(r.ctr.embeddings["key"].weight.detach().numpy(),
                                   ref[m].ctr.embeddings["key"].weight.detach().numpy(), rtol=0, atol=1e-5)
        assert np.array_equal(r.codes[0], ref[m].codes[0])
        assert abs(res["markets"][m]["fedmm"]["auc"] - out["markets"][m]["auc"]) < 1e-6
    # Every market reports the list it built; the run's record is that one list.
    expected = catalogue_record(PublicCatalogue(tuple(sorted(f"p{i}" for i in range(N_SHARED)))))
    assert res["catalogue"] == {m: expected for m in runs}
    assert same_catalogue(res["catalogue"]) == expected and expected["shared_keys"] == N_SHARED


def _offer(keys):
    def meddle(m, kind, payload):
        if kind != "start":
            return payload
        return pack_json({**unpack_json(payload), "shared_keys": keys})
    return meddle


def test_flower_forged_shared_key_list_is_refused_before_any_upload(keyed):
    # The lying aggregator marks m0-50, which only m0 lists, as shared: the row-wise sum of that
    # row would be m0's own DP-trained row. Every market refuses the list at start, before any
    # secure-aggregation message (the only carrier of masked inputs) leaves it.
    forged = sorted([f"p{i}" for i in range(N_SHARED)] + ["m0-50"])
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    links = _Recording(workers, _offer(forged))
    with pytest.raises(AbortError):
        Coordinator(cfg=CFG, run_id="forged", links=links, stage_timeout=1, step_timeout=60,
                    backend_options=OPTS).run()
    for m, kinds in links.kinds.items():
        assert kinds == ["hello", "error"], m   # answered hello, refused start
        assert workers[m]._pipeline is None      # no training, no upload


def test_offered_list_equal_to_the_markets_own_is_accepted_and_others_refused():
    own = PublicCatalogue.from_listings({"a": ["x", "y"], "b": ["y", "z"], "c": ["x"]})
    check_offered_keys(None, own)
    check_offered_keys(["x", "y"], own)
    for bad in (["x", "y", "z"], ["y"], ["y", "x"], "x,y"):
        with pytest.raises(PolicyError):
            check_offered_keys(bad, own)
    with pytest.raises(PolicyError):   # no catalogue of its own: nothing is shared, whatever is offered
        check_offered_keys(["x"], None)


def test_market_catalogue_needs_every_markets_listing(tmp_path):
    assert market_catalogue(["a", "b"], {"a": ["x", "y"], "b": ["y"]}).shared_keys == ("y",)
    assert market_catalogue(["a", "b"], {"a": ["x"], "b": None}) is None
    assert market_catalogue(["a"], {"a": ["x"]}) is None
    with pytest.raises(ConfigError):
        market_catalogue(["a", "b"], {"a": ["x"]})
    path = tmp_path / "listings.json"
    path.write_text(json.dumps({"a": ["x", 1]}))
    assert read_listings(path) == {"a": ["x", "1"]}
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        read_listings(path)


def test_real_data_worker_takes_other_markets_listings_from_its_own_rules(keyed, tmp_path):
    # A worker on its own machine (node config names its data) loads only its market; the other
    # markets' public listings come from its rules, never from the aggregator.
    listings = {m.name: list(map(str, m.item_keys)) for m in loaders.load_data(CFG)}
    rules = dataclasses.replace(RULES, listings={k: v for k, v in listings.items() if k != "m1"})
    cfg = dataclasses.replace(CFG, markets=("m0", "m1", "m2"))
    w = MarketWorker(market="m1", rules=rules)
    w.handle("hello", pack_json({"config": cfg.to_dict(), "run_id": "r", "node": {"data": "unused"}}))
    assert w._catalogue.shared_keys == tuple(sorted(f"p{i}" for i in range(N_SHARED)))


def test_flower_local_hands_every_worker_the_public_listings_of_real_data(monkeypatch, tmp_path):
    from fedmm_secure.runtime.flower import local

    monkeypatch.setattr(local, "load_data", _keyed)
    cfg = dataclasses.replace(CFG, data="xmrec:/srv/xmrec")
    dep = local.FlowerLocalDeployment(cfg, out_dir=tmp_path)
    try:
        args = dep._market_rules()
        listings = read_listings(args[args.index("--listings") + 1])
        assert sorted(listings) == ["m0", "m1", "m2"]
        shared = market_catalogue(["m0", "m1", "m2"], listings).shared_keys
        assert shared == tuple(sorted(f"p{i}" for i in range(N_SHARED)))
    finally:
        dep.close()
    # Synthetic data: no file, each worker generates the listings from the seed.
    dep = local.FlowerLocalDeployment(CFG, out_dir=tmp_path / "s")
    try:
        assert "--listings" not in dep._market_rules()
    finally:
        dep.close()


def test_same_catalogue_refuses_markets_that_used_different_lists():
    a = catalogue_record(PublicCatalogue(("x", "y")))
    b = catalogue_record(PublicCatalogue(("x", "z")))   # same length, other products
    assert same_catalogue({"m0": a, "m1": a}) == a
    assert same_catalogue({}) == {}
    assert catalogue_record(None)["shared_keys"] == 0
    with pytest.raises(AbortError):
        same_catalogue({"m0": a, "m1": b})
