"""The O(batch) Poisson sampler (geometric skips) is an exact Poisson subsample at the accounted
rate, and a private run's accountant is told exactly the steps and rate that ran.

Statistical tests draw from fresh OS-keyed sources, so each can fail by chance; every one uses
a significance level of 1e-6 (a false alarm once in a million runs of the suite per test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmm_secure.config import ModelConfig
from fedmm_secure.data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from fedmm_secure.federation import fedmm
from fedmm_secure.privacy.randomness import (GEOMETRIC_MAX_RATE, GEOMETRIC_RATE_MARGIN, SecureRandom,
                                             poisson_indices)
from fedmm_secure.privacy.sampling import PoissonRecordSampler
from fedmm_secure.privacy.session import PrivacySession, plan_markets
from fedmm_secure.runtime.embedded import EmbeddedSecureSum

ALPHA = 1e-6


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20_000), p=st.floats(1e-5, 1.0), chunk=st.sampled_from([None, 1, 3, 50]),
       seeded=st.booleans())
def test_indices_are_sorted_unique_and_in_range(n, p, chunk, seeded):
    src = torch.Generator().manual_seed(n) if seeded else SecureRandom()
    idx = poisson_indices(src, n, p, chunk=chunk)
    assert idx.dtype == torch.int64
    assert torch.all(idx[1:] > idx[:-1])
    assert idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < n)
    if p >= 1.0:
        assert idx.numel() == n


def _draws(n: int, p: float, reps: int, chunk: int | None = None) -> list[np.ndarray]:
    src = SecureRandom()
    return [poisson_indices(src, n, p, chunk=chunk).numpy() for _ in range(reps)]


def _chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


@pytest.mark.parametrize("chunk", [None, 7])
def test_batch_size_is_binomial(chunk):
    n, p, reps = 4000, 0.01, 3000
    sizes = np.array([d.size for d in _draws(n, p, reps, chunk)])
    # Bins of the Binomial(n, p) pmf with enough mass each, tails pooled.
    edges = np.array([0, 28, 32, 35, 38, 40, 42, 44, 46, 49, 53, n + 1])
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(edges - 1, n, p)
    assert _chi2_pvalue(observed, np.diff(cdf)) > ALPHA


@pytest.mark.parametrize("chunk", [None, 7])
def test_every_unit_is_kept_at_the_rate_independently(chunk):
    n, p, reps = 2000, 0.02, 5000
    draws = _draws(n, p, reps, chunk)
    hits = np.zeros(n)
    for d in draws:
        hits[d] += 1
    # Marginals: every position (first and last included) kept with probability p.
    assert _chi2_pvalue(hits, np.full(n, 1.0)) > ALPHA
    for pos in (0, n - 1):
        assert stats.binomtest(int(hits[pos]), reps, p).pvalue > ALPHA
    # Independence: the wait from a fixed position to the next kept unit is Geometric(p)
    # (failures before a success), as independent Bernoulli(p) trials give; checked from the
    # start and from the middle (the wait there crosses earlier draws' gaps and chunk ends).
    edges = np.concatenate([np.arange(0, 150, 10), [n // 2 + 1]])
    expected = np.diff(1 - (1 - p) ** edges)
    for start in (0, n // 2):
        waits = np.array([d[d >= start][0] - start for d in draws if np.any(d >= start)])
        waits = waits[waits < n // 2]
        assert _chi2_pvalue(np.histogram(waits, bins=edges)[0], expected) > ALPHA
    # Pairs: adjacent units kept together at rate p^2.
    both = sum(int(np.sum(np.diff(d) == 1)) for d in draws)
    assert stats.binomtest(both, reps * (n - 1), p * p).pvalue > ALPHA


def test_rate_used_never_exceeds_the_accounted_rate():
    assert 0 < GEOMETRIC_RATE_MARGIN < 1e-6  # the sampler runs at q * (1 - margin) < q
    # Across the switch to one Bernoulli per unit, the size still matches the rate.
    src = SecureRandom()
    for p in (GEOMETRIC_MAX_RATE * 0.99, GEOMETRIC_MAX_RATE * 1.01):
        n = 200_000
        k = poisson_indices(src, n, p).numel()
        assert abs(k - n * p) < 5.5 * math.sqrt(n * p * (1 - p))


def test_record_sampler_reads_o_batch_randomness():
    # Geometric skips read ~8 bytes per kept record, not 4 per record.
    src = SecureRandom()
    read = []
    real = src._stream.read

    def counting(nbytes):
        read.append(nbytes)
        return real(nbytes)

    src._stream = type("S", (), {"read": staticmethod(counting)})()
    s = PoissonRecordSampler(num_records=1_000_000, sample_rate=256 / 1_000_000, generator=src)
    s.sample()
    assert sum(read) < 8 * 1000


SPECS = (MarketSpec("a", 80, 40, 8), MarketSpec("b", 50, 30, 6))
MODEL = ModelConfig(vq_epochs=1, cf_dim=8, latent_dim=4, n_global=8, n_local=4, ctr_dim=8, ctr_hidden=(8,),
                    batch_size=32)


def test_accountant_is_told_the_steps_and_rate_that_ran(monkeypatch):
    """Count the optimizer steps and sampler draws that really happen in a private FedMM run and
    check them against what each market's accountant composed."""
    markets = generate_markets(SyntheticConfig(markets=SPECS), seed=0)
    plans = plan_markets(unit="record", batch_size=MODEL.batch_size,
                         epochs={"cf": MODEL.cf_epochs, "ctr": MODEL.ctr_epochs}, rounds=2,
                         n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets})
    session = PrivacySession(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure")
    draws: dict[str, list[float]] = {m.name: [] for m in markets}
    steps: dict[str, int] = {m.name: 0 for m in markets}
    real_call = PrivacySession.__call__

    def tracking(self, **kw):
        local = real_call(self, **kw)
        tr, market = local.trainer, kw["market"]
        real_sample = tr.sampler.sample

        def sample():
            d = real_sample()
            draws[market].append(d.sample_rate)
            return d
        tr.sampler.sample = sample

        def count(opt, args, kwargs):
            steps[market] += 1
        tr._optimizer.register_step_post_hook(count)
        return local

    monkeypatch.setattr(PrivacySession, "__call__", tracking)
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fedmm.run_method("fedmm", markets, MODEL, rounds=2, seed=0, secure_sum=ss, trainers=session, hooks=session)
    summary = session.summary()
    for m in markets:
        ran = steps[m.name]
        assert ran == len(draws[m.name]) == plans[m.name].total_steps > 0
        assert session.accountants[m.name].steps == summary[m.name]["steps"] == ran
        assert set(draws[m.name]) == {summary[m.name]["sample_rate"]} == {plans[m.name].sample_rate}


def test_the_fused_adam_of_a_private_trainer_is_sealed():
    from fedmm_secure.federation.training import TrainSettings
    from fedmm_secure.models.ctr import DeepFM
    from fedmm_secure.privacy.dpsgd import AccountingBypassError

    plans = plan_markets(unit="record", batch_size=8, epochs={"ctr": 1}, rounds=1, n_records={"m": 64},
                         n_users={"m": 16})
    session = PrivacySession(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure")
    model = DeepFM(fields=[("user", 16), ("item", 8)], dim=4, hidden=(4,))
    x = torch.stack([torch.arange(64) % 16, torch.arange(64) % 8], 1)
    local = session(market="m", stage="ctr", model=model,
                    loss_fn=lambda mdl, idx: mdl(x[idx]).sigmoid(), n_records=64, users=x[:, 0],
                    settings=TrainSettings(1, 8, 0.01), generator=torch.Generator().manual_seed(0))
    opt = local.trainer._optimizer
    assert opt.defaults.get("fused") is True
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(AccountingBypassError):
        opt.step()
