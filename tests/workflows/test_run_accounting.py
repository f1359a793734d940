"""Every method of a run that reads a market's raw rows spends on a ledger, and the run reports the
total spent on each market's data across all of them (infinite when ``centralized`` ran).

The guard test runs every method of ``config.METHODS`` (so a method added later is covered without
editing this file) and fails if any DP step is not on its method's ledger, or if any method other
than the declared non-private ones trains through the plain (non-DP) trainer in a private run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fedmm_secure.cli import main
from fedmm_secure.config import METHODS, config_from_dict
from fedmm_secure.federation import training
from fedmm_secure.privacy.events import SubsampledGaussianEvent
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.session import PrivacySession
from fedmm_secure.privacy.totals import NON_PRIVATE_METHODS
from fedmm_secure.reports.run_verification import verify_run
from fedmm_secure.workflows import fedmm_run

TINY = {
    "rounds": 2,
    "synthetic": {"markets": [
        {"name": "big", "n_users": 150, "n_items": 60, "impressions_per_user": 10},
        {"name": "small", "n_users": 60, "n_items": 40, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 2, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16], "batch_size": 32},
    "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5},
}
DP_METHODS = [m for m in METHODS if m not in NON_PRIVATE_METHODS]


def _ledger_events(run: Path, rel: str) -> dict[str, list[SubsampledGaussianEvent]]:
    with Ledger.open(run / rel) as led:
        return led.spent_events()


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory) -> tuple[Path, dict, Counter, set]:
    """Every method, with spies on the DP event stream and on the plain trainer."""
    out = tmp_path_factory.mktemp("all-methods") / "run"
    cfg = config_from_dict(dict(TINY, methods=list(METHODS)))
    current: list[str] = []
    dp_steps: Counter = Counter()
    plain: set[str] = set()
    mp = pytest.MonkeyPatch()
    real_run, real_event, real_plain = fedmm_run.run_method, PrivacySession._on_event, training.PlainTrainer.train_epochs
    real_valid = PrivacySession.validation_access

    def run_method(method, *a, **k):
        current.append(method)
        return real_run(method, *a, **k)

    def on_event(self, market, event):
        dp_steps[(current[-1], market)] += event.steps
        return real_event(self, market, event)

    def validation_access(self, market, purpose, releases=1):
        access = real_valid(self, market, purpose, releases)
        if access.mode == "private":   # releases from validation rows (selection, calibration)
            dp_steps[(current[-1], market, "valid")] += releases
        return access

    def plain_epochs(self, epochs):
        plain.add(current[-1])
        return real_plain(self, epochs)

    mp.setattr(fedmm_run, "run_method", run_method)
    mp.setattr(PrivacySession, "_on_event", on_event)
    mp.setattr(PrivacySession, "validation_access", validation_access)
    mp.setattr(training.PlainTrainer, "train_epochs", plain_epochs)
    try:
        results = fedmm_run.run_experiment(cfg, out_dir=out)
    finally:
        mp.undo()
    return out, results, dp_steps, plain


def test_no_method_trains_on_raw_rows_without_its_events_reaching_a_ledger(spied_run):
    run, results, dp_steps, plain = spied_run
    acct = results["accounting"]
    assert acct["deployed_method"] == "fedmm"
    # Only the declared non-private methods may train without DP in a private run ...
    assert plain <= NON_PRIVATE_METHODS, f"{sorted(plain - NON_PRIVATE_METHODS)} trained without DP"
    # ... and every DP step any method took is on that method's ledger.
    for method in DP_METHODS:
        entry = acct["methods"][method]
        assert entry["dp"] is True
        events = _ledger_events(run, entry["ledger"])
        with Ledger.open(run / entry["ledger"]) as led:
            assert led.method == method
        for market in ("big", "small"):
            taken, valid = dp_steps[(method, market)], dp_steps[(method, market, "valid")]
            assert taken > 0, f"{method} took no DP step on {market}"
            assert valid > 0, f"{method} selected or calibrated on {market} without a private release"
            assert sum(e.steps for e in events.get(market, []) if e.sample_rate < 1) == taken, \
                f"{method}: DP steps on {market} missing from its ledger"
            assert sum(e.steps for e in events.get(market, []) if e.sample_rate == 1) == valid, \
                f"{method}: validation releases on {market} missing from its ledger"
    for (method, *_), steps in dp_steps.items():
        assert method in DP_METHODS and steps > 0
    for method in NON_PRIVATE_METHODS & set(METHODS):
        assert acct["methods"][method]["dp"] is False


def test_centralized_makes_every_total_infinite_and_the_report_says_so(spied_run, capsys):
    run, results, _, _ = spied_run
    for market, t in results["accounting"]["total"].items():
        assert t["infinite"] is True and t["epsilon"] is None and t["non_private_methods"] == ["centralized"]
        assert t["deployed_epsilon"] == results["privacy"][market]["epsilon"]
    assert results["accounting"]["total_is_infinite"] is True
    assert "the total epsilon is infinite" in (run / "report.md").read_text()
    assert verify_run(run).ok
    capsys.readouterr()
    # Default scope: the total, which is infinite -> FAIL, saying what it checked and why.
    assert main(["budget", "check", str(run), "--max-epsilon", "1000"]) == 1
    out = capsys.readouterr().out
    assert "checked: the TOTAL" in out and "total epsilon = inf" in out and "-> FAIL" in out
    assert main(["budget", "check", str(run), "--max-epsilon", "1000", "--scope", "deployed"]) == 0
    out = capsys.readouterr().out
    assert "checked: the DEPLOYED method's own spend only (fedmm)" in out and "-> PASS" in out
    assert main(["report", str(run)]) == 0
    report = (run / "privacy_report.md").read_text()
    assert "## Total spent on each market's data" in report and "infinite on every market" in report


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp-methods") / "run"
    fedmm_run.run_experiment(config_from_dict(dict(TINY, methods=DP_METHODS)), out_dir=out)
    return out


def _dp_accounting_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for e in events:
        acc.compose(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
                    e.steps)
    return float(acc.get_epsilon(delta))


def test_totals_recomputed_independently_with_dp_accounting_from_the_ledgers(dp_run):
    results = json.loads((dp_run / "results.json").read_text())
    acct = results["accounting"]
    per_market: dict[str, list[SubsampledGaussianEvent]] = defaultdict(list)
    for method in DP_METHODS:
        for market, evs in _ledger_events(dp_run, acct["methods"][method]["ledger"]).items():
            per_market[market] += evs
    assert set(per_market) == {"big", "small"}
    for market, evs in per_market.items():
        ref = _dp_accounting_epsilon(evs, 1e-5)
        total = acct["total"][market]
        assert total["infinite"] is False
        # Ours is a certified upper bound ~0.3% above dp-accounting's pessimistic PLD.
        assert ref * (1 - 1e-3) <= total["epsilon"] <= ref * 1.01, (market, total["epsilon"], ref)
        # More than the deployed method's own spend: the baselines read the same rows.
        assert total["epsilon"] > total["deployed_epsilon"] * 1.05
        assert set(total["dp_methods"]) == set(DP_METHODS)


def test_budget_check_gates_on_the_total_by_default(dp_run, capsys):
    results = json.loads((dp_run / "results.json").read_text())
    totals = {m: t["epsilon"] for m, t in results["accounting"]["total"].items()}
    deployed = {m: p["epsilon"] for m, p in results["privacy"].items()}
    between = (max(deployed.values()) + max(totals.values())) / 2
    capsys.readouterr()
    assert main(["budget", "check", str(dp_run), "--max-epsilon", f"{between}"]) == 1
    assert "OVER BUDGET" in capsys.readouterr().out
    assert main(["budget", "check", str(dp_run), "--max-epsilon", f"{between}", "--scope", "deployed"]) == 0


@pytest.fixture
def copy(dp_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(dp_run, out)
    return out


def _edit_results(run: Path, edit) -> None:
    res = json.loads((run / "results.json").read_text())
    edit(res)
    (run / "results.json").write_text(json.dumps(res))


def test_a_removed_baseline_ledger_fails_verification(copy):
    shutil.rmtree(copy / "baselines" / "local")
    v = verify_run(copy)
    assert not v.ok and "baselines/local/ledger.sqlite" in v.problem and "missing" in v.problem


def test_an_understated_total_fails_verification(copy):
    _edit_results(copy, lambda r: r["accounting"]["total"]["small"].update(epsilon=1.0))
    v = verify_run(copy)
    assert not v.ok and "total" in v.problem and "small" in v.problem


def test_a_removed_accounting_section_fails_verification(copy):
    _edit_results(copy, lambda r: r.pop("accounting"))
    v = verify_run(copy)
    assert not v.ok and "no accounting section" in v.problem


def test_a_baseline_ledger_swapped_for_another_methods_fails(copy):
    shutil.rmtree(copy / "baselines" / "local")
    shutil.copytree(copy / "baselines" / "local_codes", copy / "baselines" / "local")
    assert not verify_run(copy).ok


def test_a_resumed_run_keeps_every_methods_spend(dp_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(dp_run, out)
    (out / "results.json").unlink()
    before = {m: sum(e.steps for e in evs) for m, evs in _ledger_events(out, "baselines/local/ledger.sqlite").items()}
    res = fedmm_run.run_experiment(config_from_dict(dict(TINY, methods=DP_METHODS)), out_dir=out, resume=True)
    after = {m: sum(e.steps for e in evs) for m, evs in _ledger_events(out, "baselines/local/ledger.sqlite").items()}
    assert all(after[m] == 2 * before[m] for m in before)
    assert verify_run(out).ok
    assert all(not math.isinf(t["epsilon"]) and t["epsilon"] > 0 for t in res["accounting"]["total"].values())


def test_a_pf_msmtrec_run_accounts_every_method_too(tmp_path, capsys):
    from ..cli.test_resume import PF_TINY

    cfg = tmp_path / "pf.json"
    cfg.write_text(json.dumps(PF_TINY))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    acct = res["accounting"]
    assert acct["deployed_method"] == "pf_msmtrec" and acct["methods"]["local"]["ledger"] == "baselines/local/ledger.sqlite"
    with Ledger.open(out / "baselines" / "local" / "ledger.sqlite") as led:
        assert led.method == "local" and set(led.markets()) == {"a", "b"}
    for market, t in acct["total"].items():
        assert t["epsilon"] > res["privacy"][market]["epsilon"] and set(t["dp_methods"]) == {"local", "pf_msmtrec"}
    assert verify_run(out).ok
    capsys.readouterr()
    assert main(["budget", "check", str(out), "--max-epsilon", "1000"]) == 0
    assert "checked: the TOTAL" in capsys.readouterr().out


@pytest.mark.parametrize("key_weights, overlap, serve, releases",
                         [("size", 0.5, "select", 1 + 3), ("counts", 0.5, "select", 1 + 1 + 3),
                          # no shared keys: nothing to weigh, so no count release is planned
                          ("counts", 0.0, "select", 1 + 3),
                          # the default ensemble compares nothing: counts and the Platt fit only
                          ("counts", 0.5, "ensemble", 1 + 3), ("size", 0.5, "ensemble", 3)])
def test_target_covers_selection_and_calibration_recomputed_with_dp_accounting(tmp_path, key_weights, overlap,
                                                                               serve, releases):
    # A run calibrated to a target: DP-SGD, every model comparison, the Platt fit and (with count
    # weights) the per-product count release all compose
    # to at most the target on each market's ledger. Recomputed independently: the validation
    # releases (q = 1) as plain Gaussian mechanisms, the training steps as Poisson-subsampled ones.
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    from fedmm_secure.federation.fedmm.privacy import validation_releases

    privacy = {"enabled": True, "epsilon": 3.0, "delta": 1e-5}
    cfg = config_from_dict(dict(TINY, methods=["fedmm"], privacy=privacy,
                                synthetic=dict(TINY["synthetic"], catalogue_overlap=overlap),
                                model=dict(TINY["model"], key_weights=key_weights, serve=serve)))
    results = fedmm_run.run_experiment(cfg, out_dir=tmp_path / "run")
    events = _ledger_events(tmp_path / "run", "ledger.sqlite")
    for market in ("big", "small"):
        train = [e for e in events[market] if e.sample_rate < 1]
        valid = [e for e in events[market] if e.sample_rate == 1]
        assert sum(e.steps for e in valid) == validation_releases(cfg, "fedmm", shared_keys=overlap > 0) == releases
        # Planned as made: a planned release never made would have raised the training noise.
        assert results["privacy"][market]["validation"]["releases_planned"] == releases
        ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for e in train:
            ref.compose(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
                        e.steps)
        for e in valid:
            ref.compose(dp_event.GaussianDpEvent(e.noise_multiplier), e.steps)
        expected = float(ref.get_epsilon(1e-5))
        reported = results["privacy"][market]["epsilon"]
        assert expected * (1 - 1e-3) <= reported <= expected * 1.01, (market, reported, expected)
        assert 0.95 * 3.0 < reported <= 3.0
        # Without the validation releases the same training noise would spend visibly less: they
        # are not free, and the calibration paid for them.
        ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for e in train:
            ref.compose(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
                        e.steps)
        assert float(ref.get_epsilon(1e-5)) < 0.99 * reported
    assert verify_run(tmp_path / "run").ok


def test_fedmm_oracle_reference_has_perfect_codes_and_fedmm_s_privacy_plan(tmp_path):
    # The reference differs from fedmm only in its level-1 codes (post-processing): its own
    # ledger must hold the same plan (DP-SGD, comparison, count release, Platt) at the same epsilon.
    privacy = {"enabled": True, "epsilon": 3.0, "delta": 1e-5}
    cfg = config_from_dict(dict(TINY, methods=["fedmm", "fedmm_oracle"], privacy=privacy,
                                model=dict(TINY["model"], n_global=16)))
    results = fedmm_run.run_experiment(cfg, out_dir=tmp_path / "run")
    assert results["nmi_level1_pooled"]["fedmm_oracle"] == 1.0
    assert results["nmi_level1_pooled"]["fedmm"] < 1.0
    fed = _ledger_events(tmp_path / "run", "ledger.sqlite")
    ref = _ledger_events(tmp_path / "run", "baselines/fedmm_oracle/ledger.sqlite")
    for market in ("big", "small"):
        def plan(events):
            return sorted((e.sample_rate, e.steps) for e in events)
        assert plan(ref[market]) == plan(fed[market]) and len(ref[market]) > 0
        assert results["privacy_by_method"]["fedmm_oracle"][market] == pytest.approx(
            results["privacy_by_method"]["fedmm"][market], rel=1e-6)
    assert verify_run(tmp_path / "run").ok


def test_a_reference_that_cannot_run_fails_before_anything_is_written(tmp_path):
    # TINY's 8 level-1 codes cannot hold the generator's 16 clusters: refused after the data is
    # read, before `fedmm` trains or any ledger or result exists.
    from fedmm_secure.errors import ConfigError

    cfg = config_from_dict(dict(TINY, methods=["fedmm", "fedmm_oracle"]))
    with pytest.raises(ConfigError) as e:
        fedmm_run.run_experiment(cfg, out_dir=tmp_path / "run")
    assert e.value.field == "model.n_global"
    assert not (tmp_path / "run").exists()
