"""Public catalogue keys on Flower with real XMRec data; skipped when ../shared/data is absent.

Each market worker loads only its own market (node config ``data``) and takes the other markets'
public listings (ASINs) from its own rules, as ``flower local --listings`` hands them out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.config import config_from_dict
from fedmm_secure.data.loaders import load_data
from fedmm_secure.federation.fedmm import run_method
from fedmm_secure.runtime.embedded import EmbeddedSecureSum
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.wire import pack_json, unpack_json
from fedmm_secure.runtime.flower.worker import MarketWorker

from .reference import CFG, OPTS, RULES

ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "xmrec-electronics"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is absent (evaluation data, never committed)"),
]
MARKETS = ("jp", "in", "mx")   # the smallest markets of the sample


class _NodeData(InProcessLinks):
    """Each SuperNode's node config names its market's own data source."""

    def _call(self, m, kind, payload):
        if kind == "hello":
            payload = pack_json({**unpack_json(payload), "node": {"market": m, "data": f"xmrec:{ROOT}"}})
        return super()._call(m, kind, payload)


def test_flower_on_xmrec_shares_the_same_keys_as_the_embedded_run():
    cfg = config_from_dict({**CFG.to_dict(), "data": f"xmrec:{ROOT}", "markets": list(MARKETS), "rounds": 1})
    markets = load_data(cfg)
    listings = {m.name: [str(k) for k in m.item_keys] for m in markets}
    ss = EmbeddedSecureSum(backend=cfg.secagg, markets=list(MARKETS), run_id="real", allow_insecure=False,
                           min_cohort=2, colluders=0)
    ref = run_method("fedmm", markets, cfg.model, rounds=cfg.rounds, seed=cfg.seed, secure_sum=ss)["runs"]
    workers = {m: MarketWorker(market=m, rules=dataclasses.replace(
        RULES, listings={k: v for k, v in listings.items() if k != m})) for m in MARKETS}
    Coordinator(cfg=cfg, run_id="real", links=_NodeData(workers), stage_timeout=5, step_timeout=600,
                backend_options=OPTS).run()
    for m, w in workers.items():
        run = w.result["run"]
        assert run.history["n_shared_rows"] == ref[m].history["n_shared_rows"] > 0
        # Every served model's shared-key table (a federated market serves an ensemble of two).
        served, expected = _key_tables(run.ctr), _key_tables(ref[m].ctr)
        assert served and len(served) == len(expected)
        for a, b in zip(served, expected):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _key_tables(model) -> list[np.ndarray]:
    return [t.detach().numpy() for name, t in model.state_dict().items() if name.endswith("embeddings.key.weight")]
