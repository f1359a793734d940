"""PF-MSMTrec mechanisms: what crosses the client boundary, conflict projection, personalized
aggregation, round protocol with privacy hooks, and a tiny private, masked end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmm_secure.config import DEFAULT_MAX_GRAD_NORM, config_from_dict
from fedmm_secure.data.synthetic_scenarios import ScenarioConfig, ScenarioSpec, generate_scenarios
from fedmm_secure.errors import ConfigError
from fedmm_secure.federation.hooks import RoundHooks
from fedmm_secure.federation.pf_msmtrec import (METHODS, PFSettings, client_receive, client_upload, make_client,
                                                mix, project_conflict, run_pf_method)
from fedmm_secure.federation.transport import SumResult
from fedmm_secure.runtime.embedded import EmbeddedSecureSum
import fedmm_secure.workflows.pf_run as pf_run
import fedmm_secure.federation.pf_msmtrec as pf_msmtrec


TINY = (ScenarioSpec("a", 50, 25, 6), ScenarioSpec("b", 35, 20, 5), ScenarioSpec("c", 30, 15, 5))
SMALL = PFSettings(dim=4, n_experts=2, expert_hidden=(6,), tower_hidden=4, batch_size=32, lr=0.01)


@pytest.fixture(scope="module")
def scenarios():
    return generate_scenarios(ScenarioConfig(scenarios=TINY), seed=3)


def _client(data, method="pf_msmtrec", seed=0, settings_=SMALL):
    return make_client(data, settings_, METHODS[method], weight=0.5, generator=torch.Generator().manual_seed(seed))


def _independent_shared_size(model, method: str) -> int:
    """Shared-parameter count from the template's definition, not from parameter_plan."""
    mech = METHODS[method]
    total = 0
    for n, p in model.named_parameters():
        if n.startswith(("user_id", "item_id")) or ".specific." in n:
            continue
        if ".norm." in n and mech.local_norm:
            continue
        if n.startswith("gates") and mech.template:
            continue
        total += p.numel()
    return total


# ----------------------------------------------------------------------------- data
def test_scenarios_disjoint_seeded_and_post_click(scenarios):
    again = generate_scenarios(ScenarioConfig(scenarios=TINY), seed=3)
    other = generate_scenarios(ScenarioConfig(scenarios=TINY), seed=4)
    for a, b, c in zip(scenarios, again, other):
        assert np.array_equal(a.train.click, b.train.click) and np.array_equal(a.test.items, b.test.items)
        assert a.train.users.max() < a.n_users and a.user_features.shape == (a.n_users, 2)
        for s in (a.train, a.valid, a.test):
            assert np.all(s.conversion <= s.click)  # conversion implies click
    assert any(not np.array_equal(a.train.click, c.train.click) for a, c in zip(scenarios, other))
    assert [m.n_users for m in scenarios] == [50, 35, 30]


# ----------------------------------------------------------------------------- template
def test_parameter_plan_shares_only_template_shared_parts(scenarios):
    c = _client(scenarios[0])
    shared = set(c.plan.shared)
    assert not any(n.startswith(("user_id", "item_id", "gates")) or ".specific." in n or ".norm." in n for n in shared)
    assert any(".shared." in n for n in shared) and any(n.startswith("towers.") for n in shared)
    assert set(c.plan.local) | shared == {n for n, _ in c.model.named_parameters()}
    fed = _client(scenarios[0], "fedavg")
    assert any(".norm." in n for n in fed.plan.shared) and any(n.startswith("gates") for n in fed.plan.shared)
    assert not any(n.startswith(("user_id", "item_id")) for n in fed.plan.shared)
    assert _client(scenarios[0], "local").plan.shared == ()


def test_upload_contains_only_shared_parameters(scenarios):
    """Changing anything local (IDs, scenario-specific experts, norms, gates) leaves the upload
    unchanged; changing a shared parameter changes it."""
    c = _client(scenarios[0])
    start = c.shared_vector()
    with torch.no_grad():
        c.model.experts[0].shared[0].weight.add_(0.01)
    up = client_upload(c, METHODS["pf_msmtrec"], start=start, trained=True, bound=1.0)
    assert len(up) == _independent_shared_size(c.model, "pf_msmtrec") + 1
    params = dict(c.model.named_parameters())
    with torch.no_grad():
        for n in c.plan.local:
            params[n].add_(torch.randn_like(params[n]))
    up2 = client_upload(c, METHODS["pf_msmtrec"], start=start, trained=True, bound=1.0)
    np.testing.assert_array_equal(up, up2)
    with torch.no_grad():
        c.model.towers["cvr"][0].bias.add_(0.05)
    up3 = client_upload(c, METHODS["pf_msmtrec"], start=start, trained=True, bound=1.0)
    assert not np.array_equal(up, up3)
    assert up[-1] == 0.5 and np.all(np.abs(up[:-1]) <= 0.5 * 1.0)
    skipped = client_upload(c, METHODS["pf_msmtrec"], start=start, trained=False, bound=1.0)
    assert not skipped.any()  # a client over budget contributes nothing and weight 0


# ----------------------------------------------------------------------------- conflict coordination
def test_conflicting_update_is_projected_against_global_direction():
    g = np.array([1.0, 0.0, 0.0])
    u = np.array([-2.0, 3.0, 1.0])
    out, hit = project_conflict(u, g)
    assert hit
    np.testing.assert_allclose(out, [0.0, 3.0, 1.0])
    same, hit = project_conflict(np.array([2.0, 3.0, 1.0]), g)
    assert not hit and np.array_equal(same, [2.0, 3.0, 1.0])
    zero, hit = project_conflict(u, np.zeros(3))
    assert not hit and np.array_equal(zero, u)


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, 6, elements=st.floats(-10, 10)), arrays(np.float64, 6, elements=st.floats(-10, 10)))
def test_projection_never_conflicts_and_keeps_orthogonal_part(u, g):
    out, hit = project_conflict(u, g)
    n2 = g @ g
    assert out @ g >= -1e-7 * max(1.0, n2 * float(np.abs(u).max(initial=0)))
    if n2 > 1e-12:
        perp = lambda v: v - (v @ g) / n2 * g
        np.testing.assert_allclose(perp(out), perp(u), atol=1e-6)
    if not hit:
        assert np.array_equal(out, u)


def test_upload_projects_each_conflicting_block(scenarios):
    c = _client(scenarios[0])
    start = c.shared_vector()
    sl = c.plan.slices()
    delta = np.zeros_like(start)
    delta[sl["tower_ctr"]] = 0.01
    c.load_shared(start + delta)
    c.direction = np.zeros_like(start)
    c.direction[sl["tower_ctr"]] = -1.0       # exactly opposite for that block
    c.direction[sl["expert0"]] = 1.0          # no update there: nothing to project
    up = client_upload(c, METHODS["pf_msmtrec"], start=start, trained=True, bound=1.0)
    np.testing.assert_allclose(up[:-1], 0.0, atol=1e-7)
    assert c.history["conflicts"][-1] == 1
    up_off = client_upload(c, METHODS["pf_no_conflict"], start=start, trained=True, bound=1.0)
    np.testing.assert_allclose(up_off[:-1][sl["tower_ctr"]], 0.5 * 0.01, rtol=1e-4)


# ----------------------------------------------------------------------------- personalized aggregation
def test_mix_formula():
    g, l = np.array([1.0, 2.0]), np.array([3.0, -2.0])
    np.testing.assert_allclose(mix(g, l, 0.25), 0.25 * g + 0.75 * l)
    np.testing.assert_array_equal(mix(g, l, 1.0), g)
    np.testing.assert_array_equal(mix(g, l, 0.0), l)
    with pytest.raises(ConfigError):
        mix(g, l, 1.5)


def test_receive_mixes_experts_and_towers_as_specified(scenarios):
    c = _client(scenarios[0])
    local = c.shared_vector()
    c.global_vec = local + 1.0
    total = np.concatenate([0.5 * np.full(len(local), 0.2), [0.5]])  # average update 0.2
    client_receive(c, METHODS["pf_no_tower_personal"], total, grid=(0.25,))
    new_global = local + 1.2
    np.testing.assert_allclose(c.global_vec, new_global)
    np.testing.assert_allclose(c.direction, 0.2)
    got = c.shared_vector()
    e_idx, t_idx = c.plan.group_index("expert"), c.plan.group_index("tower")
    assert len(e_idx) and len(t_idx) and len(e_idx) + len(t_idx) == len(local)
    np.testing.assert_allclose(got[e_idx], 0.25 * new_global[e_idx] + 0.75 * local[e_idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[t_idx], new_global[t_idx], rtol=1e-5, atol=1e-6)  # towers: plain average
    assert c.history["alpha_expert"][-1] == 0.25


def test_alpha_chosen_by_validation_loss(scenarios):
    c = _client(scenarios[0], settings_=dataclasses.replace(SMALL, select_by="loss"))
    local = c.shared_vector()
    c.global_vec = local + 5.0  # a far-off global model: mixing it in must hurt validation loss
    client_receive(c, METHODS["pf_msmtrec"], np.zeros(len(local) + 1), grid=(0.0, 1.0))
    assert c.history["alpha_expert"][-1] == 0.0
    assert set(c.history["alpha_tower"][-1].values()) == {0.0}
    np.testing.assert_allclose(c.shared_vector(), local, atol=1e-6)


def test_alpha_criterion_can_differ_from_checkpoint_criterion(scenarios):
    """``alpha_by="loss"`` with AUC checkpoints: the far-off global model is refused on the loss
    (its AUC can tie), and the checkpoint score is still the AUC one."""
    c = _client(scenarios[0], settings_=dataclasses.replace(SMALL, select_by="auc", alpha_by="loss"))
    local = c.shared_vector()
    c.global_vec = local + 5.0
    client_receive(c, METHODS["pf_msmtrec"], np.zeros(len(local) + 1), grid=(0.0, 1.0), criterion="loss")
    assert c.history["alpha_expert"][-1] == 0.0
    assert c.valid_loss() == c.valid_loss("auc") != c.valid_loss("loss")


def test_calibration_changes_logloss_only_and_is_fitted_on_validation_rows(scenarios):
    """The served model's LogLoss is that of its Platt-scaled logits: AUC and the raw LogLoss are
    the uncalibrated model's, and on the validation rows it was fitted on the calibrated LogLoss
    is never worse. Test labels play no part in the fit (flipping them changes no Platt map)."""
    c = _client(scenarios[0])
    with torch.no_grad():   # a miscalibrated model: every logit pushed up
        for t in ("ctr", "cvr"):
            c.model.towers[t][-1].bias += 2.0
    raw, cal = pf_msmtrec.evaluate_client(c), pf_msmtrec.evaluate_client(c, calibrate=True)
    for task in ("ctr", "ctcvr"):
        assert cal[task]["auc"] == raw[task]["auc"]
        assert cal[task]["logloss_uncalibrated"] == raw[task]["logloss"]
        assert cal[task]["logloss"] < raw[task]["logloss"]
        assert cal[task]["platt"][0] > 0
    on_valid = pf_msmtrec.evaluate_client(c, "valid", calibrate=True)
    for task in ("ctr", "ctcvr"):
        assert on_valid[task]["logloss"] <= on_valid[task]["logloss_uncalibrated"] + 1e-6
    flipped = _client(dataclasses.replace(scenarios[0], test=dataclasses.replace(
        scenarios[0].test, click=1.0 - scenarios[0].test.click,
        conversion=np.zeros_like(scenarios[0].test.conversion))))
    with torch.no_grad():
        for t in ("ctr", "cvr"):
            flipped.model.towers[t][-1].bias += 2.0
    assert pf_msmtrec.evaluate_client(flipped, calibrate=True)["ctr"]["platt"] == cal["ctr"]["platt"]


def test_alpha_memory_accumulates_validation_cost_over_rounds(scenarios):
    """With memory, a grid value's cost is ``memory * previous + current``: a large cost seen for
    alpha = 0 in earlier rounds outweighs this round's preference for it."""
    def fresh():
        c = _client(scenarios[0], settings_=dataclasses.replace(SMALL, select_by="loss"))
        c.global_vec = c.shared_vector() + 5.0   # this round alone prefers alpha = 0 (see above)
        return c

    c = fresh()
    c.alpha_costs["expert"] = np.array([1e6, 0.0])
    client_receive(c, METHODS["pf_no_tower_personal"], np.zeros(len(c.global_vec) + 1), grid=(0.0, 1.0), memory=0.5)
    assert c.history["alpha_expert"][-1] == 1.0
    assert c.alpha_costs["expert"][0] > 0.5 * 1e6 and c.alpha_costs["expert"][1] < 1e6  # accumulated, not replaced
    c = fresh()
    c.alpha_costs["expert"] = np.array([1e6, 0.0])
    client_receive(c, METHODS["pf_no_tower_personal"], np.zeros(len(c.global_vec) + 1), grid=(0.0, 1.0), memory=0.0)
    assert c.history["alpha_expert"][-1] == 0.0  # memory off: this round's cost only


def _flip_valid(data):
    v = data.valid
    return dataclasses.replace(data, valid=dataclasses.replace(v, click=1.0 - v.click, conversion=np.zeros_like(v.conversion)))


@pytest.mark.parametrize("train_from", ["global", "tracked", "personal"])
def test_uploads_read_validation_rows_only_when_training_from_the_personal_mix(scenarios, train_from):
    """train_from="global" / "tracked": each round trains from the federation's model, so the
    uploads do not depend on the validation split (alpha and checkpoints only shape the model a
    client keeps). train_from="personal": the chosen mix is the next start, so they do."""
    settings_ = dataclasses.replace(SMALL, train_from=train_from, alpha_grid=(0.0, 0.5, 1.0))
    runs = []
    for data in (scenarios, [_flip_valid(m) for m in scenarios]):
        rec = _RecordingSum([])
        out = run_pf_method("pf_msmtrec", data, settings_, rounds=3, seed=0, secure_sum=rec)
        runs.append((rec.vectors, {m: c.history["alpha_expert"] for m, c in out["clients"].items()}))
    (up_a, alpha_a), (up_b, alpha_b) = runs
    assert alpha_a != alpha_b  # the validation split did change the clients' choices
    same = all(np.array_equal(a[m], b[m]) for a, b in zip(up_a, up_b) for m in a)
    assert same == (train_from in ("global", "tracked"))


# ----------------------------------------------------------------------------- round protocol
class _RecordingSum:
    backend_name, secure = "recording", True

    def __init__(self, log):
        self.log, self.vectors = log, []

    def secure_sum(self, *, label, round_id, vectors, max_abs):
        self.log.append(("sum", round_id))
        self.vectors.append({m: np.array(v) for m, v in vectors.items()})
        total = sum(vectors.values())
        return SumResult({m: total.copy() for m in vectors}, tuple(vectors))


class _Hooks(RoundHooks):
    def __init__(self, log, skip):
        self.log, self.skip = log, skip

    def before_round(self, stage, rnd, markets):
        self.log.append(("round", stage, rnd))
        return set(markets) - {self.skip}

    def before_release(self, stage, rnd):
        self.log.append(("release", stage, rnd))


def test_round_protocol_hooks_before_every_release(scenarios):
    log = []
    rec = _RecordingSum(log)
    out = run_pf_method("pf_msmtrec", scenarios, SMALL, rounds=2, seed=0, secure_sum=rec,
                        hooks=_Hooks(log, skip="c"))
    assert log == [("round", "mmoe", 0), ("release", "mmoe", 0), ("sum", 0),
                   ("round", "mmoe", 1), ("release", "mmoe", 1), ("sum", 1)]
    dim = _independent_shared_size(out["clients"]["a"].model, "pf_msmtrec")
    for vecs in rec.vectors:
        assert {len(v) for v in vecs.values()} == {dim + 1}
        assert not vecs["c"].any()  # the skipped scenario sends zeros with weight 0
    assert set(out["markets"]["b"]) == {"ctr", "ctcvr"}


def test_federated_method_needs_a_secure_sum(scenarios):
    with pytest.raises(ConfigError):
        run_pf_method("fedavg", scenarios, SMALL, rounds=1, seed=0, secure_sum=None)
    with pytest.raises(ConfigError):
        run_pf_method("nope", scenarios, SMALL, rounds=1, seed=0, secure_sum=None)


def test_pf_settings_errors_name_the_field():
    for raw, field in [({"dim": 0}, "pf.dim"), ({"alpha_grid": [1.5]}, "pf.alpha_grid"),
                       ({"bogus": 1}, "pf.bogus"), ({"methods": ["fedmm"]}, "pf.methods"),
                       ({"lr": -1}, "pf.lr"), ({"select_by": "x"}, "pf.select_by"),
                       ({"train_from": "x"}, "pf.train_from"), ({"alpha_memory": 1.0}, "pf.alpha_memory"),
                       ({"alpha_by": "x"}, "pf.alpha_by"), ({"calibrate": 1}, "pf.calibrate"),
                       ({"max_steps_per_epoch": 0}, "pf.max_steps_per_epoch"),
                       ({"max_steps_per_epoch": "64"}, "pf.max_steps_per_epoch")]:
        with pytest.raises(ConfigError) as e:
            pf_run.pf_settings(raw)
        assert e.value.field == field


# ----------------------------------------------------------------------------- end to end
def test_private_masked_run_reports_every_scenario_and_task(tmp_path, monkeypatch):
    recorded: dict[str, list] = {}

    class Recording(EmbeddedSecureSum):
        def secure_sum(self, *, label, round_id, vectors, max_abs):
            recorded.setdefault(self.run_id, []).append({m: np.array(v) for m, v in vectors.items()})
            return super().secure_sum(label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)

    monkeypatch.setattr(pf_run, "EmbeddedSecureSum", Recording)
    cfg = config_from_dict({
        "seed": 1, "rounds": 2, "secagg": "masking", "model_family": "pf-msmtrec",
        "privacy": {"enabled": True, "epsilon": 8.0},
        "pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4, "batch_size": 32,
               "methods": ["local", "fedavg", "pf_msmtrec"],
               "data": {"scenarios": [{"name": s.name, "n_users": s.n_users, "n_items": s.n_items,
                                       "impressions_per_user": s.impressions_per_user} for s in TINY]}}})
    res = pf_run.run_pf_experiment(cfg, out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["model_family"] == "pf-msmtrec" and on_disk["methods"] == ["local", "fedavg", "pf_msmtrec"]
    for m in ("a", "b", "c"):
        for meth in ("local", "fedavg", "pf_msmtrec"):
            for task in ("ctr", "ctcvr"):
                v = on_disk["markets"][m][meth][task]
                assert 0.0 <= v["auc"] <= 1.0 and v["logloss"] > 0
    assert set(on_disk["summary"]["pf_msmtrec"]) >= {"mean_ctcvr_auc", "mean_ctr_auc"}
    assert on_disk["secagg"]["backend"] == "masking" and on_disk["secagg"]["secure"]
    for m, p in on_disk["privacy"].items():
        # 2 training rounds; then per round 3 alpha choices (experts, two towers), the final
        # round's checkpoint comparison and one Platt fit per task: each a ledger round of this
        # scenario's validation releases.
        assert 0 < p["epsilon"] <= 8.0 * 1.01 and len(p["epsilon_per_round"]) == 2 + 2 * 3 + 1 + 2
        assert p["validation"]["releases_used"] == 2 * 3 * len(PFSettings().alpha_grid) + 1 + 2 * 3
    assert (tmp_path / "ledger.sqlite").exists() and "CTCVR" in (tmp_path / "report.md").read_text()
    # No clipping norm configured: the family default is used and written out explicitly.
    assert on_disk["config"]["privacy"]["max_grad_norm"] == DEFAULT_MAX_GRAD_NORM["pf-msmtrec"] == 2.0
    assert json.loads((tmp_path / "config.json").read_text())["privacy"]["max_grad_norm"] == 2.0
    # What crossed the boundary: only template-shared parameters (+ the weight), every round.
    assert res["summary"].keys() == on_disk["summary"].keys()
    data = generate_scenarios(ScenarioConfig(scenarios=TINY), seed=1)
    settings_ = pf_run.pf_settings(cfg.pf)[0]
    for method in ("fedavg", "pf_msmtrec"):
        model = make_client(data[0], settings_, METHODS[method], weight=1.0,
                            generator=torch.Generator().manual_seed(0)).model
        rounds = recorded[f"pf-1-{method}"]
        assert len(rounds) == 2
        for vecs in rounds:
            assert {len(v) for v in vecs.values()} == {_independent_shared_size(model, method) + 1}
    assert "pf-1-local" not in recorded  # the local baseline never aggregates


def test_no_raw_data_step_bypasses_the_trainer_factory(scenarios):
    """Every optimisation step on training rows goes through the TrainerFactory (the privacy
    session in a private run): with a factory whose trainers do nothing, no parameter that only
    local training could move (ID embeddings, scenario-specific experts, norms, gates) moves."""
    calls = []

    class Idle:
        def train_epochs(self, epochs):
            return 0

    def idle_factory(*, market, stage, model, loss_fn, n_records, users, settings, generator):
        calls.append((market, stage))
        return Idle()

    torch.manual_seed(0)
    fresh = {m.name: _client(m, seed=i) for i, m in enumerate(scenarios)}
    before = {m: {n: p.detach().clone() for n, p in c.model.named_parameters()} for m, c in fresh.items()}
    out = run_pf_method("pf_msmtrec", scenarios, SMALL, rounds=2, seed=0, secure_sum=_RecordingSum([]),
                        trainers=idle_factory)
    assert sorted(calls) == sorted([(m.name, "mmoe") for m in scenarios] * 2)
    for m, c in out["clients"].items():
        params = dict(c.model.named_parameters())
        for n in c.plan.local:
            torch.testing.assert_close(params[n], before[m][n], rtol=0, atol=0)


def test_private_run_over_ckks(tmp_path):
    cfg = config_from_dict({
        "seed": 0, "rounds": 1, "secagg": "ckks", "model_family": "pf-msmtrec",
        "privacy": {"enabled": True, "epsilon": 4.0},
        "pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4, "batch_size": 32,
               "methods": ["pf_msmtrec"],
               "data": {"scenarios": [{"name": s.name, "n_users": s.n_users, "n_items": s.n_items,
                                       "impressions_per_user": s.impressions_per_user} for s in TINY[:2]]}}})
    res = pf_run.run_pf_experiment(cfg, out_dir=tmp_path)
    assert res["secagg"]["backend"] == "ckks" and res["secagg"]["aggregations"] == 1
    assert res["secagg"]["max_abs_error_vs_plain"] < 1e-6
    assert set(res["markets"]["a"]["pf_msmtrec"]) == {"ctr", "ctcvr"}
    assert all(0 < p["epsilon"] <= 4.0 * 1.01 for p in res["privacy"].values())


def test_tracked_personal_side_is_previous_mix_plus_own_update(scenarios):
    """train_from="tracked": the local side of the mix is the client's previous personalized
    shared parameters plus this round's own update (not the freshly trained parameters)."""
    c = make_client(scenarios[1], SMALL, METHODS["pf_msmtrec"], weight=1.0, generator=torch.Generator().manual_seed(0))
    dim = c.plan.dim
    c.global_vec = np.zeros(dim)
    c.personal_vec = np.full(dim, 0.3)
    start = np.zeros(dim)
    c.load_shared(np.full(dim, 0.1))                     # trained from start: own update = 0.1
    total = np.concatenate([np.zeros(dim), [1.0]])      # the global model does not move
    client_receive(c, METHODS["pf_msmtrec"], total, (0.0,), start=start)   # alpha 0: keep the local side
    np.testing.assert_allclose(c.shared_vector(), np.full(dim, 0.4), atol=1e-6)
    np.testing.assert_allclose(c.personal_vec, np.full(dim, 0.4), atol=1e-6)
    client_receive(c, METHODS["pf_msmtrec"], total, (1.0,), start=c.shared_vector())   # alpha 1: global
    np.testing.assert_allclose(c.shared_vector(), np.zeros(dim), atol=1e-6)


def test_private_run_with_sparse_embedding_noise_records_the_split(tmp_path, monkeypatch):
    # PF-MSMTrec's MMoE trains through the same privacy session: with sparse embedding noise its
    # DP steps go through the selection mechanism and the split is what the run reports.
    from fedmm_secure.privacy.sparse_noise import SparseEmbeddingNoise

    calls = []
    real = SparseEmbeddingNoise.apply_

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SparseEmbeddingNoise, "apply_", spy)
    cfg = config_from_dict({
        "seed": 0, "rounds": 1, "secagg": "masking", "model_family": "pf-msmtrec",
        "privacy": {"enabled": True, "epsilon": 4.0, "randomness": "reproducible", "embedding_noise": "sparse",
                    "sparse_selection_share": 0.3, "sparse_threshold": 2.0},
        "pf": {"dim": 4, "n_experts": 2, "expert_hidden": [6], "tower_hidden": 4, "batch_size": 32,
               "methods": ["pf_msmtrec"],
               "data": {"scenarios": [{"name": s.name, "n_users": s.n_users, "n_items": s.n_items,
                                       "impressions_per_user": s.impressions_per_user} for s in TINY[:2]]}}})
    res = pf_run.run_pf_experiment(cfg, out_dir=tmp_path)
    assert calls, "no DP step went through the sparse mechanism"
    for p in res["privacy"].values():
        split = p["embedding_noise"]
        assert split["mode"] == "sparse" and split["threshold"] == 2.0
        s1, s2 = split["selection_noise_multiplier"], split["gradient_noise_multiplier"]
        assert abs((s1 ** -2 + s2 ** -2) ** -0.5 - p["noise_multiplier"]) <= 1e-9 * p["noise_multiplier"]
        assert 0 < p["epsilon"] <= 4.0 * 1.01
