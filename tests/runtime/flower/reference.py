"""Shared by the Flower runtime tests: a tiny config and the embedded reference run."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedmm_secure.data.loaders import load_data
from fedmm_secure.federation.fedmm import run_method
from fedmm_secure.federation.transport import SumResult
from fedmm_secure.runtime.embedded import EmbeddedSecureSum
from fedmm_secure.runtime.flower.worker import MarketRules
from fedmm_secure.workflows.flower_local import tiny_flower_config

CFG = tiny_flower_config(markets=3, rounds=2, secagg="masking", seed=3)
# These three markets' own rules accept a cohort of two and assume no colluder, so that the
# dropout scenario below can run (tests/runtime/flower/test_active_aggregator.py uses defaults).
RULES = MarketRules(backends=frozenset({"masking", "ckks"}), min_cohort=2, colluders=0)
OPTS = {"colluders": 0}   # the aggregator's threshold for c = 0


def private_rules(cfg):
    return dataclasses.replace(RULES, privacy=dataclasses.asdict(cfg.privacy))
DROP = ("m2", "codebook-l1", 0, 2)   # market, sum label, round, stage at which it goes silent


class _DropForGood:
    """Embedded secure sum where ``market`` goes silent at ``stage`` of one sum and is absent
    from every later sum: what a killed SuperNode does to the distributed run."""

    def __init__(self, inner: EmbeddedSecureSum, market: str, label: str, round_id: int, stage: int) -> None:
        self.inner, self.market, self.key = inner, market, (label, round_id)
        self.backend_name, self.secure = inner.backend_name, inner.secure
        inner.drop_plan[self.key] = {market: stage}
        self.gone = False

    def secure_sum(self, *, label, round_id, vectors, max_abs) -> SumResult:
        if self.gone:
            vectors = {m: v for m, v in vectors.items() if m != self.market}
        out = self.inner.secure_sum(label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)
        if (label, round_id) == self.key:
            self.gone = True
        return out


def embedded_codebooks(cfg=CFG, drop=DROP) -> dict[str, np.ndarray]:
    markets = load_data(cfg)
    ss = EmbeddedSecureSum(backend=cfg.secagg, markets=[m.name for m in markets], run_id=f"run-{cfg.seed}",
                           allow_insecure=False, min_cohort=2, colluders=0)
    secure_sum = _DropForGood(ss, *drop) if drop else ss
    out = run_method("fedmm", markets, cfg.model, rounds=cfg.rounds, seed=cfg.seed, secure_sum=secure_sum)
    return {m: r.vq.global_codebook.numpy().copy() for m, r in out["runs"].items()}, out
