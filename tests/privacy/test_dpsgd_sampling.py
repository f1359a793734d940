"""Poisson samplers: known rate, independent inclusion, whole users, reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError, DataError
from fedmm_secure.privacy.sampling import PoissonRecordSampler, PoissonUserSampler


def test_record_sampler_rate_and_reproducibility():
    s = PoissonRecordSampler(num_records=2000, sample_rate=0.05,
                             generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(s.sample()) for _ in range(200)], dtype=torch.float)
    # Binomial(2000, 0.05): mean 100, std ~9.7; the mean of 200 draws has std ~0.7.
    assert abs(float(sizes.mean()) - 100) < 3 and 6 < float(sizes.std()) < 14
    a = PoissonRecordSampler(num_records=50, sample_rate=0.3,
                             generator=torch.Generator().manual_seed(9)).sample()
    b = PoissonRecordSampler(num_records=50, sample_rate=0.3,
                             generator=torch.Generator().manual_seed(9)).sample()
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.group_ids, torch.arange(len(a))) and a.num_units == len(a)
    assert s.expected_batch_size == 100 and s.steps_per_epoch == 20


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=80), st.integers(0, 10**6))
def test_user_sampler_takes_whole_users(users, seed):
    user_of_record = torch.tensor(users)
    s = PoissonUserSampler(user_of_record=user_of_record, sample_rate=0.4,
                           generator=torch.Generator().manual_seed(seed))
    d = s.sample()
    chosen = user_of_record[d.indices]
    # Every record of a chosen user is in, with one group id per user, ids 0..G-1.
    for u in chosen.unique().tolist():
        assert int((user_of_record == u).sum()) == int((chosen == u).sum())
        assert d.group_ids[chosen == u].unique().numel() == 1
    assert d.num_units == chosen.unique().numel()
    if d.num_units:
        assert sorted(d.group_ids.unique().tolist()) == list(range(d.num_units))
    assert len(set(d.indices.tolist())) == len(d)
    assert s.num_units_total == len(set(users))


def test_user_sampler_rate():
    s = PoissonUserSampler(user_of_record=torch.arange(3000) % 1000, sample_rate=0.1,
                           generator=torch.Generator().manual_seed(1))
    units = torch.tensor([s.sample().num_units for _ in range(100)], dtype=torch.float)
    assert abs(float(units.mean()) - 100) < 3.5  # Binomial(1000, .1) std 9.5, /10
    assert s.expected_batch_size == 100


def test_sampler_validation():
    g = torch.Generator()
    for rate in (0, 1.5, -0.1):
        with pytest.raises(ConfigError):
            PoissonRecordSampler(num_records=10, sample_rate=rate, generator=g)
    with pytest.raises(ConfigError):
        PoissonRecordSampler(num_records=10, sample_rate=0.1, generator=None)
    with pytest.raises(DataError):
        PoissonUserSampler(user_of_record=torch.tensor([0.5, 1.0]), sample_rate=0.1, generator=g)


def test_user_sampler_caps_records_per_user_with_fresh_random_subsets():
    user_of_record = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    s = PoissonUserSampler(user_of_record=user_of_record, sample_rate=1.0,
                           generator=torch.Generator().manual_seed(4), max_records_per_user=3)
    subsets = set()
    for _ in range(20):
        d = s.sample()
        users = user_of_record[d.indices]
        assert [int((users == u).sum()) for u in range(3)] == [3, 2, 3]
        for g in range(d.num_units):  # a group id still names exactly one user
            assert users[d.group_ids == g].unique().numel() == 1
        subsets.add(tuple(sorted(d.indices[users == 0].tolist())))
    assert len(subsets) > 5  # the subset is redrawn each step
    with pytest.raises(ConfigError):
        PoissonUserSampler(user_of_record=user_of_record, sample_rate=0.5,
                           generator=torch.Generator(), max_records_per_user=0)
