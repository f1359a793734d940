"""Intra-op threads of the CLI: one per usable core by default, short OpenMP spins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedmm_secure.cli import main


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cheap(tmp_path) -> list[str]:
    # A command that gets past the process set-up and stops at once (not a run directory: exit 2).
    return ["budget", "check", str(tmp_path / "missing"), "--max-epsilon", "8"]


def test_default_is_one_thread_per_usable_core(monkeypatch, restore_threads, capsys, tmp_path) -> None:
    monkeypatch.delenv("FEDMM_THREADS", raising=False)
    main(_cheap(tmp_path))
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))


def test_fedmm_threads_overrides(monkeypatch, restore_threads, capsys, tmp_path) -> None:
    torch.set_num_threads(2)
    monkeypatch.setenv("FEDMM_THREADS", "1")
    main(_cheap(tmp_path))
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", ["0", "two", "-1", ""])
def test_a_bad_thread_count_is_one_line_and_exit_2(monkeypatch, restore_threads, capsys, tmp_path, bad: str) -> None:
    monkeypatch.setenv("FEDMM_THREADS", bad)
    assert main(_cheap(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FEDMM_THREADS" in err[0]


def test_the_cli_bounds_openmp_spinning_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    code = ("import sys, os; import fedmm_secure.cli; assert 'torch' not in sys.modules; "
            "print(os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "5"   # an explicit choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"
