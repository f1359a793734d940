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
from fedmm_secure.runtime.flower_coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower_wire import pack_json, unpack_json
from fedmm_secure.runtime.flower_worker import MarketRules, MarketWorker
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import NONCE

from .flower_reference import CFG

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


def test_b_flower_roster_with_an_extra_market_is_refused_by_a_pinning_market():
    # The deployment pins the roster digest; an aggregator that adds a market to the roster it
    # hands out in "start" is refused before the market's pipeline runs.
    workers = {m: MarketWorker(market=m, rules=DEFAULT) for m in ("m0", "m1", "m2")}
    pinned = {}

    def meddle(m, kind, payload):
        if kind != "start":
            return payload
        msg = unpack_json(payload)
        if not pinned:
            from fedmm_secure.runtime.flower_wire import unb64
            from fedmm_secure.secagg import Roster
            honest = Roster({k: unb64(v) for k, v in msg["roster"].items()},
                            aggregator=unb64(msg["aggregator"]))
            pinned["digest"] = honest.digest()
            for w in workers.values():
                w.rules = dataclasses.replace(w.rules, roster_digest=pinned["digest"])
        msg["roster"] = dict(msg["roster"], m9=msg["roster"]["m0"])
        return pack_json(msg)

    links = _Recording(workers, meddle)
    with pytest.raises(AbortError):
        _run(links)
    assert all(k == ["hello", "error"] for k in links.kinds.values())
