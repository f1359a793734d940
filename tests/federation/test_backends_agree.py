"""FedMM gives the same model through every secure-aggregation backend, up to the backend's
reported numerical error (fixed-point quantization for masking, CKKS noise)."""

import json

import pytest

from fedmm_secure.config import config_from_dict
from fedmm_secure.workflows.fedmm_run import run_experiment

TINY = {
    "rounds": 2,
    "methods": ["fedmm"],
    "privacy": {"enabled": False},   # same training through every backend: no fresh DP noise
    "synthetic": {"markets": [
        {"name": "big", "n_users": 120, "n_items": 60, "impressions_per_user": 10},
        {"name": "mid", "n_users": 80, "n_items": 50, "impressions_per_user": 8},
        {"name": "small", "n_users": 60, "n_items": 40, "impressions_per_user": 6},
    ]},
    "model": {"vq_epochs": 2, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
              "ctr_hidden": [16]},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for backend in ("plain", "masking", "ckks"):
        d = tmp_path_factory.mktemp(backend)
        run_experiment(config_from_dict(dict(TINY, secagg=backend)), out_dir=d)
        out[backend] = json.loads((d / "results.json").read_text())
    return out


@pytest.mark.parametrize("backend, tol", [("masking", 2e-3), ("ckks", 2e-3)])
def test_auc_matches_plain_within_backend_error(runs, backend, tol):
    sec = runs[backend]["secagg"]
    assert sec["backend"] == backend and sec["secure"] is True
    assert 0 < sec["max_abs_error_vs_plain"] < 1e-3  # reported, and small
    for market, per in runs["plain"]["markets"].items():
        assert abs(per["fedmm"]["auc"] - runs[backend]["markets"][market]["fedmm"]["auc"]) <= tol


def test_plain_run_is_labelled_not_secure(runs):
    assert runs["plain"]["secagg"]["secure"] is False
    assert runs["plain"]["secagg"]["max_abs_error_vs_plain"] == 0.0


def test_upload_sizes_are_reported(runs):
    for backend in ("masking", "ckks"):
        per_market = runs[backend]["secagg"]["bytes_up_per_market_per_round"]
        assert set(per_market) == {"big", "mid", "small"} and all(v > 0 for v in per_market.values())
