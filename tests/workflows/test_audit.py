"""The membership-inference audit wired to FedMM runs: tiny synthetic runs, quick audits."""

import json
import math

import numpy as np
import pytest

from fedmm_secure.cli.audit import run_audit_command
from fedmm_secure.workflows.audit import audit_run
from fedmm_secure.workflows.audit_targets import CtrMechanism, ctr_stage_epsilon, fedmm_ctr_targets, load_run
from fedmm_secure.config import config_from_dict
from fedmm_secure.errors import ConfigError
from fedmm_secure.workflows.fedmm_run import run_experiment

TINY = {
    "rounds": 1,
    "methods": ["fedmm"],
    "secagg": "plain",
    "synthetic": {"markets": [
        {"name": "big", "n_users": 120, "n_items": 60, "impressions_per_user": 10},
        {"name": "small", "n_users": 60, "n_items": 40, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 2, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16], "batch_size": 64},
}



@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_run")
    cfg = config_from_dict({**TINY, "privacy": {"enabled": True, "epsilon": 2.0}})
    run_experiment(cfg, out_dir=out)
    return out


@pytest.mark.parametrize("attack", ["loss", "canary"])
def test_quick_audit_of_dp_run_writes_reports_and_stays_under_the_accountant(dp_run, tmp_path, attack, capsys):
    out = tmp_path / f"{attack}.json"
    code = run_audit_command(dp_run, attack=attack, out=out, quick=True, seed=0, markets=["big"])
    assert code == 0
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 200, suffix
    rep = json.loads(out.read_text())
    assert rep["attack"] == attack and rep["results"]
    whole = json.loads((dp_run / "results.json").read_text())["privacy"]["big"]["epsilon"]
    for r in rep["results"]:
        acc = r["accountant_epsilon"]
        # The audited mechanism is the CTR stage: in the joint design the run's whole epsilon
        # (its only raw-data stage), in the staged design a part of it.
        assert 0 < acc <= whole * (1 + 1e-9)
        assert r["epsilon_lower_bound"]["epsilon_lower_bound"] <= acc
        assert not r["violation"]
    assert f"| big | {attack} |" in capsys.readouterr().out


def test_audited_mechanism_is_the_runs_ctr_stage(dp_run):
    run = load_run(dp_run)
    targets = fedmm_ctr_targets(run, markets=["big", "small"], pool_size=40, canary_pool_size=0, delta=1e-5,
                                seed=0, codes=None, with_codes=False)
    priv = run.results["privacy"]
    for name, t in targets.items():
        p = priv[name]
        steps_per_epoch = math.ceil(1 / p["sample_rate"])
        mech = CtrMechanism(p["sample_rate"], run.config.rounds * run.config.model.ctr_epochs,
                            run.config.model.ctr_lr, run.config.model.batch_size, p["noise_multiplier"],
                            p["max_grad_norm"])
        # The run's ledgered steps are exactly the audited CTR stage's (joint design: the CTR
        # model is the only raw-data stage), plus the CF stage's in the staged design, plus the
        # full-batch releases from validation rows (model selection, calibration), audited apart.
        cf = run.config.rounds * run.config.model.cf_epochs * steps_per_epoch if run.config.model.design == "staged" else 0
        assert p["validation"]["releases_used"] > 0
        assert p["steps"] == mech.steps + cf + p["validation"]["releases_used"]
        assert t.accountant_epsilon == pytest.approx(ctr_stage_epsilon(mech, delta=1e-5))
        assert f"sigma={p['noise_multiplier']:.4g}" in t.description


def test_train_fn_is_reproducible_and_reads_the_mask(dp_run):
    run = load_run(dp_run)
    t = fedmm_ctr_targets(run, markets=["small"], pool_size=40, canary_pool_size=0, delta=1e-5, seed=3,
                          with_codes=False, private=False, epochs=20, lr=0.05)["small"]
    mask = np.arange(40) % 2 == 0
    a = t.train_fn(mask, 7)(np.arange(40))
    b = t.train_fn(mask, 7)(np.arange(40))
    np.testing.assert_array_equal(a, b)
    c = t.train_fn(~mask, 7)(np.arange(40))
    # Non-private and memorising: a record fits better when it is in the training set.
    assert np.mean(a[mask]) > np.mean(c[mask]) and np.mean(c[~mask]) > np.mean(a[~mask])
    with pytest.raises(ConfigError):
        t.train_fn(mask[:10], 0)


def test_nonprivate_memorising_control_shows_leakage(dp_run, tmp_path):
    report, context = audit_run(dp_run, attack="loss", quick=True, seed=0, markets=["big"], private=False,
                                epochs=30, lr=0.03, out_dir=tmp_path)
    (r,) = report.results
    assert r.accountant_epsilon is None and context["markets"]["big"]["run_epsilon_whole_run"] is None
    assert r.metrics.auc > 0.65
    assert r.bound.epsilon_lower_bound > 0


def test_demo_without_run_dir(tmp_path):
    out = tmp_path / "demo.json"
    assert run_audit_command(None, attack="canary", out=out, quick=True, seed=0) == 0
    rep = json.loads(out.read_text())
    assert {r["market"] for r in rep["results"]} == {"demo-rich (dp)", "demo-sparse (dp)",
                                                      "demo-rich (no-dp)", "demo-sparse (no-dp)"}
    assert out.with_suffix(".png").exists() and out.with_suffix(".md").exists()


def test_bad_inputs_are_config_errors(tmp_path, dp_run):
    with pytest.raises(ConfigError, match="results.json|config.json"):
        run_audit_command(tmp_path, attack="loss", out=None, quick=True, seed=0)
    with pytest.raises(ConfigError):
        run_audit_command(None, attack="loss", out=None, quick=False, seed=0)
    with pytest.raises(ConfigError):
        run_audit_command(dp_run, attack="loss", out=tmp_path / "x.txt", quick=True, seed=0)
    with pytest.raises(ConfigError, match="pool_size"):
        fedmm_ctr_targets(load_run(dp_run), markets=["small"], pool_size=10**6, canary_pool_size=0,
                          delta=1e-5, seed=0, with_codes=False)


def test_cli_subcommand_audits_every_market(dp_run, tmp_path, capsys):
    from fedmm_secure.cli import main
    out = tmp_path / "cli.json"
    assert main(["audit", str(dp_run), "--attack", "loss", "--quick", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert {r["market"] for r in rep["results"]} == {"big", "small"}
    assert all(r["epsilon_lower_bound"]["epsilon_lower_bound"] <= r["accountant_epsilon"] for r in rep["results"])
    # Quick mode prints each result's achievable ceiling, and "not for conclusions" exactly when
    # that ceiling cannot exceed the accountant's epsilon.
    printed = capsys.readouterr().out
    for r in rep["results"]:
        assert r["ceiling"] >= r["epsilon_lower_bound"]["epsilon_lower_bound"]
        line = next(x for x in printed.splitlines() if x.startswith(f"{r['market']} loss: achievable ceiling"))
        assert f"{r['ceiling']:.3f}" in line
        assert ("not for conclusions" in line) == (r["ceiling"] <= r["accountant_epsilon"])


def test_a_memorising_model_claimed_as_private_is_flagged(dp_run, tmp_path):
    # Planted accounting bug: non-private CTR training reported as epsilon 0.1.
    from fedmm_secure.audit import run_audit
    targets = fedmm_ctr_targets(load_run(dp_run), markets=["big"], pool_size=400, canary_pool_size=0, delta=1e-5,
                                seed=0, with_codes=False, private=False, epochs=30, lr=0.03)
    report = run_audit(attack="loss", markets=targets, out_dir=tmp_path, quick=True, seed=0,
                       accountant_epsilon={"big": 0.1}, delta=1e-5)
    assert [r.market for r in report.violations] == ["big"]
