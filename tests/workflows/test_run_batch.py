"""Independent runs give the same results in one process or in two worker processes."""

from __future__ import annotations

import pytest

from fedmm_secure.config import METHODS
from fedmm_secure.errors import ConfigError
from fedmm_secure.workflows.run_batch import RunJob, run_jobs

TINY = {
    "rounds": 1,
    "methods": list(METHODS),
    "synthetic": {"markets": [
        {"name": "big", "n_users": 120, "n_items": 50, "impressions_per_user": 8},
        {"name": "small", "n_users": 50, "n_items": 30, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 1, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16], "batch_size": 32},
}
# DP runs in the reproducible mode (noise seeded from the config) so they can be compared bit for
# bit; the calibrated noise exercises the per-process calibration memo as well.
PRIVATE = {"enabled": True, "epsilon": 8.0, "delta": 1e-5, "randomness": "reproducible"}
# Everything a run computes from its data and randomness (timings and paths excluded).
COMPARED = ("markets", "market_sizes", "privacy", "privacy_by_method", "nmi_level1_pooled", "code_alignment",
            "summary")


def _jobs(root) -> list[RunJob]:
    return [RunJob(config=dict(TINY, seed=seed, privacy=privacy), out_dir=root / f"{name}-{seed}", label=f"{name} {seed}")
            for name, privacy in (("dp", PRIVATE), ("plain", {"enabled": False})) for seed in (0, 1)]


def test_results_do_not_depend_on_the_number_of_workers_or_the_order(tmp_path):
    jobs1 = _jobs(tmp_path / "one")
    # One process, jobs in reverse order: each run starts after different history in the process.
    serial = dict(zip(reversed(range(len(jobs1))), run_jobs(list(reversed(jobs1)), workers=1)))
    jobs2 = _jobs(tmp_path / "two")
    finished: list[str] = []
    parallel = run_jobs(jobs2, workers=2, on_done=lambda job, res: finished.append(job.label))
    assert sorted(finished) == sorted(j.label for j in jobs2)
    for i, job in enumerate(jobs2):
        a, b = serial[i], parallel[i]
        assert b["config"]["seed"] == job.config["seed"]
        for key in COMPARED:
            assert a.get(key) == b.get(key), (job.label, key)
        assert (job.out_dir / "results.json").is_file()
    # The seeds differ, so identical results would mean the comparison compared nothing.
    assert serial[0]["markets"] != serial[1]["markets"]
    assert serial[0]["privacy"]["big"]["epsilon"] <= 8.0


def test_bad_arguments_fail_before_any_run(tmp_path):
    jobs = _jobs(tmp_path)
    for bad in (dict(workers=0), dict(threads=0), dict(workers=True)):
        with pytest.raises(ConfigError):
            run_jobs(jobs, **bad)
    broken = [*jobs[:1], RunJob(config=dict(TINY, rounds=-1), out_dir=tmp_path / "broken")]
    with pytest.raises(ConfigError):
        run_jobs(broken, workers=2)
    assert not any(tmp_path.iterdir())
