"""make_private: the one-call DP-SGD entry point for a user's own model."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmm_secure.errors import BudgetExceededError, ConfigError
from fedmm_secure.privacy.dpsgd import AccountingBypassError, dp_train_epoch
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.private import make_private
from fedmm_secure.privacy.randomness import SecureRandom

N, D = 240, 5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(N, generator=g) > 0).float()
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))


def _loss(model, batch):
    xb, yb = batch
    return F.binary_cross_entropy_with_logits(model(xb).squeeze(-1), yb, reduction="none")


def _dp_accounting_epsilon(q, sigma, steps, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_reaches_the_target_epsilon_and_reports_what_ran(tmp_path):
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Ledger.open(tmp_path, run_config={"what": "make_private test"}, create=True) as ledger:
        trainer, privacy = make_private(model, opt, loss_fn=_loss, data_size=N, batch_size=24, epochs=3,
                                        target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, ledger=ledger)
        plan = privacy.plan
        assert isinstance(trainer.generator, SecureRandom) and plan.randomness == "secure"
        draws = []
        for _ in range(plan.epochs):
            dp_train_epoch(trainer, lambda idx: (draws.append(idx), (x[idx], y[idx]))[1])
        # What ran is what was planned and reported.
        assert trainer.steps_taken == plan.total_steps == privacy.steps_accounted == 3 * 10
        assert trainer.sample_rate == plan.sample_rate == pytest.approx(24 / N)
        assert sum(e.steps for e in ledger.events_for("local")) == plan.total_steps
        # Within 1% of the target, never above, and so says dp-accounting, computed independently.
        eps = privacy.epsilon()
        assert 0.99 * 2.0 <= eps <= 2.0
        ref = _dp_accounting_epsilon(plan.sample_rate, plan.noise_multiplier, trainer.steps_taken, 1e-5)
        assert ref == pytest.approx(2.0, rel=0.01)
        # A step beyond the plan is refused before it changes the model.
        before = [p.detach().clone() for p in model.parameters()]
        draw = trainer.sample()
        with pytest.raises(BudgetExceededError, match="planned"):
            trainer.step((x[draw.indices], y[draw.indices]), draw=draw)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
        assert privacy.steps_accounted == plan.total_steps


def test_refuses_an_optimizer_step_outside_the_trainer():
    x, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    make_private(model, opt, loss_fn=_loss, data_size=N, batch_size=24, epochs=1,
                 target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    _loss(model, (x, y)).mean().backward()
    with pytest.raises(AccountingBypassError):
        opt.step()


def test_dangerous_parameters_are_keyword_only_without_defaults():
    params = inspect.signature(make_private).parameters
    for name in ("target_epsilon", "delta", "max_grad_norm", "data_size", "batch_size", "epochs", "loss_fn"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is inspect.Parameter.empty, name


@pytest.mark.parametrize("bad", [{"target_epsilon": 0}, {"delta": 1.5}, {"max_grad_norm": float("inf")},
                                 {"batch_size": 0}, {"unit": "market"}, {"unit": "user"},
                                 {"unit": "interaction"},
                                 {"unit": "interaction", "interaction_of_record": torch.zeros(N)},
                                 {"unit": "record", "interaction_of_record": torch.zeros(N, dtype=torch.long)},
                                 {"unit": "user", "user_of_record": torch.zeros(N, dtype=torch.long),
                                  "interaction_of_record": torch.zeros(N, dtype=torch.long)}])
def test_invalid_settings_are_refused(bad):
    kwargs = dict(loss_fn=_loss, data_size=N, batch_size=24, epochs=1, target_epsilon=2.0, delta=1e-5,
                  max_grad_norm=1.0)
    kwargs.update(bad)
    model = _model()
    with pytest.raises(ConfigError):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_user_level_and_reproducible_mode():
    x, y = _data()
    users = torch.arange(N) // 4   # 60 users, 4 records each
    model = _model()
    trainer, privacy = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_loss,
                                    data_size=N, batch_size=24, epochs=1, target_epsilon=3.0, delta=1e-5,
                                    max_grad_norm=1.0, unit="user", user_of_record=users,
                                    generator=torch.Generator().manual_seed(0))
    assert privacy.plan.unit == trainer.unit == "user" and privacy.plan.randomness == "reproducible"
    dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]))
    assert trainer.steps_taken == privacy.plan.total_steps
    assert privacy.epsilon() <= 3.0


def test_interaction_level_samples_and_clips_whole_interactions(tmp_path):
    # Implicit feedback: one positive and its 4 sampled negatives come from one interaction.
    x, y = _data()
    interactions = torch.arange(N) // 5
    model = _model()
    with Ledger.open(tmp_path, run_config={"example": "interaction"}, create=True) as ledger:
        trainer, privacy = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_loss,
                                        data_size=N, batch_size=30, epochs=2, target_epsilon=4.0, delta=1e-5,
                                        max_grad_norm=1.0, unit="interaction",
                                        interaction_of_record=interactions, ledger=ledger)
        assert privacy.plan.unit == trainer.unit == "interaction"
        for _ in range(3):
            draw = trainer.sample()
            # every sampled interaction comes with all five of its records, as one clipped unit
            counts = torch.bincount(interactions[draw.indices], minlength=N // 5)
            assert set(counts.tolist()) <= {0, 5}
            assert draw.unit == "interaction" and draw.num_units == int((counts > 0).sum())
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]))
        units = {e.event.unit for e in ledger.event_records()}
    assert units == {"interaction"}
    # The epsilon the ledger holds is the accountant's for the plan, checked independently.
    ref = _dp_accounting_epsilon(privacy.plan.sample_rate, privacy.plan.noise_multiplier,
                                 trainer.steps_taken, 1e-5)
    assert privacy.epsilon() == pytest.approx(ref, rel=0.01)
