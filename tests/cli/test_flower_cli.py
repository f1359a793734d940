"""``fedmm-secure flower local`` refuses bad input before starting any process."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from fedmm_secure.cli import main  # noqa: E402


@pytest.mark.parametrize("args,field", [
    (["--markets", "1"], "--markets"),
    (["--markets", "2", "--epsilon", "-1"], "privacy.epsilon"),
    (["--markets", "2", "--secagg", "nope"], "secagg"),
    (["--markets", "2", "--epsilon", "8", "--epsilon-budget", "5"], "privacy.epsilon"),  # target above budget
    (["--markets", "2", "--startup-timeout", "0"], "--startup-timeout"),
    (["--markets", "2", "--startup-timeout", "nan"], "--startup-timeout"),
])
def test_bad_flower_flags_exit_2_with_one_line(args, field, tmp_path, capsys, monkeypatch):
    started = []
    import fedmm_secure.runtime.flower.local as fl
    monkeypatch.setattr(fl.FlowerLocalDeployment, "start", lambda self, **kw: started.append(1))
    assert main(["flower", "local", *args, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not started


def test_flower_local_refuses_a_directory_that_holds_a_run(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["flower", "local", "--markets", "2", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_tls_flag_gives_the_deployment_a_fresh_pki_before_it_starts(tmp_path, monkeypatch):
    """`--tls`: the deployment starts with TLS files for exactly its markets, under OUT/tls
    (the real TLS run with refused intruders is tests/runtime/flower/test_tls.py)."""
    import fedmm_secure.runtime.flower.local as fl
    seen = {}

    class Stop(Exception):
        pass

    def start(self, **kw):
        seen["tls"], seen["markets"] = self.tls, list(self.markets)
        raise Stop

    monkeypatch.setattr(fl.FlowerLocalDeployment, "start", start)
    with pytest.raises(Stop):
        main(["flower", "local", "--markets", "3", "--tls", "--out", str(tmp_path / "out"), "--quiet"])
    tls = seen["tls"]
    assert tls is not None and set(tls.node_keys) == set(seen["markets"]) == {"m0", "m1", "m2"}
    assert tls.ca.parent == tmp_path / "out" / "tls" and tls.ca.exists()


def test_resume_needs_a_flower_run_directory(tmp_path, capsys):
    assert main(["flower", "local", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["flower", "local", "--resume", str(tmp_path), "--seed", "1", "--quiet"]) == 2
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("markets,flag,expected", [(2, None, 100.0), (5, None, 160.0), (12, None, 300.0),
                                                   (5, "45", 45.0)])
def test_start_up_waits_grow_with_the_markets_unless_the_flag_says(markets, flag, expected, tmp_path, monkeypatch):
    # Every start-up wait (workers ready, SuperNode keys registered, `flwr run`, SuperNodes
    # joining) is the deployment's start-up timeout: derived from the number of markets, or
    # --startup-timeout.
    import fedmm_secure.runtime.flower.local as fl
    seen = {}

    class Stop(Exception):
        pass

    def start(self, **kw):
        seen["timeout"] = self.startup_timeout_s
        raise Stop

    monkeypatch.setattr(fl.FlowerLocalDeployment, "start", start)
    args = ["flower", "local", "--markets", str(markets), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(Stop):
        main(args + (["--startup-timeout", flag] if flag else []))
    assert seen["timeout"] == expected
    assert fl.startup_timeout(markets) == fl.STARTUP_BASE_S + fl.STARTUP_PER_MARKET_S * markets
