"""The privacy session wired into FedMM: every raw-data step is on the books, market-level upload
noise has the stated scale, budgets skip markets."""

import numpy as np
import pytest

from fedmm_secure.config import ModelConfig
from fedmm_secure.data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from fedmm_secure.federation import fedmm
from fedmm_secure.federation.training import PlainTrainer
from fedmm_secure.privacy.budget import BudgetPolicy
from fedmm_secure.privacy.session import PrivacySession, plan_markets
from fedmm_secure.runtime.embedded import EmbeddedSecureSum

SPECS = (MarketSpec("a", 80, 40, 8), MarketSpec("b", 50, 30, 6))
MODEL = ModelConfig(vq_epochs=1, cf_dim=8, latent_dim=4, n_global=8, n_local=4, ctr_dim=8, ctr_hidden=(8,),
                    batch_size=32)


STAGED = ModelConfig(**{**MODEL.__dict__, "design": "staged"})


def _session(markets, epochs=None, **kw):
    epochs = epochs or {"cf": MODEL.cf_epochs, "ctr": MODEL.ctr_epochs}
    plans = plan_markets(unit="record", batch_size=MODEL.batch_size, epochs=epochs,
                         rounds=2, n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets})
    args = dict(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0, target_epsilon=None,
                accountant="pld", policy=None, ledger=None, randomness="secure")
    args.update(kw)
    return PrivacySession(**args), plans


@pytest.fixture(scope="module")
def markets():
    return generate_markets(SyntheticConfig(markets=SPECS), seed=0)


@pytest.mark.parametrize("design,method,epochs,ledger_rounds", [
    ("staged", "fedmm", {"cf": 1, "ctr": 2}, 4),     # 2 CF rounds + 2 CTR rounds
    ("joint", "fedmm", {"ctr": 2}, 2),               # one DP stage: the CTR model
    ("joint", "fedavg", {"ctr": 2}, 2),
    ("joint", "local_codes", {"ctr": 2}, 2),
])
def test_every_raw_data_step_is_accounted(markets, monkeypatch, design, method, epochs, ledger_rounds):
    session, plans = _session(markets, epochs)
    model = ModelConfig(**{**MODEL.__dict__, "design": design})
    taken = {m.name: 0 for m in markets}
    real = session.__class__.__call__

    def counting(self, **kw):
        trainer = real(self, **kw)
        inner = trainer.train_epochs

        def train_epochs(epochs, m=kw["market"]):
            steps = inner(epochs)
            taken[m] += steps
            return steps
        trainer.train_epochs = train_epochs
        return trainer

    monkeypatch.setattr(session.__class__, "__call__", counting)
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fedmm.run_method(method, markets, model, rounds=2, seed=0, secure_sum=ss, trainers=session, hooks=session)
    for m in markets:
        assert taken[m.name] == plans[m.name].total_steps > 0
        assert session.accountants[m.name].steps == taken[m.name]
        assert len(session.epsilon_per_round[m.name]) == ledger_rounds


@pytest.mark.parametrize("model,method", [(STAGED, "local_codes"), (MODEL, "local_codes"), (MODEL, "fedavg"),
                                          (MODEL, "fedmm")])
def test_plain_trainer_is_never_used_for_a_private_run(markets, monkeypatch, model, method):
    # A raw-data step that bypasses the accountant (a plain optimiser loop instead of the
    # session's DP trainer) makes this fail.
    session, _ = _session(markets, {"ctr": 1} if model.design == "joint" else None)

    def refuse(*a, **k):
        raise AssertionError("a non-private trainer ran in a private run")

    monkeypatch.setattr(PlainTrainer, "train_epochs", refuse)
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fedmm.run_method(method, markets, model, rounds=1, seed=0, secure_sum=ss, trainers=session, hooks=session)


def test_budget_skips_markets_and_says_why(markets):
    session, _ = _session(markets, policy=BudgetPolicy(epsilon_budget=0.5, delta=1e-5, on_exceed="skip"))
    fedmm.run_method("local", markets, STAGED, rounds=2, seed=0, secure_sum=None, trainers=session, hooks=session)
    for m in markets:
        assert session.accountants[m.name].get_epsilon(1e-5) <= 0.5
        assert session.skipped[m.name] and "budget" in session.skipped[m.name][0]["reason"]


def test_market_level_noise_share_has_the_stated_scale(markets):
    rng = np.random.default_rng(0)
    session, _ = _session(markets, market_noise_multiplier=2.0, upload_rng=rng)
    bounds = np.full(10_000, 0.5)
    delta_l2 = np.linalg.norm(bounds)
    shares = [session.perturb_upload("x", 0, m.name, np.zeros_like(bounds), bounds) for m in markets]
    # t = n - n//3 = 2 honest markets: the sum of their shares has std z * sensitivity.
    total = sum(shares)
    assert abs(total.std() / (2.0 * delta_l2) - 1) < 0.03
    assert np.all(session.upload_bounds("x", bounds) > np.abs(shares).max())
    rep = session.market_level_summary()
    assert rep["secure_sums"] == 1 and rep["epsilon"] > 0


def test_market_noise_requires_an_rng(markets):
    from fedmm_secure.errors import ConfigError
    with pytest.raises(ConfigError):
        _session(markets, market_noise_multiplier=1.0)


@pytest.mark.parametrize("model,epochs", [(STAGED, None), (MODEL, {"ctr": 2})])
def test_calibrated_run_never_reports_more_than_the_target(markets, model, epochs):
    session, _ = _session(markets, epochs, noise_multiplier=None, target_epsilon=2.0)
    fedmm.run_method("local_codes", markets, model, rounds=2, seed=0, secure_sum=None, trainers=session,
                     hooks=session)
    for m in markets:
        eps = session.accountants[m.name].get_epsilon(1e-5)
        assert 1.9 < eps <= 2.0


def test_one_budget_fedmm_spends_what_local_spends_recomputed_independently(markets):
    # Joint design: FedMM's only raw-data stage is the CTR model, so its plan, and so its
    # epsilon, equals `local`'s; recompute it from (q, sigma, steps) with a fresh accountant.
    from fedmm_secure.config import PrivacyConfig, RunConfig
    from fedmm_secure.federation.fedmm.privacy import privacy_session
    from fedmm_secure.privacy.accountant import make_accountant
    from fedmm_secure.privacy.events import SubsampledGaussianEvent

    cfg = RunConfig(rounds=2, model=MODEL, privacy=PrivacyConfig(enabled=True, epsilon=3.0))
    spent = {}
    for i, method in enumerate(("local", "fedmm")):
        session = privacy_session(cfg, markets, method=method, ledger=None, method_index=i)
        ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
        fedmm.run_method(method, markets, MODEL, rounds=2, seed=0, secure_sum=ss if method == "fedmm" else None,
                         trainers=session, hooks=session)
        assert set(session.plans[markets[0].name].steps_per_round) == {"ctr"}
        spent[method] = {}
        for m in markets:
            plan, acc = session.plans[m.name], make_accountant("pld")
            acc.compose(SubsampledGaussianEvent(plan.sample_rate, session.noise_multipliers[m.name],
                                                plan.total_steps, "record"))
            # The validation releases (selection, calibration) are on the same books.
            used = session.validation_used[m.name]
            assert used == session.validation_releases[m.name] > 0
            acc.compose(SubsampledGaussianEvent(1.0, session.validation_noise_multipliers[m.name], used, "record"))
            eps = session.accountants[m.name].get_epsilon(1e-5)
            assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
            assert eps <= 3.0
            spent[method][m.name] = eps
    # Both calibrated to the same target (FedMM compares more candidates: its DP-SGD noise is a
    # little larger), so both end just under it.
    assert spent["fedmm"] == pytest.approx(spent["local"], rel=0.01)
