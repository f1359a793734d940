"""Budget policy: pure decisions over an accountant's prediction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import BudgetExceededError, ConfigError
from fedmm_secure.privacy.accountant import make_accountant
from fedmm_secure.privacy.budget import BudgetPolicy, Decision
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev

ROUND = [Ev(0.05, 1.0, 50)]


def acc_after(rounds: int, name: str = "pld"):
    a = make_accountant(name)
    for _ in range(rounds):
        a.compose(ROUND[0])
    return a


def test_allows_within_budget_without_mutating():
    a = acc_after(1)
    d = BudgetPolicy(epsilon_budget=50.0, delta=1e-5, on_exceed="skip").decide(a, ROUND, market="DE")
    assert isinstance(d, Decision) and d.allowed
    assert d.epsilon_if_run == pytest.approx(a.predict_epsilon(ROUND, 1e-5))
    assert a.steps == 50  # decide never spends
    assert "DE" in d.reason and d.certified


def test_skip_policy_refuses_with_reason():
    a = acc_after(2)
    spent = a.get_epsilon(1e-5)
    budget = (spent + a.predict_epsilon(ROUND, 1e-5)) / 2  # between now and after the round
    d = BudgetPolicy(epsilon_budget=budget, delta=1e-5, on_exceed="skip").decide(a, ROUND)
    assert not d.allowed
    assert d.epsilon_if_run > budget
    assert "would reach" in d.reason
    assert a.steps == 100


def test_stop_policy_raises_and_carries_the_decision():
    a = acc_after(2)
    with pytest.raises(BudgetExceededError) as err:
        BudgetPolicy(epsilon_budget=0.01, delta=1e-5, on_exceed="stop").decide(a, ROUND)
    assert err.value.decision.allowed is False


def test_exact_budget_boundary_is_allowed():
    a = acc_after(1)
    e = a.predict_epsilon(ROUND, 1e-5)
    assert BudgetPolicy(epsilon_budget=e, delta=1e-5, on_exceed="stop").decide(a, ROUND).allowed


def test_rdp_decisions_are_flagged_uncertified():
    d = BudgetPolicy(epsilon_budget=50.0, delta=1e-5, on_exceed="skip").decide(acc_after(1, "rdp"), ROUND)
    assert d.allowed and d.certified is False


@pytest.mark.parametrize("kwargs", [
    dict(epsilon_budget=0.0, delta=1e-5, on_exceed="skip"),
    dict(epsilon_budget=float("inf"), delta=1e-5, on_exceed="skip"),
    dict(epsilon_budget=1.0, delta=0.0, on_exceed="skip"),
    dict(epsilon_budget=1.0, delta=1e-5, on_exceed="warn"),
    dict(epsilon_budget=True, delta=1e-5, on_exceed="skip"),
])
def test_invalid_policies(kwargs):
    with pytest.raises(ConfigError):
        BudgetPolicy(**kwargs)


def test_policy_fields_are_keyword_only():
    with pytest.raises(TypeError):
        BudgetPolicy(1.0, 1e-5, "skip")  # type: ignore[misc]


@settings(max_examples=6, deadline=None)
@given(rounds=st.integers(0, 6), budget=st.floats(0.05, 3.0))
def test_decision_matches_prediction_vs_budget(rounds, budget):
    a = acc_after(rounds)
    d = BudgetPolicy(epsilon_budget=budget, delta=1e-5, on_exceed="skip").decide(a, ROUND)
    assert d.allowed == (a.predict_epsilon(ROUND, 1e-5) <= budget)


def test_check_spent():
    a = acc_after(3)
    pol = BudgetPolicy(epsilon_budget=a.get_epsilon(1e-5) * 1.01, delta=1e-5, on_exceed="skip")
    assert pol.check_spent(a).allowed
    a.compose(ROUND[0])
    assert not pol.check_spent(a).allowed


def test_round_loop_with_ledger_never_exceeds_budget(tmp_path):
    """The wiring the federation loop uses: decide -> (skip | events -> epsilon) -> commit."""
    from fedmm_secure.privacy.ledger import Ledger

    markets = {"rich": Ev(0.01, 1.0, 40), "sparse": Ev(0.08, 1.0, 40)}  # sparse spends faster
    policy = BudgetPolicy(epsilon_budget=1.5, delta=1e-5, on_exceed="skip")
    led = Ledger.open(tmp_path / "run", run_config={"budget": 1.5}, create=True)
    accs = {m: make_accountant("pld") for m in markets}
    for r in range(12):
        led.record_round_start(r, list(markets))
        for m, ev in markets.items():
            d = policy.decide(accs[m], [ev], market=m)
            led.record_decision(m, r, d)
            if not d.allowed:
                led.record_skip(m, r, d.reason)
                continue
            led.record_event(m, r, ev)
            accs[m].compose(ev)
            led.record_epsilon(m, r, accs[m].get_epsilon(1e-5), 1e-5, "pld")
        led.commit_round(r)
    spent = led.spent()
    assert all(rep.epsilon <= 1.5 for rep in spent.values())
    skipped = {m for _, m, _ in led.skips()}
    assert "sparse" in skipped and "rich" not in skipped
    # Rebuilt on another grid: both are certified upper bounds, equal to within the slack.
    assert spent["rich"].epsilon == pytest.approx(accs["rich"].get_epsilon(1e-5), rel=5e-3)
