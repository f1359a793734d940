"""Private use of validation rows: the statistics' sensitivity bounds, the noise and its scale,
the private Platt fit, and the session's accounting of every release on the ledger."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.data.market import MarketSplit
from fedmm_secure.errors import BudgetExceededError
from fedmm_secure.models.calibration import PlattScaling, fit_platt
from fedmm_secure.privacy.accountant import make_accountant
from fedmm_secure.privacy.budget import BudgetPolicy
from fedmm_secure.privacy.events import SubsampledGaussianEvent
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.randomness import SecureRandom
from fedmm_secure.privacy.session import MarketPlan, PrivacySession
from fedmm_secure.privacy.validation import (
    LOGIT_BOUND, PLATT_SENSITIVITY, VALIDATION_SHARE, ValidationAccess, brier_rows, difference_sum,
    noisy_difference, platt_statistics, private_platt, unit_index,
)


def _private(sigma: float, seed: int | None = 0) -> ValidationAccess:
    source = SecureRandom() if seed is None else torch.Generator().manual_seed(seed)
    return ValidationAccess("private", sigma, source)


# -- sensitivity: one unit moves each statistic by at most the bound the noise is scaled to ------
units_rows = st.lists(st.integers(1, 4), min_size=2, max_size=25)   # rows per unit


def _rows(draw_sizes: list[int], data) -> tuple[np.ndarray, np.ndarray]:
    index = np.repeat(np.arange(len(draw_sizes)), draw_sizes)
    return index, data


@settings(max_examples=60, deadline=None)
@given(sizes=units_rows, seed=st.integers(0, 2**31 - 1), drop=st.integers(0, 24))
def test_selection_statistic_moves_at_most_one_per_unit(sizes, seed, drop):
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(len(sizes)), sizes)
    y = rng.integers(0, 2, len(index)).astype(float)
    a, b = brier_rows(y, rng.random(len(index))), brier_rows(y, rng.random(len(index)))
    full = difference_sum(a, b, index, len(sizes))
    gone = drop % len(sizes)
    keep = index != gone
    sub_index, n = unit_index(MarketSplit(index[keep], index[keep], y[keep], y[keep]), "user")
    assert abs(full - difference_sum(a[keep], b[keep], sub_index, n)) <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(sizes=units_rows, seed=st.integers(0, 2**31 - 1), drop=st.integers(0, 24),
       a=st.floats(-20, 20), b=st.floats(-20, 20))
def test_platt_statistic_moves_at_most_its_sensitivity_per_unit(sizes, seed, drop, a, b):
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.uniform(-1, 1, len(index))
    x[rng.random(len(index)) < 0.3] = rng.choice([-1.0, 1.0])   # the bound's extreme rows
    y = rng.integers(0, 2, len(index)).astype(float)
    full = platt_statistics(x, y, a, b, index, len(sizes))
    keep = index != drop % len(sizes)
    _, sub_index = np.unique(index[keep], return_inverse=True)
    part = platt_statistics(x[keep], y[keep], a, b, sub_index, len(sizes) - 1)
    assert np.linalg.norm(full - part) <= PLATT_SENSITIVITY + 1e-12


def test_units_group_validation_rows_as_the_run_groups_training_rows():
    split = MarketSplit(users=np.array([7, 7, 3, 3, 3]), items=np.arange(5), click=np.zeros(5, np.float32),
                        conversion=np.zeros(5, np.float32), interaction=np.array([0, 0, 1, 1, 2]))
    assert unit_index(split, "record")[1] == 5
    assert unit_index(split, "interaction")[1] == 3
    idx, n = unit_index(split, "user")
    assert n == 2 and idx[0] == idx[1] != idx[2]


# -- the noise is there, at the claimed scale ---------------------------------------------------------
def test_selection_noise_has_the_claimed_scale():
    rng = np.random.default_rng(1)
    n = 50
    index = np.arange(n)
    same = rng.random(n)
    # Identical candidates: the noiseless difference is 0, so n * output is pure noise of std sigma.
    draws = np.array([noisy_difference(same, same, index, n, _private(3.0, seed=i)) * n for i in range(3000)])
    assert abs(draws.mean()) < 0.2
    assert draws.std() == pytest.approx(3.0, rel=0.05)


def test_two_secure_releases_differ():
    rng = np.random.default_rng(2)
    a, b = rng.random(100), rng.random(100)
    index = np.arange(100)
    assert noisy_difference(a, b, index, 100, _private(1.0, None)) != noisy_difference(a, b, index, 100,
                                                                                       _private(1.0, None))


# -- private Platt ---------------------------------------------------------------------------------
def _platt_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * z - 0.7)))).astype(float)
    return z, y


def test_private_platt_with_little_noise_finds_the_maximum_likelihood_map():
    z, y = _platt_data(20_000)
    assert np.abs(z).max() < LOGIT_BOUND + 3   # nearly all logits inside the fit's public bound
    exact = fit_platt(z, y)
    priv = private_platt(z, y, np.arange(len(z)), len(z), _private(1e-6), steps=8)
    assert priv.scale == pytest.approx(exact.scale, abs=0.03)
    assert priv.shift == pytest.approx(exact.shift, abs=0.03)


def test_private_platt_noise_moves_the_map_and_a_refusal_leaves_the_identity():
    z, y = _platt_data(500)
    index = np.arange(len(z))
    fits = {private_platt(z, y, index, len(z), _private(5.0, seed=s)) for s in range(5)}
    assert len(fits) == 5 and all(f.scale > 0 for f in fits)
    assert private_platt(z, y, index, len(z), ValidationAccess("refused")) == PlattScaling()


# -- the session: every release on the ledger, budget first ---------------------------------------------
def _session(tmp_path, *, releases=4, target=4.0, policy=None, noise_multiplier=None):
    plans = {"m": MarketPlan("m", 0.05, {"ctr": 40}, 2)}
    led = Ledger.open(tmp_path / "ledger.sqlite", run_config={"t": 1}, create=True)
    s = PrivacySession(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=noise_multiplier,
                       target_epsilon=None if noise_multiplier else target, accountant="pld", policy=policy,
                       ledger=led, randomness="secure", validation_releases={"m": releases})
    return s, led


def test_the_target_covers_training_and_validation_releases(tmp_path):
    s, led = _session(tmp_path)
    train = SubsampledGaussianEvent(0.05, s.noise_multipliers["m"], 80)
    valid = SubsampledGaussianEvent(1.0, s.validation_noise_multipliers["m"], 4)
    acc = make_accountant("pld")
    assert 0.97 * 4.0 < acc.predict_epsilon([train, valid], 1e-5) <= 4.0
    # The validation releases alone get the documented share.
    assert acc.predict_epsilon([valid], 1e-5) == pytest.approx(VALIDATION_SHARE * 0.99 * 4.0, rel=0.02)
    led.close()


def test_each_release_is_on_the_ledger_before_its_noise(tmp_path):
    s, led = _session(tmp_path)
    access = s.validation_access("m", "calibrate", 3)
    assert access.mode == "private" and access.noise_multiplier == s.validation_noise_multipliers["m"]
    (event,) = led.spent_events()["m"]
    assert event == SubsampledGaussianEvent(1.0, s.validation_noise_multipliers["m"], 3, "record")
    assert led.rounds()[-1].status == "committed"
    assert led.epsilons("m")[-1].epsilon == pytest.approx(s.accountants["m"].get_epsilon(1e-5))
    assert s.summary()["m"]["validation"]["releases_used"] == 3
    s.validation_access("m", "ctr-select", 1)
    with pytest.raises(BudgetExceededError):   # beyond the planned count: the target would not hold
        s.validation_access("m", "ctr-select", 1)
    led.close()


def test_budget_refuses_a_release_and_records_why(tmp_path):
    s, led = _session(tmp_path, noise_multiplier=0.5,
                      policy=BudgetPolicy(epsilon_budget=0.01, delta=1e-5, on_exceed="skip"))
    access = s.validation_access("m", "ctr-select", 1)
    assert access.mode == "refused" and "budget" in access.reason
    assert not led.spent_events().get("m") and led.skips() and s.skipped["m"][0]["stage"] == "ctr-select"
    assert s.accountants["m"].steps == 0
    led.close()


def test_budget_stop_halts_the_run_with_the_refusal_on_record(tmp_path):
    s, led = _session(tmp_path, noise_multiplier=0.5,
                      policy=BudgetPolicy(epsilon_budget=0.01, delta=1e-5, on_exceed="stop"))
    with pytest.raises(BudgetExceededError):
        s.validation_access("m", "calibrate", 3)
    assert [d.allowed for d in led.decisions()] == [False] and not led.spent_events().get("m")
    led.close()


def test_a_session_without_planned_releases_reads_nothing(tmp_path):
    s, led = _session(tmp_path, releases=0)
    assert s.validation_access("m", "ctr-select", 1).mode == "refused"
    assert led.rounds() == [] and s.accountants["m"].steps == 0
    led.close()
