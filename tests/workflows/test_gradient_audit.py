"""``audit --attack gradient``: the audited mechanism is the ledger's, outputs and CLI."""

import json

import pytest

from fedmm_secure.cli import main
from fedmm_secure.config import config_from_dict
from fedmm_secure.workflows.gradient_audit import (GradientAuditSettings, gradient_audit, mechanisms_from_config,
                                                   mechanisms_from_run)
from fedmm_secure.errors import ConfigError

from .test_audit import TINY, dp_run  # noqa: F401  (module fixture: one tiny private run)


def test_mechanism_from_the_ledger_is_the_configs_plan(dp_run):  # noqa: F811
    from_ledger = mechanisms_from_run(dp_run)
    cfg = config_from_dict({**TINY, "privacy": {"enabled": True, "epsilon": 2.0}})
    planned = mechanisms_from_config(cfg)
    assert set(from_ledger) == {"big", "small"}
    for m, mech in from_ledger.items():
        assert mech.steps == planned[m].steps and mech.unit == planned[m].unit
        assert mech.sample_rate == pytest.approx(planned[m].sample_rate)
        assert mech.noise_multiplier == pytest.approx(planned[m].noise_multiplier)


def test_user_level_plan_and_small_audit():
    cfg = config_from_dict({**TINY, "privacy": {"enabled": True, "epsilon": 2.0}})
    mechs = mechanisms_from_config(cfg, unit="user")
    assert {m.unit for m in mechs.values()} == {"user"}
    payload = gradient_audit(mechs, GradientAuditSettings(canaries=200, repeats=2), markets=["small"])
    r = payload["markets"]["small"]
    assert len(r["correct"]["empirical_epsilons"]) == 2 and "planted_bug" not in r
    assert r["conclusive"] == (r["ceiling"] > r["accountant_epsilon"])


def test_cli_quick_writes_json_and_markdown_and_warns(dp_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "g.json"
    rc = main(["audit", str(dp_run), "--attack", "gradient", "--quick", "--canaries", "20", "--market", "small",
               "--out", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    r = payload["markets"]["small"]
    printed = capsys.readouterr().out
    assert f"ceiling {r['ceiling']:.3f}" in printed
    assert ("not for conclusions" in printed) == (r["ceiling"] <= r["accountant_epsilon"])
    assert out.with_suffix(".md").read_text().startswith("# White-box gradient-canary audit")


@pytest.mark.parametrize("flags", [
    ["--attack", "gradient", "--canaries", "5"],
    ["--attack", "gradient", "--repeats", "0"],
    ["--attack", "gradient", "--market", "nowhere", "--canaries", "20"],
    ["--attack", "loss", "--quick", "--repeats", "3"],
    ["--attack", "gradient", "--out", "x.txt"],
])
def test_bad_input_is_one_line_and_exit_2(flags, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["audit", *flags]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err


def test_a_run_directory_fixes_the_mechanism(dp_run):  # noqa: F811
    from fedmm_secure.workflows.gradient_audit import load_mechanisms
    with pytest.raises(ConfigError):
        load_mechanisms(dp_run, None, unit="user")
