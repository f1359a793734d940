"""The distributed pipeline (per-market coroutines + coordinator) in process, no Flower:
it must reproduce the embedded runtime exactly, with and without a market dropping out."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm_secure.errors import ProtocolError
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.wire import unpack_with_header
from fedmm_secure.runtime.flower.worker import MarketWorker

from .reference import CFG, DROP, OPTS, RULES, embedded_codebooks, private_rules


class _SilentFrom(InProcessLinks):
    """A market stops answering at a given stage of a given sum (and for good)."""

    def __init__(self, workers, market, label, round_id, stage):
        super().__init__(workers)
        self.target, self.at, self.stage = market, (label, round_id), stage
        self.count = 0

    def exchange(self, messages, *, timeout):
        msg = messages.get(self.target)
        if msg is not None and msg[0] == "secagg":
            header, _ = unpack_with_header(msg[1])
            if (header["label"], header["round_id"]) == self.at:
                if header.get("begin"):
                    self.count = 0
                if self.count == self.stage:
                    self.silent.add(self.target)
                self.count += 1
        return super().exchange(messages, timeout=timeout)


def _distributed(drop):
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    links = _SilentFrom(workers, *drop) if drop else InProcessLinks(workers)
    res = Coordinator(cfg=CFG, run_id=f"run-{CFG.seed}", links=links, stage_timeout=1, step_timeout=60, backend_options=OPTS).run()
    books = {m: w.result["run"].vq.global_codebook.numpy() for m, w in workers.items() if w.result is not None}
    return res, books


@pytest.mark.parametrize("drop", [None, DROP], ids=["all-survive", "m2-drops"])
def test_distributed_pipeline_equals_embedded(drop):
    ref, ref_out = embedded_codebooks(drop=drop)
    res, books = _distributed(drop)
    expected = {"m0", "m1"} if drop else {"m0", "m1", "m2"}
    assert set(books) == expected
    # The tiny config's markets list overlapping products: key sharing is on, as embedded.
    assert res["catalogue"] and all(c["shared_keys"] > 0 for c in res["catalogue"].values())
    for m in expected:
        # Equal up to float32 rounding: the statistics are summed in another order.
        np.testing.assert_array_max_ulp(books[m], ref[m], maxulp=4)
        assert abs(res["markets"][m]["fedmm"]["auc"] - ref_out["markets"][m]["auc"]) < 1e-6
    if drop:
        assert res["dropped"] == {"m2": "codebook-l1 round 0 stage 2"}
        cb = [r for r in res["secagg"]["rounds"] if (r["label"], r["round_id"]) == ("codebook-l1", 0)][0]
        assert cb["participants"] == ["m0", "m1", "m2"] and cb["survivors"] == ["m0", "m1"]


def test_worker_rejects_out_of_step_messages():
    w = MarketWorker(market="m0", rules=RULES)
    with pytest.raises(ProtocolError):
        w.handle("start", b"{}")
    with pytest.raises(ProtocolError):
        w.handle("broadcast", b"x")


def test_secure_sum_workload_delivers_the_exact_sum():
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    wl = {"name": "secure-sum", "length": 300, "rounds": 2}
    res = Coordinator(cfg=CFG, run_id="bench", links=InProcessLinks(workers), stage_timeout=1, step_timeout=60, backend_options=OPTS,
                      workload=wl).run()
    assert res["workload"] == wl and len(res["secagg"]["rounds"]) == 2
    for m in workers:
        # Fixed-point masking error only (values in [-1, 1], 3 summands).
        assert res["markets"][m]["rounds"] == 2 and res["markets"][m]["max_abs_error"] < 1e-6
    with pytest.raises(ProtocolError):
        Coordinator(cfg=CFG, run_id="x", links=InProcessLinks(workers), stage_timeout=1, step_timeout=60, backend_options=OPTS,
                    workload={"name": "mine-bitcoin"})


def _private(cfg, epsilon):
    from fedmm_secure.config import config_from_dict

    raw = cfg.to_dict()
    raw["privacy"] = {**raw["privacy"], "enabled": True, "epsilon": epsilon, "noise_multiplier": None}
    return config_from_dict(raw)


def test_private_run_keeps_one_ledger_per_market_and_matches_embedded_epsilon(tmp_path):
    from fedmm_secure.workflows.fedmm_run import run_experiment
    from fedmm_secure.privacy.ledger import Ledger
    from fedmm_secure.reports.privacy_report import budget_table

    cfg = _private(CFG, 4.0)
    workers = {m: MarketWorker(market=m, rules=private_rules(cfg), ledger_dir=tmp_path / "flower" / "ledgers" / m) for m in ("m0", "m1", "m2")}
    res = Coordinator(cfg=cfg, run_id="dp", links=InProcessLinks(workers), stage_timeout=1, step_timeout=60, backend_options=OPTS).run()
    ref = run_experiment(cfg, out_dir=tmp_path / "embedded")
    assert set(res["privacy"]) == {"m0", "m1", "m2"}
    for m in res["privacy"]:
        # Same plan, same calibration, same accounted steps as the embedded runtime.
        assert res["privacy"][m]["epsilon"] == pytest.approx(ref["privacy"][m]["epsilon"], rel=1e-9)
        assert res["privacy"][m]["epsilon"] <= 4.0
        with Ledger.open(tmp_path / "flower" / "ledgers" / m) as ledger:
            assert ledger.markets() == (m,)   # a market's ledger holds only its own spend
            # Recomputed from the recorded events in one composition (the discretised PLD
            # differs from round-by-round composition by ~0.3%, see privacy/session.py).
            assert ledger.spent()[m].epsilon == pytest.approx(res["privacy"][m]["epsilon"], rel=5e-3)
            assert ledger.spent()[m].epsilon <= 4.0
    # What the ServerApp writes: each market's epsilon with its ledger's head.
    from fedmm_secure.errors import LedgerError
    from fedmm_secure.reports.run_report import write_json_atomic

    write_json_atomic(tmp_path / "flower" / "results.json", res)
    table, ok = budget_table(tmp_path / "flower", max_epsilon=4.0, delta=None)
    assert ok and all(m in table for m in ("m0", "m1", "m2"))
    assert all(f"ledger ledgers/{m}/ledger.sqlite: verified" in table for m in ("m0", "m1", "m2"))
    _, ok = budget_table(tmp_path / "flower", max_epsilon=0.5, delta=None)
    assert not ok
    # A market's whole ledger removed is not a market that spent nothing.
    import shutil
    shutil.rmtree(tmp_path / "flower" / "ledgers" / "m2")
    with pytest.raises(LedgerError, match="results.json reports epsilon for m2 but no ledger"):
        budget_table(tmp_path / "flower", max_epsilon=4.0, delta=None)


def test_private_run_needs_a_ledger_directory():
    from fedmm_secure.errors import AbortError

    cfg = _private(CFG, 4.0)
    workers = {m: MarketWorker(market=m, rules=private_rules(cfg)) for m in ("m0", "m1", "m2")}
    with pytest.raises(AbortError):
        Coordinator(cfg=cfg, run_id="dp", links=InProcessLinks(workers), stage_timeout=1,
                    step_timeout=60, backend_options=OPTS).run()
    assert all(w.result is None for w in workers.values())


def test_ckks_markets_that_first_hear_at_stage_one_still_take_part():
    # With CKKS only the key holder gets a stage-0 message; every market must still be in the sum.
    pytest.importorskip("tenseal")
    from fedmm_secure.config import config_from_dict

    raw = CFG.to_dict()
    raw["secagg"] = "ckks"
    cfg = config_from_dict(raw)
    ref, _ = embedded_codebooks(cfg=cfg, drop=None)
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    res = Coordinator(cfg=cfg, run_id=f"run-{cfg.seed}", links=InProcessLinks(workers), stage_timeout=1,
                      step_timeout=60).run()
    assert res["dropped"] == {} and res["secagg"]["backend"] == "ckks"
    assert all(r["survivors"] == ["m0", "m1", "m2"] for r in res["secagg"]["rounds"])
    for m, w in workers.items():
        # CKKS is approximate (and rounds counts): equal to the embedded run up to its error.
        np.testing.assert_allclose(w.result["run"].vq.global_codebook.numpy(), ref[m], atol=1e-4)


def _xmrec_dir(root):
    # Two XMRec-format markets, big enough for 99 ranking negatives per user.
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in ("aa", "bb"):
        lines = ["userId itemId rate date"]
        for u in range(60):
            for i in rng.choice(180, size=8, replace=False):
                lines.append(f"U{name}{u} I{name}{i} {rng.integers(1, 6)} 2020-01-{rng.integers(1, 28):02d}")
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_market_data_comes_from_the_supernode_node_config(tmp_path):
    from fedmm_secure.config import config_from_dict
    from fedmm_secure.errors import AbortError
    from fedmm_secure.data.loaders import load_data
    from fedmm_secure.federation.fedmm import run_method
    from fedmm_secure.runtime.embedded import EmbeddedSecureSum

    fix = _xmrec_dir(tmp_path / "xmrec")
    raw = CFG.to_dict()
    raw.update(data=f"xmrec:{fix}", markets=["aa", "bb"])
    cfg = config_from_dict(raw)
    markets = load_data(cfg)
    ss = EmbeddedSecureSum(backend="masking", markets=["aa", "bb"], run_id="real", allow_insecure=False,
                           min_cohort=2, colluders=0)
    ref = run_method("fedmm", markets, cfg.model, rounds=cfg.rounds, seed=cfg.seed, secure_sum=ss)
    # The aggregator's run config points nowhere; each market's SuperNode names its own data.
    raw["data"] = "xmrec:/nonexistent/aggregator/path"
    nodes = {m: {"market": m, "data": f"xmrec:{fix}"} for m in ("aa", "bb")}
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("aa", "bb")}
    res = Coordinator(cfg=config_from_dict(raw), run_id="real", links=InProcessLinks(workers, node_configs=nodes),
                      stage_timeout=1, step_timeout=60, backend_options=OPTS).run()
    assert res["dropped"] == {}
    for m in ("aa", "bb"):
        assert res["markets"][m]["fedmm"]["auc"] == pytest.approx(ref["markets"][m]["auc"], abs=1e-6)
        np.testing.assert_array_max_ulp(workers[m].result["run"].vq.global_codebook.numpy(),
                                        ref["runs"][m].vq.global_codebook.numpy(), maxulp=4)
    # A SuperNode that names another market than its worker serves is refused; the other market
    # then will not be summed alone (below its minimum cohort) and the run stops.
    wrong = {"aa": {"market": "bb", "data": f"xmrec:{fix}"}, "bb": {"market": "bb", "data": f"xmrec:{fix}"}}
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("aa", "bb")}
    with pytest.raises(AbortError):
        Coordinator(cfg=config_from_dict(raw), run_id="real", links=InProcessLinks(workers, node_configs=wrong),
                    stage_timeout=1, step_timeout=60, backend_options=OPTS).run()
    assert all(w.result is None for w in workers.values())
    with pytest.raises(AbortError):
        Coordinator(cfg=config_from_dict(raw), run_id="real", links=InProcessLinks(
            {m: MarketWorker(market=m, rules=RULES) for m in ("aa", "bb")}), stage_timeout=1, step_timeout=60, backend_options=OPTS).run()


class _Meddling(InProcessLinks):
    """Before every secure-aggregation message, hands the market a tampered copy and a replay of
    the previous message; the worker must refuse both and then accept the genuine one.

    The RESULT message (the sum) is the aggregator's own computation and is not signed: a
    malicious aggregator releasing a wrong sum is out of scope (threat_model/masking.md), so its
    payload is only replayed, not tampered with."""

    def __init__(self, workers):
        super().__init__(workers)
        self.last: dict[str, bytes] = {}
        self.refused = 0

    def exchange(self, messages, *, timeout):
        for m, (kind, payload) in messages.items():
            if kind != "secagg":
                continue
            from fedmm_secure.secagg.codec import decode_envelope
            from fedmm_secure.secagg.masking import RESULT

            bad = bytearray(payload)
            bad[-1] ^= 0x01
            _, body = unpack_with_header(payload)
            tampered = bytes(bad) if decode_envelope(body).stage != RESULT else None
            for attempt in (tampered, self.last.get(m)):
                if attempt is not None and attempt != payload:
                    out_kind, _ = self._call(m, "secagg", attempt)
                    assert out_kind == "error"
                    self.refused += 1
            self.last[m] = payload
        return super().exchange(messages, timeout=timeout)


def test_tampered_and_replayed_messages_are_refused_and_change_nothing():
    ref, _ = embedded_codebooks(drop=None)
    workers = {m: MarketWorker(market=m, rules=RULES) for m in ("m0", "m1", "m2")}
    links = _Meddling(workers)
    res = Coordinator(cfg=CFG, run_id=f"run-{CFG.seed}", links=links, stage_timeout=1, step_timeout=60, backend_options=OPTS).run()
    assert res["dropped"] == {} and links.refused > 50
    for m, w in workers.items():
        np.testing.assert_array_max_ulp(w.result["run"].vq.global_codebook.numpy(), ref[m], maxulp=4)
    # Unexpected kinds and out-of-order control messages are refused too.
    w = MarketWorker(market="m0", rules=RULES)
    for kind, payload in (("start", b"{}"), ("secagg", b""), ("broadcast", b""), ("nope", b""),
                          ("hello", b"not json")):
        with pytest.raises(Exception):
            w.handle(kind, payload)
