"""Large markets get large batches: the steps-per-epoch cap of the Poisson sample rate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmm_secure.config import ModelConfig, RunConfig
from fedmm_secure.errors import ConfigError
from fedmm_secure.federation.training import PlainTrainer, TrainSettings, sample_rate_for
from fedmm_secure.privacy.sampling import capped_sample_rate
from fedmm_secure.privacy.session import plan_markets


@given(q=st.floats(min_value=1e-9, max_value=1.0), cap=st.integers(min_value=1, max_value=10**6))
def test_the_cap_only_raises_the_rate_and_never_past_one(q: float, cap: int) -> None:
    c = capped_sample_rate(q, cap)
    assert q <= c <= 1.0
    assert c == q or math.isclose(c, 1.0 / cap)
    assert 1.0 / c <= cap * (1 + 1e-12)   # never more than cap steps per epoch


def test_no_cap_keeps_the_rate() -> None:
    assert capped_sample_rate(0.001, None) == 0.001


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256"])
def test_a_bad_cap_is_refused(bad) -> None:
    with pytest.raises(ConfigError):
        capped_sample_rate(0.1, bad)
    with pytest.raises(ConfigError):
        ModelConfig(max_steps_per_epoch=bad)


@pytest.mark.parametrize("unit", ["record", "interaction", "user"])
def test_large_markets_sample_one_cap_th_small_ones_keep_the_batch(unit: str) -> None:
    n = {"big": 1_000_000, "small": 20_000}
    plans = plan_markets(unit=unit, batch_size=256, epochs={"ctr": 2}, rounds=3, n_records=n,
                         n_users={"big": 100_000, "small": 2_000},
                         n_interactions={"big": 200_000, "small": 4_000}, max_steps_per_epoch=256)
    uncapped = plan_markets(unit=unit, batch_size=256, epochs={"ctr": 2}, rounds=3, n_records=n,
                            n_users={"big": 100_000, "small": 2_000},
                            n_interactions={"big": 200_000, "small": 4_000})
    assert plans["big"].sample_rate == pytest.approx(1 / 256)
    assert plans["big"].steps_per_round["ctr"] == 2 * 256
    # expected records per step grow with the market: q N = N / 256 records
    assert plans["big"].sample_rate * n["big"] == pytest.approx(n["big"] / 256)
    assert uncapped["big"].steps_per_round["ctr"] > plans["big"].steps_per_round["ctr"]
    assert plans["small"] == uncapped["small"]


def test_the_plain_trainer_uses_the_same_rate_as_the_plan() -> None:
    n = 300_000
    q_plan = plan_markets(unit="record", batch_size=256, epochs={"ctr": 1}, rounds=1, n_records={"m": n},
                          n_users={"m": 10}, max_steps_per_epoch=128)["m"].sample_rate
    assert sample_rate_for(n, 256, 128) == q_plan == pytest.approx(1 / 128)
    model = torch.nn.Linear(1, 1)
    trainer = PlainTrainer(model=model, loss_fn=lambda m, idx: torch.zeros(len(idx), requires_grad=True),
                           n_records=n, settings=TrainSettings(1, 256, 1e-3, 128),
                           generator=torch.Generator().manual_seed(0))
    assert trainer.q == q_plan
    assert trainer.train_epochs(1) == 128


def test_the_default_cap_changes_only_markets_above_64_batches() -> None:
    # The default synthetic sparse markets (3,920-5,040 training rows) keep batch 256, which
    # development seeds favoured for them; the rich one (56,000) samples 1/64 of its rows.
    cfg = RunConfig()
    assert cfg.model.max_steps_per_epoch == 64
    for n in (3_920, 5_040, 16_384):
        assert sample_rate_for(n, cfg.model.batch_size, cfg.model.max_steps_per_epoch) == sample_rate_for(n, 256)
    assert sample_rate_for(56_000, 256, cfg.model.max_steps_per_epoch) == pytest.approx(1 / 64)


def test_pf_msmtrec_plans_and_trains_with_the_same_capped_rate() -> None:
    # PF-MSMTrec passes its own cap (off by default) to the plan and to its trainers alike.
    from fedmm_secure.federation.pf_msmtrec.settings import PFSettings
    assert PFSettings().max_steps_per_epoch is None
    s = PFSettings(max_steps_per_epoch=32)
    plan = plan_markets(unit="record", batch_size=s.batch_size, epochs={"pf": 1}, rounds=1,
                        n_records={"m": 100_000}, n_users={"m": 1}, max_steps_per_epoch=s.max_steps_per_epoch)
    assert plan["m"].sample_rate == pytest.approx(1 / 32)
    assert sample_rate_for(100_000, s.batch_size, s.max_steps_per_epoch) == plan["m"].sample_rate
