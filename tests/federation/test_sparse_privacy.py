"""Sparse embedding noise in a run: the local and fedmm CTR trainers use it, the ledger records
the split, and the epsilon recomputed from the ledger at the effective multiplier matches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmm_secure.config import config_from_dict
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.sparse_noise import SparseEmbeddingNoise
from fedmm_secure.workflows import fedmm_run

from ..workflows.test_run_accounting import TINY, _dp_accounting_epsilon

SPARSE = {"embedding_noise": "sparse", "sparse_selection_share": 0.25, "sparse_threshold": 2.0}


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("sparse") / "run"
    cfg = config_from_dict(dict(TINY, methods=["local", "fedmm"], seed=3,
                                privacy={"enabled": True, "epsilon": 4.0, "delta": 1e-5,
                                         "randomness": "reproducible", **SPARSE}))
    selected: list[float] = []
    real = SparseEmbeddingNoise.apply_
    mp = pytest.MonkeyPatch()

    def spy(self, grads, lookups, num_units, source):
        real(self, grads, lookups, num_units, source)
        selected.append(float(sum(int(s.sum()) for s in self.last_selected)) / sum(self.sizes))
    mp.setattr(SparseEmbeddingNoise, "apply_", spy)
    try:
        fedmm_run.run_experiment(cfg, out_dir=out)
    finally:
        mp.undo()
    return out, selected


def test_both_methods_train_with_sparse_noise_and_select_a_minority_of_rows(sparse_run):
    out, selected = sparse_run
    results = json.loads((out / "results.json").read_text())
    assert selected, "no DP step went through the sparse mechanism"
    assert 0 < sum(selected) / len(selected) < 0.5
    for method in ("local", "fedmm"):
        for market, p in results["accounting"]["methods"][method]["privacy"].items():
            split = p["embedding_noise"]
            assert split["mode"] == "sparse" and split["threshold"] == 2.0
            s1, s2 = split["selection_noise_multiplier"], split["gradient_noise_multiplier"]
            assert math.isclose((s1 ** -2 + s2 ** -2) ** -0.5, p["noise_multiplier"], rel_tol=1e-9)
            assert math.isclose(p["noise_multiplier"] ** 2 / s1 ** 2, 0.25, rel_tol=1e-9)
            assert p["epsilon"] <= 4.0


def test_ledger_events_carry_the_split_and_reaccount_at_sigma_eff(sparse_run):
    out, _ = sparse_run
    results = json.loads((out / "results.json").read_text())
    fedmm = results["accounting"]["methods"]["fedmm"]
    with Ledger.open(out / fedmm["ledger"]) as led:
        events = led.spent_events()
    for market, evs in events.items():
        training = [e for e in evs if e.sample_rate < 1.0]
        assert training and all(e.split is not None and e.split.threshold == 2.0 for e in training)
        reported = fedmm["privacy"][market]["epsilon"]
        assert abs(_dp_accounting_epsilon(evs, 1e-5) - reported) <= 0.02 * reported
