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


def _session(markets, **kw):
    plans = plan_markets(unit="record", batch_size=MODEL.batch_size, epochs={"cf": MODEL.cf_epochs, "ctr": MODEL.ctr_epochs},
                         rounds=2, n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets})
    args = dict(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0, target_epsilon=None,
                accountant="pld", policy=None, ledger=None, randomness="secure")
    args.update(kw)
    return PrivacySession(**args), plans


@pytest.fixture(scope="module")
def markets():
    return generate_markets(SyntheticConfig(markets=SPECS), seed=0)


def test_every_raw_data_step_is_accounted(markets, monkeypatch):
    session, plans = _session(markets)
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
    fedmm.run_method("fedmm", markets, MODEL, rounds=2, seed=0, secure_sum=ss, trainers=session, hooks=session)
    for m in markets:
        assert taken[m.name] == plans[m.name].total_steps > 0
        assert session.accountants[m.name].steps == taken[m.name]
        assert len(session.epsilon_per_round[m.name]) == 4  # 2 CF rounds + 2 CTR rounds


def test_plain_trainer_is_never_used_for_a_private_run(markets, monkeypatch):
    session, _ = _session(markets)

    def refuse(*a, **k):
        raise AssertionError("a non-private trainer ran in a private run")

    monkeypatch.setattr(PlainTrainer, "train_epochs", refuse)
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fedmm.run_method("local_codes", markets, MODEL, rounds=1, seed=0, secure_sum=ss, trainers=session, hooks=session)


def test_budget_skips_markets_and_says_why(markets):
    session, _ = _session(markets, policy=BudgetPolicy(epsilon_budget=0.5, delta=1e-5, on_exceed="skip"))
    fedmm.run_method("local", markets, MODEL, rounds=2, seed=0, secure_sum=None, trainers=session, hooks=session)
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


def test_calibrated_run_never_reports_more_than_the_target(markets):
    session, _ = _session(markets, noise_multiplier=None, target_epsilon=2.0)
    fedmm.run_method("local_codes", markets, MODEL, rounds=2, seed=0, secure_sum=None, trainers=session,
                     hooks=session)
    for m in markets:
        eps = session.accountants[m.name].get_epsilon(1e-5)
        assert 1.9 < eps <= 2.0
