"""run_audit end to end on the demo CTR target and on cheap synthetic targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmm_secure.audit import AuditReport, MarketAuditTarget, run_audit
from fedmm_secure.audit.demo import DemoTraining, demo_epsilon, demo_targets
from fedmm_secure.errors import ConfigError

DELTA = 1e-5


def gaussian_target(name: str, *, mu: float, n: int = 400, accountant_epsilon=None) -> MarketAuditTarget:
    """Each record's phi moves by ``mu`` when it is trained on, plus seeded noise."""

    def train_fn(mask, seed):
        noise = np.random.default_rng(seed).standard_normal(mask.size)
        phi = mask * mu + noise
        return lambda idx: phi[idx]

    return MarketAuditTarget(name=name, pool_size=n, train_fn=train_fn,
                             accountant_epsilon=accountant_epsilon)


@pytest.fixture(scope="module")
def non_private():
    return demo_targets(seed=1, private=False, delta=DELTA, quick=True)


@pytest.fixture(scope="module")
def private():
    return demo_targets(seed=1, private=True, delta=DELTA, quick=True, noise_multiplier=1.0)


def test_non_private_demo_leaks(non_private, tmp_path):
    """(a) A memorising non-private CTR model: low-FPR TPR far above FPR, epsilon bound >> 1."""
    lira = run_audit(attack="lira", markets=non_private, out_dir=tmp_path, quick=True, seed=0,
                     accountant_epsilon=None, delta=DELTA)
    for r in lira.results:
        assert r.metrics.tpr_at_1pct_fpr > 0.3, r.to_dict()
        assert r.bound.epsilon_lower_bound > 2.5
    online = [r for r in lira.results if r.attack == "lira-online"]
    assert all(r.metrics.tpr_at_0_1pct_fpr > 0.05 for r in online)
    canary = run_audit(attack="canary", markets=non_private, out_dir=tmp_path, quick=True, seed=0,
                       accountant_epsilon=None, delta=DELTA)
    assert all(r.bound.epsilon_lower_bound > 2.0 and r.metrics.auc > 0.9 for r in canary.results)
    assert "no accountant epsilon" in canary.to_markdown()


def test_dp_demo_is_consistent_with_its_accountant(private, tmp_path):
    for attack in ("loss", "canary", "lira"):
        report = run_audit(attack=attack, markets=private, out_dir=tmp_path, quick=True, seed=0,
                           accountant_epsilon=None, delta=DELTA)
        assert not report.violations
        for r in report.results:
            assert r.accountant_epsilon == pytest.approx(private[r.market].accountant_epsilon)
            assert r.bound.epsilon_lower_bound <= r.accountant_epsilon
            assert r.verdict == "empirical lower bound <= accountant epsilon: consistent"
        assert (tmp_path / f"roc_{attack}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planted_noise_bug_in_dp_sgd_is_flagged(tmp_path):
    """(d) DP-SGD whose noise is divided by the batch size once too often (sigma 5 -> 0.1)
    while the accountant is told sigma = 5: the audit reports a VIOLATION."""
    claimed = demo_epsilon(DemoTraining(steps=150, noise_multiplier=5.0), delta=DELTA)
    buggy = demo_targets(seed=1, private=True, delta=DELTA, quick=True, noise_multiplier=5.0 / 50,
                         accountant=lambda training: claimed)
    report = run_audit(attack="canary", markets=buggy, out_dir=tmp_path, quick=True, seed=0,
                       accountant_epsilon=None, delta=DELTA)
    assert claimed < 1.0
    assert len(report.violations) == len(buggy)
    for r in report.results:
        assert r.bound.epsilon_lower_bound > claimed
        assert r.verdict.startswith("VIOLATION")
    assert "VIOLATION" in report.to_markdown()
    assert report.to_dict()["any_violation"] is True


def test_report_serialises_and_saves(tmp_path):
    markets = {"a": gaussian_target("a", mu=3.0, accountant_epsilon=1.0),
               "b": gaussian_target("b", mu=0.0, accountant_epsilon=5.0)}
    report = run_audit(attack="loss", markets=markets, out_dir=tmp_path, quick=True, seed=4,
                       accountant_epsilon=None, delta=DELTA)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["attack"] == "loss" and d["delta"] == DELTA and len(d["results"]) == 2
    by_market = {r["market"]: r for r in d["results"]}
    assert by_market["a"]["violation"] is True and by_market["b"]["violation"] is False
    assert set(by_market["a"]) >= {"auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "epsilon_lower_bound",
                                   "accountant_epsilon", "verdict", "roc"}
    md = report.to_markdown()
    assert "| a | loss |" in md and "VIOLATION" in md and "consistent" in md
    jp, mp = report.save(tmp_path / "out")
    assert json.loads(jp.read_text())["results"][0]["market"] == "a"
    assert mp.read_text() == md


def test_fixed_seed_reproduces_and_markets_are_independent(tmp_path):
    """(f) Same seed, same report; a market's result does not depend on its neighbours."""
    def run(markets, seed, attack):
        r = run_audit(attack=attack, markets=markets, out_dir=tmp_path, quick=True, seed=seed,
                      accountant_epsilon=None, delta=DELTA)
        return {x.market + x.attack: x.to_dict() for x in r.results}

    both = {"a": gaussian_target("a", mu=1.0), "b": gaussian_target("b", mu=2.0)}
    for attack in ("loss", "lira"):
        first = run(both, 11, attack)
        assert first == run(both, 11, attack)
        assert first != run(both, 12, attack)
        alone = run({"b": both["b"]}, 11, attack)
        assert all(alone[k] == first[k] for k in alone)


def test_demo_reproduces_with_fixed_seed(non_private, tmp_path):
    a = run_audit(attack="loss", markets=non_private, out_dir=tmp_path, quick=True, seed=3,
                  accountant_epsilon=None, delta=DELTA)
    b = run_audit(attack="loss", markets=demo_targets(seed=1, private=False, delta=DELTA, quick=True),
                  out_dir=tmp_path, quick=True, seed=3, accountant_epsilon=None, delta=DELTA)
    assert a.to_dict() == b.to_dict()


def test_lira_reports_both_variants_and_counts_models(tmp_path):
    report = run_audit(attack="lira", markets={"a": gaussian_target("a", mu=1.0)}, out_dir=tmp_path,
                       quick=False, seed=0, accountant_epsilon=None, delta=DELTA, n_shadows=6)
    assert [r.attack for r in report.results] == ["lira-online", "lira-offline"]
    assert all(r.n_models_trained == 7 for r in report.results)
    assert isinstance(report, AuditReport) and report.roc_plot.endswith("roc_lira.png")


def test_configuration_errors():
    t = gaussian_target("a", mu=1.0)
    with pytest.raises(ConfigError):
        run_audit(attack="mia", markets={"a": t}, out_dir="/nonexistent", quick=True, seed=0,
                  accountant_epsilon=None, delta=DELTA)
    with pytest.raises(ConfigError):
        run_audit(attack="loss", markets={"a": t}, out_dir="/nonexistent", quick=True, seed=0,
                  accountant_epsilon={"zz": 1.0}, delta=DELTA)
    with pytest.raises(ConfigError):
        run_audit(attack="loss", markets={}, out_dir="/nonexistent", quick=True, seed=0,
                  accountant_epsilon=None, delta=DELTA)
    with pytest.raises(ConfigError):
        run_audit(attack="loss", markets={"a": t}, out_dir="/nonexistent", quick=True, seed=0,
                  accountant_epsilon=None, delta=0.01)  # 2 m delta > 1
    with pytest.raises(ConfigError):
        MarketAuditTarget(name="x", pool_size=2, train_fn=t.train_fn)
    with pytest.raises(ConfigError):
        MarketAuditTarget(name="x", pool_size=10, train_fn=t.train_fn, canary_pool_size=10)
