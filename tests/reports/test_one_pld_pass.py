"""`budget check` and `report` run one PLD pass per market and composition: the verification's
recomputed accountants serve the spend per market and the run's totals, with the same results
as fresh accountants (the old code recomputed the deployed ledger's epsilons and the totals)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedmm_secure.cli import main
from fedmm_secure.privacy import accountant as accountant_mod
from fedmm_secure.privacy.composed import ComposedAccountants
from fedmm_secure.reports.privacy_report import budget_table

from ..cli.test_resume import TINY

# Two DP methods: a deployed ledger, a baseline ledger and totals composed over both. Without
# model selection (a comparison per round in fedmm, none in local) and the per-product count
# release (fedmm only) both ledgers hold the same composition (training + the Platt fit's
# releases), which one accountant serves.
TWO = dict(TINY, rounds=2, methods=["local", "fedmm"],
           model=dict(TINY["model"], select_by_validation=False, key_weights="size"))


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-method-run")
    (root / "cfg.json").write_text(json.dumps(TWO))
    assert main(["run", "--config", str(root / "cfg.json"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def _count_passes(monkeypatch) -> Counter:
    """Every PLD pass (the "remove" direction runs once per composition and delta not memoised)."""
    passes: Counter = Counter()
    real = accountant_mod.PLDAccountant._direction_epsilon

    def counting(self, direction, counts, delta, rel):
        if direction == "remove":
            passes[(tuple(sorted(counts.items())), delta)] += 1
        return real(self, direction, counts, delta, rel)

    monkeypatch.setattr(accountant_mod.PLDAccountant, "_direction_epsilon", counting)
    return passes


def _fresh_every_time(monkeypatch) -> None:
    """The old behaviour: every reader builds its own accountant."""
    def fresh(self, events, accountant="pld"):
        acc = accountant_mod.make_accountant(accountant)
        for e in events:
            acc.compose(e)
        return acc

    monkeypatch.setattr(ComposedAccountants, "get", fresh)


@pytest.mark.parametrize("delta", [None, 1e-6])
def test_budget_check_one_pld_pass_per_composition_same_table(private_run, monkeypatch, delta):
    passes = _count_passes(monkeypatch)
    table, ok = budget_table(private_run, max_epsilon=1000, delta=delta)
    assert ok and passes
    # Markets x (deployed ledger, baseline ledger, total over both): each composed once per delta.
    repeated = {k: n for k, n in passes.items() if n > 1}
    assert not repeated, f"PLD passes repeated: {repeated}"
    mine = sum(passes.values())
    with monkeypatch.context() as m:
        _fresh_every_time(m)
        fresh_table, fresh_ok = budget_table(private_run, max_epsilon=1000, delta=delta)
    assert (fresh_table, fresh_ok) == (table, ok)
    # The fresh path recomputes what the verification already had (deployed ledger, totals).
    assert sum(passes.values()) - mine > mine


def test_report_reuses_the_verification_and_writes_the_same(private_run, monkeypatch, tmp_path):
    import shutil
    fresh_dir = tmp_path / "fresh"
    shutil.copytree(private_run, fresh_dir)
    passes = _count_passes(monkeypatch)
    assert main(["report", str(private_run)]) == 0
    assert not {k: n for k, n in passes.items() if n > 1}
    with monkeypatch.context() as m:
        _fresh_every_time(m)
        assert main(["report", str(fresh_dir)]) == 0
    mine = json.loads((private_run / "privacy_report.json").read_text())
    theirs = json.loads((fresh_dir / "privacy_report.json").read_text())
    mine.pop("run_dir"), theirs.pop("run_dir")
    assert mine == theirs
