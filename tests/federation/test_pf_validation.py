"""PF-MSMTrec's validation reads under DP: alpha by noisy Brier scores (one accounted release per
grid value), no checkpoint comparison, private Platt maps; and the planned count matches a run's
ledger."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmm_secure.config import config_from_dict
from fedmm_secure.data.synthetic_scenarios import ScenarioConfig, ScenarioSpec, generate_scenarios
from fedmm_secure.federation.hooks import RoundHooks
from fedmm_secure.federation.pf_msmtrec import METHODS, PFSettings, client_receive, evaluate_client, make_client
from fedmm_secure.federation.pf_msmtrec.client import ALPHA
from fedmm_secure.models.calibration import PlattScaling
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.validation import PLATT_STEPS, ValidationAccess
import fedmm_secure.workflows.pf_run as pf_run

TINY = (ScenarioSpec("a", 50, 25, 6), ScenarioSpec("b", 35, 20, 5))
SMALL = PFSettings(dim=4, n_experts=2, expert_hidden=(6,), tower_hidden=4, batch_size=32, lr=0.01)


@pytest.fixture(scope="module")
def scenarios():
    return generate_scenarios(ScenarioConfig(scenarios=TINY), seed=3)


class _Private(RoundHooks):
    """Validation reads are accounted (as in a private run) with a fixed access; counts requests."""

    validation_accounted = True

    def __init__(self, access: ValidationAccess) -> None:
        self.access, self.asked = access, []

    def validation_access(self, market, purpose, releases=1):
        self.asked.append((purpose, releases))
        return self.access


def _client(data):
    return make_client(data, SMALL, METHODS["pf_msmtrec"], weight=0.5, generator=torch.Generator().manual_seed(0))


def _flip(data):
    valid = dataclasses.replace(data.valid, click=1.0 - data.valid.click, conversion=np.zeros_like(data.valid.conversion))
    return dataclasses.replace(data, valid=valid)


def test_private_alpha_releases_one_noisy_score_per_grid_value_and_picks_the_best(scenarios):
    c = _client(scenarios[0])
    local = c.shared_vector()
    c.global_vec = local + 5.0   # a far-off global model: mixing it in hurts every score
    hooks = _Private(ValidationAccess("private", 1e-6, torch.Generator().manual_seed(0)))
    client_receive(c, METHODS["pf_msmtrec"], np.zeros(len(local) + 1), grid=(0.0, 0.5, 1.0), hooks=hooks)
    assert c.history["alpha_expert"][-1] == 0.0 and set(c.history["alpha_tower"][-1].values()) == {0.0}
    # Experts, then each personalized tower: one request of 3 releases each.
    assert hooks.asked == [(ALPHA, 3)] * (1 + len(c.history["alpha_tower"][-1]))


def test_private_alpha_noise_is_there(scenarios):
    picks = set()
    for seed in range(12):
        c = _client(scenarios[0])
        c.global_vec = c.shared_vector() + 0.01   # nearly equal candidates: the noise decides
        hooks = _Private(ValidationAccess("private", 50.0, torch.Generator().manual_seed(seed)))
        client_receive(c, METHODS["pf_no_tower_personal"], np.zeros(len(c.global_vec) + 1), grid=(0.0, 1.0),
                       hooks=hooks)
        picks.add(c.history["alpha_expert"][-1])
    assert picks == {0.0, 1.0}


def test_refused_alpha_takes_the_first_grid_value_and_reads_nothing(scenarios):
    c, f = _client(scenarios[0]), _client(_flip(scenarios[0]))
    for client in (c, f):
        client.global_vec = client.shared_vector() + 5.0
        client_receive(client, METHODS["pf_msmtrec"], np.zeros(len(client.global_vec) + 1), grid=(1.0, 0.0),
                       hooks=_Private(ValidationAccess("refused")))
        assert client.history["alpha_expert"][-1] == 1.0
    np.testing.assert_array_equal(c.shared_vector(), f.shared_vector())


def test_private_checkpoints_before_the_final_round_keep_the_newest_without_reading(scenarios):
    c, f = _client(scenarios[0]), _client(_flip(scenarios[0]))
    hooks = _Private(ValidationAccess("refused"))
    for client in (c, f):
        client.consider_checkpoint(hooks, final_round=False)
        with torch.no_grad():
            next(client.model.parameters()).add_(1.0)
        client.consider_checkpoint(hooks, final_round=False)
        newest = client.model.state_dict()
        assert all(torch.equal(newest[k], v) for k, v in client.best[1].items())
    assert hooks.asked == []


def test_the_final_rounds_checkpoints_are_compared_by_one_release(scenarios):
    c = _client(scenarios[0])
    hooks = _Private(ValidationAccess("private", 1e-6, torch.Generator().manual_seed(0)))
    c.consider_checkpoint(hooks, final_round=True)
    first = {k: t.clone() for k, t in c.model.state_dict().items()}
    with torch.no_grad():   # a far worse second checkpoint: every logit pushed up
        for t in ("ctr", "cvr"):
            c.model.towers[t][-1].bias += 8.0
    c.consider_checkpoint(hooks, final_round=True)
    assert hooks.asked == [("pf-select", 1)]
    assert all(torch.equal(first[k], v) for k, v in c.best[1].items())


def test_private_calibration_is_accounted_per_task(scenarios):
    c = _client(scenarios[0])
    hooks = _Private(ValidationAccess("private", 1e-6, torch.Generator().manual_seed(0)))
    out = evaluate_client(c, calibrate=True, hooks=hooks)
    assert hooks.asked == [("calibrate-ctr", PLATT_STEPS), ("calibrate-ctcvr", PLATT_STEPS)]
    assert all(out[t]["platt"][0] > 0 for t in ("ctr", "ctcvr"))
    refused = evaluate_client(c, calibrate=True, hooks=_Private(ValidationAccess("refused")))
    assert refused["ctr"]["platt"] == [PlattScaling().scale, PlattScaling().shift]


def test_a_private_run_spends_exactly_the_planned_validation_releases(tmp_path):
    cfg = config_from_dict({
        "seed": 1, "rounds": 2, "secagg": "plain", "model_family": "pf-msmtrec",
        "privacy": {"enabled": True, "epsilon": 4.0},
        "pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4, "batch_size": 32,
               "methods": ["pf_msmtrec"], "alpha_grid": [0.0, 0.5, 1.0],
               "data": {"scenarios": [{"name": s.name, "n_users": s.n_users, "n_items": s.n_items,
                                       "impressions_per_user": s.impressions_per_user} for s in TINY]}}})
    res = pf_run.run_pf_experiment(cfg, out_dir=tmp_path)
    with Ledger.open(tmp_path / "ledger.sqlite") as led:
        spent = led.spent_events()
    for m in ("a", "b"):
        valid = sum(e.steps for e in spent[m] if e.sample_rate == 1)
        # 2 rounds x 3 alpha choices (experts, two towers) x 3 grid values, the final round's
        # checkpoint comparison, and 2 Platt fits.
        assert valid == res["privacy"][m]["validation"]["releases_used"] == 2 * 3 * 3 + 1 + 2 * PLATT_STEPS
        assert res["privacy"][m]["epsilon"] <= 4.0
