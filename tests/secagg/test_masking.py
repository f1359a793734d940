"""Correctness, dropout recovery and the aggregator's view for the ``masking`` backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedmm_secure.errors import AbortError, ConfigError, ProtocolError
from fedmm_secure.primitives.quantization import make_quantizer
from fedmm_secure.secagg import (MarketPolicy, RoundContext, Roster, available_backends,
                                 create_backend, run_round)
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import (CONSISTENCY, MASKED_INPUT, MaskingAggregator,
                                         default_threshold)

from .helpers import det_entropy, federation


def setup(n, *, seed=b"t", min_cohort=None, **options):
    be = MaskingAggregator(entropy=det_entropy(seed), **options)
    ids = [f"m{i}" for i in range(n)]
    agg, markets, _, _ = federation(be, ids, min_cohort=min_cohort,
                                    colluders=options.get("colluders", 1))
    return agg, markets, ids


def ctx_for(ids, length, bound=1.0, round_id=1):
    return RoundContext("run-test", round_id, tuple(ids), length, bound)


def upload_of(message: bytes) -> np.ndarray:
    env = decode_envelope(message)
    return np.frombuffer(env.payload[32:-64], dtype="<u4")


def test_registered_and_secure():
    assert "masking" in available_backends()
    be = create_backend("masking", allow_insecure=False, threshold=3)
    assert isinstance(be, MaskingAggregator) and be.secure


def test_default_threshold_tolerates_a_third_and_c_colluders():
    for c in range(0, 4):
        for n in range(1, 40):
            t = default_threshold(n, colluders=c)
            assert n / 2 < t <= max(n, (n + c) // 2 + 1) and 2 * t > n + c
            assert n - t <= n // 3 and (n - t == n // 3 or t == (n + c) // 2 + 1)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 5), length=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_masks_cancel_exactly(n, length, seed):
    agg, markets, ids = setup(n, seed=seed.to_bytes(4, "big"), min_cohort=n)
    ctx = ctx_for(ids, length, bound=3.0)
    rng = np.random.default_rng(seed)
    vecs = {m: rng.uniform(-4, 4, length) for m in ids}
    out = run_round(agg, markets, ctx, vecs)
    q = make_quantizer(bounds=3.0, length=length, n_participants=n)
    ring = np.zeros(length, dtype=np.uint32)
    for m in ids:
        ring += q.quantize(vecs[m])[0]
    expected = q.dequantize_sum(ring)  # exactly what an unmasked ring sum decodes to
    assert out.survivors == tuple(ids)
    for m in ids:
        assert np.array_equal(out.results[m], expected)


def test_sum_matches_plain_sum_within_reported_bound():
    agg, markets, ids = setup(5)
    bounds = np.linspace(0.5, 5.0, 777)
    ctx = RoundContext("run-test", 7, tuple(ids), 777, bounds, label="codebook-stats")
    rng = np.random.default_rng(1)
    vecs = {m: rng.uniform(-1, 1, 777) * bounds for m in ids}
    out = run_round(agg, markets, ctx, vecs)
    plain = sum(vecs.values())
    rep = out.reports["m0"]
    assert rep["ring_bits"] == 32 and rep["clipped_coordinates"] == 0 and rep["scale"] > 0
    for r in out.results.values():
        assert np.max(np.abs(r - plain)) <= rep["max_abs_error_bound"]


def test_clipping_is_reported():
    agg, markets, ids = setup(3)
    ctx = ctx_for(ids, 10)
    vecs = {m: np.zeros(10) for m in ids}
    vecs["m1"][:4] = 5.0
    out = run_round(agg, markets, ctx, vecs)
    assert out.reports["m1"]["clipped_coordinates"] == 4
    assert np.allclose(out.results["m0"][:4], 1.0, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4, 5])
def test_dropouts_at_each_stage_are_recovered(stage):
    n, length = 6, 200
    agg, markets, ids = setup(n, seed=bytes([stage]))
    ctx = ctx_for(ids, length)
    rng = np.random.default_rng(stage)
    vecs = {m: rng.uniform(-1, 1, length) for m in ids}
    drop = {"m1": stage, "m4": stage}  # n - t = 2 dropouts
    out = run_round(agg, markets, ctx, vecs, drop_at=drop)
    # Markets that uploaded their masked input (stage 2) before leaving stay in the sum.
    expected_survivors = tuple(ids) if stage >= CONSISTENCY else ("m0", "m2", "m3", "m5")
    assert out.survivors == expected_survivors
    plain = sum(vecs[m] for m in expected_survivors)
    assert set(out.results) == {"m0", "m2", "m3", "m5"}
    for r in out.results.values():
        assert np.max(np.abs(r - plain)) <= out.reports["m0"]["max_abs_error_bound"]


def test_dropouts_spread_over_stages():
    agg, markets, ids = setup(6, seed=b"spread")
    ctx = ctx_for(ids, 50)
    vecs = {m: np.full(50, i / 10) for i, m in enumerate(ids)}
    out = run_round(agg, markets, ctx, vecs, drop_at={"m0": 2, "m5": 4})
    assert out.survivors == ("m1", "m2", "m3", "m4", "m5")
    assert np.allclose(out.results["m2"], sum(vecs[m] for m in out.survivors), atol=1e-7)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4, 5])
def test_fewer_than_threshold_aborts_without_a_sum(stage):
    agg, markets, ids = setup(6)
    ctx = ctx_for(ids, 20)
    vecs = {m: np.ones(20) for m in ids}
    server = agg.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, vecs[m]) for m in ids}
    outbox = server.start()
    for s in range(stage):
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    replies = {m: clients[m].handle(msg) for m, msg in outbox.items() if m not in ("m0", "m1", "m2")}
    with pytest.raises(AbortError):
        server.handle(replies)
    with pytest.raises(AbortError):
        server.handle(replies)
    assert not server.done and server.survivors == ()
    with pytest.raises(ProtocolError):
        server.result()
    assert not any(c.done for c in clients.values())


def test_uploads_look_uniform_and_reveal_no_input():
    n, length = 5, 1000
    agg, markets, ids = setup(n, seed=b"view")
    ctx = ctx_for(ids, length, bound=2.0)
    # Very different inputs: constant at +bound, at -bound, a ramp, zeros, a spike.
    vecs = {"m0": np.full(length, 2.0), "m1": np.full(length, -2.0),
            "m2": np.linspace(-2, 2, length), "m3": np.zeros(length),
            "m4": np.where(np.arange(length) == 3, 2.0, 0.0)}
    seen = []
    out = run_round(agg, markets, ctx, vecs, recorder=lambda m, s, b: seen.append((m, s, b)))
    assert np.allclose(out.results["m0"], sum(vecs.values()), atol=1e-6)
    q = make_quantizer(bounds=2.0, length=length, n_participants=n)
    uploads = {m: upload_of(b) for m, s, b in seen if s == MASKED_INPUT}
    assert set(uploads) == set(ids)
    pooled = np.concatenate([u.view(np.uint8) for u in uploads.values()])
    assert chisquare(np.bincount(pooled, minlength=256)).pvalue > 1e-4
    bits = np.unpackbits(pooled)
    assert abs(bits.mean() - 0.5) < 0.01
    for m, u in uploads.items():
        enc = q.quantize(vecs[m])[0]
        assert u.nbytes == 4 * length  # <= float32 size
        assert not np.array_equal(u, enc)
        assert np.count_nonzero(u == enc) < 5  # chance agreement only (1000 / 2^32 expected)
        # masked values are uncorrelated with the (centred) input
        x = vecs[m] + np.linspace(0, 1e-9, length)  # constant inputs have no variance
        r = np.corrcoef(u.astype(np.float64), x)[0, 1]
        assert abs(r) < 0.15
        # no message the aggregator received contains the input's encoding or float bytes
        for _, _, b in seen:
            assert enc[:8].tobytes() not in b and vecs[m][:4].tobytes() not in b


def test_threshold_and_roster_configuration():
    with pytest.raises(ConfigError):
        MaskingAggregator(ring_bits=64)
    with pytest.raises(ConfigError):
        MaskingAggregator(rounding="up")
    agg, markets, ids = setup(4, threshold=2)  # 2 <= 4/2: a split quorum would be possible
    with pytest.raises(ConfigError):
        agg.begin_round(ctx_for(ids, 5))
    with pytest.raises(ConfigError):
        markets["m0"].begin_round(ctx_for(ids, 5), np.zeros(5))
    agg, markets, ids = setup(3)
    other = MaskingAggregator().create_market("m0")
    roster = Roster({m: markets[m].public_bundle() for m in ids}, aggregator=b"\x01" * 32)
    with pytest.raises(ProtocolError):  # roster holds someone else's key for m0
        other.install_roster(roster, policy=MarketPolicy.pin(roster, backends={"masking"}, privacy={}))
    with pytest.raises(ProtocolError):
        agg.begin_round(ctx_for(ids + ["m9"], 5))
    fresh = MaskingAggregator().create_aggregator()
    with pytest.raises(ProtocolError):
        fresh.begin_round(ctx_for(ids, 5))


def test_small_ring_and_stochastic_rounding():
    agg, markets, ids = setup(4, ring_bits=16, rounding="stochastic")
    ctx = ctx_for(ids, 300)
    rng = np.random.default_rng(3)
    vecs = {m: rng.uniform(-1, 1, 300) for m in ids}
    out = run_round(agg, markets, ctx, vecs)
    bound = out.reports["m0"]["max_abs_error_bound"]
    assert out.reports["m0"]["ring_bits"] == 16
    assert np.max(np.abs(out.results["m3"] - sum(vecs.values()))) <= bound


def test_moderate_round_with_dropouts():
    n, length = 10, 20000
    agg, markets, ids = setup(n, seed=b"moderate")
    ctx = ctx_for(ids, length, bound=0.5)
    rng = np.random.default_rng(11)
    vecs = {m: rng.normal(0, 0.2, length) for m in ids}
    out = run_round(agg, markets, ctx, vecs, drop_at={"m2": 3, "m7": 2, "m9": 5})
    assert out.survivors == tuple(m for m in ids if m not in ("m2", "m7"))
    plain = sum(np.clip(vecs[m], -0.5, 0.5) for m in out.survivors)
    for r in out.results.values():
        assert np.max(np.abs(r - plain)) <= out.reports["m0"]["max_abs_error_bound"]
    assert out.bytes_up["m0"] < 4 * length * 1.05 + 4000  # ~4 bytes/coordinate + small overhead


@pytest.mark.parametrize("n", [1, 2])
def test_smallest_rounds(n):
    # Only a market whose own policy accepts such a cohort takes part (the default needs 3).
    agg, markets, ids = setup(n, seed=b"small", min_cohort=n, colluders=0)
    ctx = ctx_for(ids, 8)
    vecs = {m: np.full(8, 0.25 * (i + 1)) for i, m in enumerate(ids)}
    out = run_round(agg, markets, ctx, vecs)
    assert out.survivors == tuple(ids)
    assert np.allclose(out.results[ids[0]], sum(vecs.values()), atol=1e-8)


def test_aggregator_decodes_the_same_sum_as_the_markets_on_request():
    # The aggregator keeps the ring sum and decodes only when asked: bit for bit what every
    # market released, a fresh array per call, and float32 inputs give what their float64
    # widening gives.
    n, length = 4, 5000
    agg, markets, ids = setup(n, seed=b"lazy")
    ctx = ctx_for(ids, length, bound=1.0)
    rng = np.random.default_rng(5)
    vecs = {m: rng.uniform(-1.2, 1.2, length).astype(np.float32) for m in ids}
    server = agg.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, vecs[m]) for m in ids}
    outbox = server.start()
    while not server.done:
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    for m, msg in outbox.items():
        assert clients[m].handle(msg) is None
    first, second = server.result(), server.result()
    assert first is not second and first.dtype == np.float64
    first[:] = 0.0
    for m in ids:
        assert np.array_equal(clients[m].result(), second)
    q = make_quantizer(bounds=1.0, length=length, n_participants=n)
    ring = np.zeros(length, dtype=np.uint32)
    for m in ids:
        ring += q.quantize(vecs[m].astype(np.float64))[0]
    assert np.array_equal(second, q.dequantize_sum(ring))
