"""Contract every privacy accountant implementation must satisfy.

Subclass :class:`AccountantContract`, set ``name`` (the registry name) and optionally
``options``; pytest collects the inherited tests (see ``test_accountant_contract.py``).
Settings are small so the whole contract runs in a few seconds per accountant.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.accountant import PrivacyAccountant, accountant_from_dict, make_accountant
from fedmm_secure.privacy.events import SubsampledGaussianEvent as Ev

DELTA = 1e-5


class AccountantContract:
    name: str = ""
    options: dict = {}

    def make(self) -> PrivacyAccountant:
        return make_accountant(self.name, **self.options)

    def eps(self, *events: Ev, delta: float = DELTA) -> float:
        acc = self.make()
        for e in events:
            acc.compose(e)
        return acc.get_epsilon(delta)

    # -- basics ----------------------------------------------------------------------------
    def test_registered_and_flagged(self):
        acc = self.make()
        assert acc.name == self.name
        rep = acc.report(DELTA)
        assert rep.certified is acc.certified
        assert rep.bound == ("certified upper bound" if acc.certified else "loose upper bound")

    def test_zero_steps_is_zero_epsilon(self):
        assert self.make().get_epsilon(DELTA) == 0.0
        assert self.eps(Ev(0.05, 1.0, 0)) == 0.0

    def test_positive_and_finite(self):
        e = self.eps(Ev(0.05, 1.0, 50))
        assert 0.0 < e < math.inf

    @pytest.mark.parametrize("bad", [0, 0.0, 1, 1.5, -1e-5, float("nan"), float("inf"), "1e-5", None, True])
    def test_rejects_bad_delta(self, bad):
        acc = self.make()
        acc.compose(Ev(0.05, 1.0, 10))
        with pytest.raises(ConfigError):
            acc.get_epsilon(bad)
        with pytest.raises(ConfigError):
            acc.predict_epsilon([Ev(0.05, 1.0, 1)], bad)

    def test_rejects_non_events_and_mixed_units(self):
        acc = self.make()
        with pytest.raises(ConfigError):
            acc.compose((0.05, 1.0, 10))  # type: ignore[arg-type]
        acc.compose(Ev(0.05, 1.0, 10, "record"))
        with pytest.raises(ConfigError):
            acc.compose(Ev(0.05, 1.0, 10, "user"))
        with pytest.raises(ConfigError):
            acc.predict_epsilon([Ev(0.05, 1.0, 10, "user")], DELTA)
        assert len(acc.events) == 1

    # -- monotonicity ------------------------------------------------------------------------
    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(n1=st.integers(1, 150), extra=st.integers(1, 150))
    def test_monotone_in_steps(self, n1, extra):
        assert self.eps(Ev(0.05, 1.0, n1)) <= self.eps(Ev(0.05, 1.0, n1 + extra))

    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(s1=st.floats(0.7, 3.0), factor=st.floats(1.05, 2.0))
    def test_monotone_in_noise(self, s1, factor):
        assert self.eps(Ev(0.05, s1, 100)) >= self.eps(Ev(0.05, s1 * factor, 100))

    def test_monotone_in_sample_rate_and_delta(self):
        assert self.eps(Ev(0.02, 1.0, 100)) < self.eps(Ev(0.08, 1.0, 100))
        assert self.eps(Ev(0.05, 1.0, 100), delta=1e-4) < self.eps(Ev(0.05, 1.0, 100), delta=1e-7)

    # -- composition -------------------------------------------------------------------------
    def test_split_composition_equals_summed_steps(self):
        split = self.eps(Ev(0.05, 1.1, 70), Ev(0.05, 1.1, 130))
        whole = self.eps(Ev(0.05, 1.1, 200))
        assert split == pytest.approx(whole, rel=1e-9)

    def test_heterogeneous_composition_dominates_parts(self):
        a, b = Ev(0.05, 1.0, 100), Ev(0.01, 0.8, 300)
        both = self.eps(a, b)
        assert both >= self.eps(a) and both >= self.eps(b)
        assert both <= self.eps(a) + self.eps(b) + 1e-9  # basic composition is an upper bound

    def test_predict_does_not_mutate_and_matches(self):
        acc = self.make()
        acc.compose(Ev(0.05, 1.0, 100))
        before = acc.get_epsilon(DELTA)
        pred = acc.predict_epsilon([Ev(0.05, 1.0, 50)], DELTA)
        assert acc.get_epsilon(DELTA) == pytest.approx(before, rel=1e-12)
        assert len(acc.events) == 1 and acc.steps == 100
        acc.compose(Ev(0.05, 1.0, 50))
        assert acc.get_epsilon(DELTA) == pytest.approx(pred, rel=1e-9)
        assert pred > before

    # -- persistence -------------------------------------------------------------------------
    def test_state_round_trips(self):
        acc = self.make()
        acc.compose(Ev(0.05, 1.0, 40))
        acc.compose(Ev(0.02, 1.3, 60))
        state = json.loads(json.dumps(acc.to_dict()))
        back = accountant_from_dict(state)
        assert type(back) is type(acc)
        assert back.events == acc.events
        assert back.get_epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
        assert type(acc).from_dict(state).events == acc.events

    def test_rejects_foreign_state(self):
        with pytest.raises(ConfigError):
            accountant_from_dict({"version": 999, "accountant": self.name, "events": []})
        with pytest.raises(ConfigError):
            accountant_from_dict({"version": 1, "accountant": "gdp", "events": []})
