"""A private run's noise is unpredictable: the seed fixes data and initialisation, not the noise."""

import json

import pytest

from fedmm_secure.cli import main

from .test_run import TINY

PRIVATE = {**TINY, "methods": ["local", "fedmm"]}


def _metrics(out):
    res = json.loads((out / "results.json").read_text())
    return res, [(m, meth, r["auc"], r["logloss"]) for m, per in sorted(res["markets"].items())
                 for meth, r in sorted(per.items())]


@pytest.fixture
def private_config(tmp_path):
    p = tmp_path / "private.json"
    p.write_text(json.dumps(PRIVATE))
    return p


def test_two_private_runs_with_the_same_seed_train_different_models(tmp_path, private_config, capsys):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        assert main(["run", "--config", str(private_config), "--epsilon", "8", "--seed", "3",
                     "--out", str(out), "--quiet"]) == 0
        runs.append(_metrics(out))
    (res, a), (_, b) = runs
    assert res["randomness"] == {"source": "secure", "private": True, "note": res["randomness"]["note"]}
    assert a != b  # same seed, same data, same initial models: only the noise and sampling differ
    assert "NOT PRIVATE" not in capsys.readouterr().out
    # The deployed method's own spend: with the `local` baseline the total is above 10 by design.
    assert main(["budget", "check", str(tmp_path / "run0"), "--max-epsilon", "10", "--scope", "deployed"]) == 0


def test_reproducible_mode_repeats_and_every_output_says_not_private(tmp_path, private_config, capsys):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        assert main(["run", "--config", str(private_config), "--epsilon", "8", "--seed", "3",
                     "--randomness", "reproducible", "--out", str(out), "--quiet"]) == 0
        runs.append(_metrics(out))
    (res, a), (_, b) = runs
    assert a == b
    assert res["randomness"]["private"] is False and "NOT PRIVATE" in res["randomness"]["note"]
    assert "NOT PRIVATE" in capsys.readouterr().out
    out = tmp_path / "run0"
    assert "NOT PRIVATE" in (out / "report.md").read_text()
    assert main(["budget", "check", str(out), "--max-epsilon", "100"]) == 1
    assert "NOT PRIVATE" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "NOT PRIVATE" in (out / "privacy_report.md").read_text()


def test_the_old_secure_mode_setting_is_refused_with_the_field_named(tmp_path, capsys):
    cfg = tmp_path / "old.json"
    cfg.write_text(json.dumps({**PRIVATE, "privacy": {"enabled": True, "epsilon": 8, "secure_mode": True}}))
    code = main(["run", "--config", str(cfg), "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    assert "privacy.secure_mode" in capsys.readouterr().err
