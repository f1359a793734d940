"""White-box gradient canaries through the project's DP-SGD trainer: the canary is clipped as
its unit is, scores separate members, and a small fast version of the acceptance campaign
(correct mechanism never exceeds its accountant epsilon; the planted bug is flagged)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmm_secure.audit.fdp_one_run import fdp_family_bound, noise_family, subsampled_gaussian_profile
from fedmm_secure.audit.gradient_canary import DPSGDMechanism, canary_llr, run_gradient_canaries
from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy import dpsgd


def _nearly_noiseless(unit: str, records_per_user: int = 1, steps: int = 3):
    mech = DPSGDMechanism(sample_rate=1.0, noise_multiplier=0.01, steps=steps, max_grad_norm=2.0,
                          unit=unit, delta=1e-5)
    return mech, run_gradient_canaries(mech, m=50, repeats=2, records_per_user=records_per_user,
                                       coins=np.random.default_rng(0), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("unit, records", [("record", 1), ("user", 3)])
def test_each_canary_adds_exactly_C_on_its_own_coordinate(unit, records):
    # q = 1 and tiny noise: y = C for a member, 0 otherwise, so a step's LLR is +-1/(2 sigma^2).
    # A user with 3 records whose summed gradient (3C) were not clipped would score 5x higher.
    mech, obs = _nearly_noiseless(unit, records)
    per_step = 1 / (2 * mech.noise_multiplier ** 2)
    expected = np.where(obs.included, per_step, -per_step) * mech.steps
    np.testing.assert_allclose(obs.scores, expected, rtol=0.05)


def test_canaries_go_through_the_trainers_step(monkeypatch):
    calls = []
    real = dpsgd.DPTrainer.step

    def spy(self, batch, *, draw):
        calls.append(len(draw))
        return real(self, batch, draw=draw)

    monkeypatch.setattr(dpsgd.DPTrainer, "step", spy)
    mech, obs = _nearly_noiseless("record", steps=4)
    assert len(calls) == 4 and all(n == obs.included.sum() for n in calls)  # q = 1: every member


def test_llr_matches_the_mixture_formula():
    y, q, s, c = np.array([-1.0, 0.0, 0.7, 2.0]), 0.1, 0.8, 1.5
    direct = np.log((1 - q) + q * np.exp((y * c - c * c / 2) / (s * c) ** 2))
    np.testing.assert_allclose(canary_llr(y, sample_rate=q, noise_multiplier=s, max_grad_norm=c), direct)


def test_small_campaign_correct_never_exceeds_and_planted_bug_is_flagged():
    # A market like the default run's sparse markets, shortened: q = 0.05, 60 steps, sigma
    # calibrated near epsilon 4 (3.61); 5 repeats of 10,000 canaries each of the correct trainer
    # and of one that noises with sigma / 2 while the ledger keeps sigma. The trainer's noise is
    # seeded so the test is deterministic; the size was chosen for margin with fresh OS noise
    # (300 unseeded campaigns: correct max 2.2, bug min 3.81 against 3.61; at 4,000 x 3 the bug
    # went unflagged in 1 of 30).
    mech = DPSGDMechanism(sample_rate=0.05, noise_multiplier=0.9, steps=60, max_grad_norm=1.0,
                          unit="record", delta=1e-5)
    sigmas, claimed = noise_family(mech.noise_multiplier, octaves=(1.0, 0.5))
    family = [subsampled_gaussian_profile(sample_rate=mech.sample_rate, noise_multiplier=s, steps=mech.steps,
                                          delta=mech.delta) for s in sigmas]
    acc = family[claimed].label_epsilon
    rng = np.random.default_rng(3)
    ok = run_gradient_canaries(mech, m=10_000, repeats=5, coins=rng, generator=torch.Generator().manual_seed(3))
    bug = run_gradient_canaries(mech, m=10_000, repeats=5, coins=rng, generator=torch.Generator().manual_seed(4),
                                trained_noise_multiplier=mech.noise_multiplier / 2)
    assert bug.trained_noise_multiplier == mech.noise_multiplier / 2
    ok_b = fdp_family_bound(ok.scores, ok.included, family, claimed=claimed)
    bug_b = fdp_family_bound(bug.scores, bug.included, family, claimed=claimed)
    assert ok_b[0].ceiling > acc
    assert all(b.epsilon_lower_bound <= acc for b in ok_b)
    assert all(b.epsilon_lower_bound > acc for b in bug_b)


def test_bad_inputs():
    with pytest.raises(ConfigError):
        DPSGDMechanism(sample_rate=0.0, noise_multiplier=1.0, steps=1, max_grad_norm=1.0, unit="record", delta=1e-5)
    with pytest.raises(ConfigError):
        DPSGDMechanism(sample_rate=0.1, noise_multiplier=1.0, steps=1, max_grad_norm=1.0, unit="row", delta=1e-5)
    mech = DPSGDMechanism(sample_rate=0.1, noise_multiplier=1.0, steps=1, max_grad_norm=1.0, unit="record",
                          delta=1e-5)
    with pytest.raises(ConfigError):
        run_gradient_canaries(mech, m=1)
    with pytest.raises(ConfigError):
        run_gradient_canaries(mech, m=10, repeats=0)
