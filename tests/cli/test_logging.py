"""The library logs, the CLI decides what reaches the terminal (stderr; results stay on stdout)."""

from __future__ import annotations

import logging

from fedmm_secure.cli import main


def test_library_warnings_reach_stderr_through_the_cli(tmp_path, capsys):
    # `report` on an empty directory fails (no ledger), after logging is configured.
    assert main(["report", str(tmp_path)]) == 2
    capsys.readouterr()
    logging.getLogger("fedmm_secure.workflows.fedmm_run").warning("something to know")
    logging.getLogger("fedmm_secure.workflows.fedmm_run").info("detail")
    err = capsys.readouterr().err.splitlines()
    assert err == ["fedmm-secure: WARNING: something to know"]


def test_log_level_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDMM_LOG_LEVEL", "info")
    assert main(["report", str(tmp_path)]) == 2
    capsys.readouterr()
    logging.getLogger("fedmm_secure.workflows.pf_run").info("detail")
    assert capsys.readouterr().err.splitlines() == ["fedmm-secure: INFO: detail"]
    monkeypatch.setenv("FEDMM_LOG_LEVEL", "loud")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FEDMM_LOG_LEVEL" in err[0]
