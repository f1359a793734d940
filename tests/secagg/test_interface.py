"""Contract of the secure-aggregation interface, on the plain backend and the registry."""

import numpy as np
import pytest

from fedmm_secure.errors import AbortError, ConfigError, ProtocolError
from fedmm_secure.secagg import RoundContext, available_backends, create_backend, run_round

from .helpers import federation


def _setup(names, backend="plain", **opts):
    b = create_backend(backend, allow_insecure=True, **opts)
    agg, markets, _, _ = federation(b, names)
    return agg, markets


def test_plain_must_be_requested_explicitly():
    with pytest.raises(ConfigError, match="not secure"):
        create_backend("plain", allow_insecure=False)
    with pytest.raises(ConfigError, match="allowed"):
        create_backend("rot13", allow_insecure=True)
    assert "plain" in available_backends()


def test_plain_round_sums_and_records_bytes():
    names = ["a", "b", "c"]
    agg, markets = _setup(names)
    rng = np.random.default_rng(0)
    vecs = {m: rng.uniform(-1, 1, 10) for m in names}
    ctx = RoundContext(run_id="t", round_id=0, participants=tuple(names), length=10, max_abs=1.0)
    seen = []
    out = run_round(agg, markets, ctx, vecs, recorder=lambda m, s, b: seen.append((m, s, b)))
    np.testing.assert_allclose(out.results["a"], sum(vecs.values()))
    assert out.survivors == tuple(names)
    assert {m for m, _, _ in seen} == set(names)
    assert out.bytes_up["a"] >= 8 * 10  # float64 payload plus the envelope


def test_dropout_before_upload_removes_market_from_sum():
    names = ["a", "b", "c"]
    agg, markets = _setup(names)
    vecs = {m: np.full(4, i + 1.0) for i, m in enumerate(names)}
    ctx = RoundContext(run_id="t", round_id=1, participants=tuple(names), length=4, max_abs=10.0)
    out = run_round(agg, markets, ctx, vecs, drop_at={"b": 0})
    assert out.survivors == ("a", "c")
    np.testing.assert_allclose(out.results["a"], np.full(4, 4.0))


def test_all_dropped_aborts():
    agg, markets = _setup(["a"])
    ctx = RoundContext(run_id="t", round_id=0, participants=("a",), length=2, max_abs=1.0)
    with pytest.raises(AbortError):
        run_round(agg, markets, ctx, {"a": np.zeros(2)}, drop_at={"a": 0})


def test_inputs_are_clipped_to_the_public_bound():
    agg, markets = _setup(["a", "b"])
    ctx = RoundContext(run_id="t", round_id=0, participants=("a", "b"), length=2, max_abs=1.0)
    out = run_round(agg, markets, ctx, {"a": np.array([5.0, -5.0]), "b": np.zeros(2)})
    np.testing.assert_allclose(out.results["a"], [1.0, -1.0])
    assert out.reports["a"]["clipped_coordinates"] == 2


def test_wrong_round_and_garbage_are_rejected_without_state_change():
    agg, markets = _setup(["a", "b"])
    ctx0 = RoundContext(run_id="t", round_id=0, participants=("a", "b"), length=3, max_abs=1.0)
    ctx1 = RoundContext(run_id="t", round_id=1, participants=("a", "b"), length=3, max_abs=1.0)
    server = agg.begin_round(ctx0)
    client = markets["a"].begin_round(ctx0, np.zeros(3))
    other = agg.begin_round(ctx1).start()["a"]
    with pytest.raises(ProtocolError):
        client.handle(other)
    with pytest.raises(ProtocolError):
        client.handle(b"\x00garbage")
    good = server.start()["a"]
    reply = client.handle(good)  # still at the first stage: the bad messages changed nothing
    assert reply is not None
    with pytest.raises(ProtocolError):
        client.handle(good)  # replay of the same stage message
    with pytest.raises(ProtocolError):
        server.handle({"a": reply[:-1]})


@pytest.mark.parametrize("kwargs", [
    {"run_id": "bad id!"},
    {"round_id": -1},
    {"participants": ()},
    {"participants": ("a", "a")},
    {"length": 0},
    {"max_abs": 0.0},
    {"max_abs": np.ones(3)},
])
def test_round_context_validation(kwargs):
    base = dict(run_id="t", round_id=0, participants=("a", "b"), length=2, max_abs=1.0)
    base.update(kwargs)
    with pytest.raises(ConfigError):
        RoundContext(**base)
