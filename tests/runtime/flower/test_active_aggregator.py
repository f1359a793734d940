"""An active aggregator on the Flower runtime, through the real coordinator and worker code.

The workers run with their own rules (default minimum cohort, c = 1); the aggregator side is the
project's Coordinator, made malicious only where the attack needs it. Every refusal must happen
before any secure-aggregation reply (the only thing that carries shares or masked inputs) leaves
the market.
"""

from __future__ import annotations

import dataclasses

import pytest

from fedmm_secure.config import config_from_dict
from fedmm_secure.errors import AbortError
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.wire import pack_json, unpack_json
from fedmm_secure.runtime.flower.worker import (MarketRules, MarketWorker, own_privacy,
                                               run_with_own_privacy)
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import NONCE

from .reference import CFG

DEFAULT = MarketRules(backends=frozenset({"masking"}))


class _Recording(InProcessLinks):
    """Records every reply kind per market; optional meddling with what goes out."""

    def __init__(self, workers, meddle=None):
        super().__init__(workers)
        self.kinds = {m: [] for m in workers}
        self.stages: dict[str, list[int]] = {}
        self.meddle = meddle or (lambda m, kind, payload: payload)

    def _call(self, m, kind, payload):
        out = super()._call(m, kind, self.meddle(m, kind, payload))
        self.kinds[m].append(out[0])
        if out[0] == "secagg":
            self.stages.setdefault(m, []).append(decode_envelope(out[1]).stage)
        return out


def _run(links, cfg=CFG):
    return Coordinator(cfg=cfg, run_id="active", links=links, stage_timeout=1, step_timeout=60).run()


def test_a_flower_sums_stop_when_the_cohort_falls_below_the_minimum():
    # Three markets (minimum cohort 3): two go silent after the start; the coordinator carries
    # on with the last one, which refuses its first sum instead of sending anything secret.
    workers = {m: MarketWorker(market=m, rules=DEFAULT) for m in ("m0", "m1", "m2")}
    links = _Recording(workers)
    original = links.exchange

    def exchange(messages, *, timeout):
        if any(kind == "secagg" for kind, _ in messages.values()):
            links.silent |= {"m1", "m2"}
        return original(messages, timeout=timeout)

    links.exchange = exchange
    with pytest.raises(AbortError):
        _run(links)
    # Only a nonce left m0 (the first sum began with three markets); then it refused.
    assert links.stages["m0"] == [NONCE]


def test_c_flower_hello_cannot_switch_backend_or_privacy_settings():
    for change in ({"secagg": "plain"}, {"privacy": {**CFG.to_dict()["privacy"], "enabled": True,
                                                     "noise_multiplier": 0.1}}):
        raw = dict(CFG.to_dict(), **change)
        cfg = config_from_dict(raw)
        workers = {m: MarketWorker(market=m, rules=DEFAULT) for m in ("m0", "m1", "m2")}
        links = _Recording(workers)
        with pytest.raises(AbortError):
            _run(links, cfg)
        assert all(k == ["error"] for k in links.kinds.values())   # refused at hello
        assert all(w._endpoint is None for w in workers.values())


# (b) a market added to the roster, a key swapped, a split roster: tests/runtime/flower/test_roster_pinning.py


# -- (c) privacy settings: the market trains with its own, whatever the aggregator says ---------

OWN_PRIVATE = {"enabled": True, "epsilon": 4.0}   # partial: every other field is the default


def _private_cfg(**privacy):
    raw = CFG.to_dict()
    raw["privacy"] = {**raw["privacy"], "enabled": True, "epsilon": 4.0, "noise_multiplier": None,
                      **privacy}
    return config_from_dict(raw)


class _Errors(_Recording):
    """Also keeps the text of every error a market answers with."""

    def __init__(self, workers, meddle=None):
        super().__init__(workers, meddle)
        self.errors: dict[str, list[str]] = {m: [] for m in workers}

    def _call(self, m, kind, payload):
        out = super()._call(m, kind, payload)
        if out[0] == "error":
            self.errors[m].append(out[1].decode(errors="replace"))
        return out


def test_c_flower_reproducible_randomness_from_the_aggregator_is_refused(tmp_path):
    # The aggregator's run config asks for seeded ("reproducible") DP noise, which anyone who
    # knows the seed can subtract; the markets' own settings do not name a source (so: secure).
    workers = {m: MarketWorker(market=m, rules=dataclasses.replace(DEFAULT, privacy=OWN_PRIVATE),
                               ledger_dir=tmp_path / m) for m in ("m0", "m1", "m2")}
    links = _Errors(workers)
    with pytest.raises(AbortError):
        _run(links, _private_cfg(randomness="reproducible"))
    for m, w in workers.items():
        assert links.kinds[m] == ["error"]                      # refused at hello
        assert "PolicyError" in links.errors[m][0] and "randomness" in links.errors[m][0]
        assert w._endpoint is None and w._session is None
        assert not (tmp_path / m).exists()                      # no ledger, nothing trained
    # Only a market whose own settings say so runs reproducible noise.
    own = MarketRules(privacy={**OWN_PRIVATE, "randomness": "reproducible"})
    assert run_with_own_privacy(_private_cfg(randomness="reproducible"), own).privacy.randomness \
        == "reproducible"


def test_c_flower_market_trains_with_its_own_privacy_object(tmp_path):
    # Same settings on both sides, but the aggregator names another model family, whose default
    # clip norm (2.0) would apply to a market that leaves the clip norm unset. The workers must
    # build their DP session from their own settings: secure randomness, FedMM's clip norm, and
    # market-level noise shares sized by the pinned roster (3 markets).
    workers = {m: MarketWorker(market=m, rules=dataclasses.replace(DEFAULT, privacy=OWN_PRIVATE),
                               ledger_dir=tmp_path / m) for m in ("m0", "m1", "m2")}
    cfg = dataclasses.replace(_private_cfg(), model_family="pf-msmtrec")
    assert cfg.max_grad_norm() == 2.0

    def meddle(m, kind, payload):
        if kind == "secagg":   # stop once every market has built its session and asked to sum
            links.silent |= set(workers)
        return payload

    links = _Errors(workers, meddle)
    with pytest.raises(AbortError):
        _run(links, cfg)
    for m, w in workers.items():
        assert links.kinds[m][:2] == ["hello", "request"], links.errors[m]
        assert w._cfg.privacy == own_privacy(w.rules)
        assert w._session.randomness == "secure"
        assert w._session.max_grad_norm == 1.0
        assert w._session._honest == 2                          # 3 - 3 // 3 of the roster


def test_c_flower_start_cannot_inflate_the_federation_size():
    # Market-level noise shares shrink with the number of markets expected to add one; the
    # aggregator's "start" claims 1000 markets for a roster of three.
    workers = {m: MarketWorker(market=m, rules=DEFAULT) for m in ("m0", "m1", "m2")}

    def meddle(m, kind, payload):
        if kind != "start":
            return payload
        return pack_json(dict(unpack_json(payload), n_markets=1000))

    links = _Errors(workers, meddle)
    with pytest.raises(AbortError):
        _run(links)
    for m in workers:
        assert links.kinds[m] == ["hello", "error"]
        assert "PolicyError" in links.errors[m][0] and "1000" in links.errors[m][0]
