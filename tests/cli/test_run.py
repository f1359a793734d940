import json
import subprocess
import sys

import pytest

from fedmm_secure.cli import main

TINY = {
    "rounds": 1,
    "synthetic": {"markets": [
        {"name": "big", "n_users": 120, "n_items": 60, "impressions_per_user": 10},
        {"name": "small", "n_users": 60, "n_items": 40, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 2, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16]},
}


@pytest.fixture
def tiny_config(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p


def test_run_on_tiny_config_writes_results_and_report(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    assert main(["run", "--config", str(tiny_config), "--out", str(out), "--seed", "1", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["markets"]) == {"big", "small"}
    for market in res["markets"].values():
        assert set(market) == {"local", "local_codes", "fedmm", "centralized"}
        for r in market.values():
            assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0
    assert res["config"]["seed"] == 1
    assert res["secagg"]["backend"] in ("masking", "ckks", "plain")
    report = (out / "report.md").read_text()
    assert "| big |" in report and (out / "auc_per_market.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "local_codes AUC" in printed


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedmm_secure.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _inproc(capsys, *args):
    """Run the CLI in process; returns (exit code, stderr lines)."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse exits for flag errors
        code = e.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    return code, err


@pytest.mark.parametrize("args, field", [
    (["run", "--secagg", "rot13"], "secagg"),
    (["run", "--methods", "local,magic"], "methods"),
    (["run", "--rounds", "0"], "rounds"),
    (["run", "--rounds", "many"], "--rounds"),
    (["run", "--bogus"], "--bogus"),
])
def test_bad_flags_give_one_line_exit_2(args, field, tmp_path, capsys):
    code, lines = _inproc(capsys, *args, "--out", str(tmp_path / "x"))
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert field in lines[0]


@pytest.mark.parametrize("content, field", [
    ({"model": {"n_global": -3}}, "model.n_global"),
    ({"model": {"wings": 2}}, "model.wings"),
    ({"privacy": {"unit": "galaxy"}}, "privacy.unit"),
    ({"synthetic": {"heterogeneity": -1}}, "data.heterogeneity"),
])
def test_bad_config_values_name_the_field(content, field, tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    code, lines = _inproc(capsys, "run", "--config", str(p), "--out", str(tmp_path / "x"))
    assert code == 2, lines
    assert len(lines) == 1 and field in lines[0]


def test_unreadable_config_is_a_clear_error_without_traceback(tmp_path):
    # a real process: what a user sees on the terminal
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed")
    r = _cli("run", "--config", str(p))
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pf_msmtrec_runs_on_aliexpress_format_data_with_the_family_clip(tmp_path):
    """`run --model pf-msmtrec --data aliexpress:DIR`: every market of the AliExpress-format
    folder is a scenario with CTR and CTCVR metrics; DP uses PF-MSMTrec's default clipping norm
    and the run directory records it."""
    from pathlib import Path
    fixture = Path(__file__).parents[1] / "data" / "fixtures" / "aliexpress" / "by_file"
    out = tmp_path / "run"
    cfg = tmp_path / "pf.json"
    cfg.write_text(json.dumps({"pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4,
                                      "batch_size": 8}}))
    assert main(["run", "--model", "pf-msmtrec", "--config", str(cfg), "--data", f"aliexpress:{fixture}",
                 "--rounds", "1", "--epsilon", "8", "--methods", "local,fedavg,pf_msmtrec",
                 "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["markets"]) == {"ES", "FR"}
    for scenario in res["markets"].values():
        assert set(scenario) == {"local", "fedavg", "pf_msmtrec"}
        for r in scenario.values():
            assert set(r) == {"ctr", "ctcvr"} and r["ctr"]["logloss"] > 0
    assert json.loads((out / "config.json").read_text())["privacy"]["max_grad_norm"] == 2.0
    assert {p["max_grad_norm"] for p in res["privacy"].values()} == {2.0}


def test_fedmm_logloss_is_the_calibrated_models_and_auc_does_not_move(tmp_path):
    """Default: LogLoss of the CTR logits Platt-scaled on each market's validation rows, the raw
    one kept; with `model.calibrate: false` the raw one only. AUC and ranking metrics are the
    same either way (a monotone map), and on its own rows the fit cannot lose."""
    runs = {}
    for flag in (True, False):
        cfg = tmp_path / f"c{flag}.json"
        cfg.write_text(json.dumps({**TINY, "methods": ["local", "centralized"],
                                   "model": {**TINY["model"], "calibrate": flag}}))
        out = tmp_path / f"run{flag}"
        assert main(["run", "--config", str(cfg), "--out", str(out), "--seed", "2", "--no-dp", "--quiet"]) == 0
        runs[flag] = json.loads((out / "results.json").read_text())["markets"]
    for market, per in runs[True].items():
        for method, r in per.items():
            raw = runs[False][market][method]
            assert r["auc"] == raw["auc"] and "platt" not in raw and "logloss_uncalibrated" not in raw
            assert r["logloss_uncalibrated"] == raw["logloss"]
            assert r["platt"][0] > 0 and r["logloss"] != raw["logloss"]



def test_synthetic_scale_and_batch_size_flags_reach_the_run(tmp_path, tiny_config):
    out = tmp_path / "scaled"
    assert main(["run", "--config", str(tiny_config), "--out", str(out), "--methods", "local", "--quiet",
                 "--synthetic-scale", "2", "--batch-size", "64"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["synthetic"]["scale"] == 2 and len(cfg["synthetic"]["markets"]) == 2
    assert cfg["model"]["batch_size"] == 64
    sizes = json.loads((out / "results.json").read_text())["market_sizes"]
    assert (sizes["big"]["users"], sizes["big"]["items"]) == (240, 120)
