"""ComposedAccountants returns, for the same events and accountant, the accountant already built
(so its memoised epsilon is reused), and for anything else one that matches a fresh accountant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.accountant import make_accountant
from fedmm_secure.privacy.composed import ComposedAccountants
from fedmm_secure.privacy.events import SubsampledGaussianEvent

_EVENT = st.builds(SubsampledGaussianEvent, sample_rate=st.sampled_from([0.01, 0.05, 0.2]),
                   noise_multiplier=st.sampled_from([0.8, 1.2, 3.0]), steps=st.integers(1, 40))


def _fresh(events, name):
    acc = make_accountant(name)
    for e in events:
        acc.compose(e)
    return acc


@settings(max_examples=15, deadline=None)
@given(events=st.lists(_EVENT, min_size=1, max_size=4), name=st.sampled_from(["pld", "rdp"]))
def test_same_epsilon_as_a_fresh_accountant_and_built_once(events, name):
    cache = ComposedAccountants()
    acc = cache.get(events, name)
    assert acc.get_epsilon(1e-5) == _fresh(events, name).get_epsilon(1e-5)
    assert cache.get(list(events), name) is acc and len(cache) == 1


def test_other_events_or_accountant_get_their_own():
    a = SubsampledGaussianEvent(0.05, 1.0, 10)
    b = SubsampledGaussianEvent(0.05, 1.0, 11)
    cache = ComposedAccountants()
    first = cache.get([a])
    assert cache.get([b]) is not first and cache.get([a], "rdp") is not first
    assert cache.get([a, b]) is not cache.get([b, a])
    assert cache.get([b]).get_epsilon(1e-5) > first.get_epsilon(1e-5)


def test_mixing_units_still_refused():
    with pytest.raises(ConfigError):
        ComposedAccountants().get([SubsampledGaussianEvent(0.1, 1.0, 1),
                                   SubsampledGaussianEvent(0.1, 1.0, 1, unit="user")])
