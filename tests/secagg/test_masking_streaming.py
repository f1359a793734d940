"""The ``masking`` aggregator takes uploads one at a time into one running sum: a streamed round
equals the all-at-once one, and a rejected upload leaves nothing behind in the sum."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.secagg import RoundContext, run_round
from fedmm_secure.secagg.masking import MASKED_INPUT, MaskingAggregator

from .helpers import det_entropy, federation


def _round(n, length, *, seed, ring_bits=32, round_id=1):
    be = MaskingAggregator(entropy=det_entropy(seed), ring_bits=ring_bits)
    ids = [f"m{i}" for i in range(n)]
    agg, markets, _, _ = federation(be, ids, min_cohort=n - 1)
    ctx = RoundContext("run-stream", round_id, tuple(ids), length, 2.0)
    rng = np.random.default_rng(int.from_bytes(seed[:4].ljust(4, b"\0"), "big"))
    vecs = {m: rng.uniform(-2, 2, length) for m in ids}
    return agg, markets, ctx, vecs


def _begin(agg, markets, ctx, vecs):
    server = agg.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, vecs[m]) for m in ctx.participants}
    return server, clients, server.start()


@settings(max_examples=8, deadline=None)
@given(n=st.integers(3, 6), length=st.integers(1, 70_000), ring_bits=st.sampled_from([16, 24, 32]),
       seed=st.binary(min_size=4, max_size=4))
def test_streamed_round_equals_all_at_once(n, length, ring_bits, seed):
    # run_round streams (receive / end_stage); the same round with the same entropy, every
    # stage's replies handed over at once (handle), must give bit-identical results.
    out = run_round(*_round(n, length, seed=seed, ring_bits=ring_bits))
    agg, markets, ctx, vecs = _round(n, length, seed=seed, ring_bits=ring_bits)
    server, clients, outbox = _begin(agg, markets, ctx, vecs)
    while not server.done:
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    for m, msg in outbox.items():
        clients[m].handle(msg)
        assert np.array_equal(clients[m].result(), out.results[m])
    assert out.survivors == ctx.participants


def _to_masked_input(server, clients, outbox):
    for _ in range(MASKED_INPUT):
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    return {m: clients[m].handle(msg) for m, msg in outbox.items()}


def _finish(server, clients, outbox):
    while not server.done:
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    for m, msg in outbox.items():
        assert clients[m].handle(msg) is None
    return outbox


@pytest.mark.parametrize("where", ["vector start", "vector middle", "vector end", "signature"])
def test_tampered_upload_is_blamed_and_leaves_the_running_sum_untouched(where):
    agg, markets, ctx, vecs = _round(5, 100_000, seed=b"tamper")
    server, clients, outbox = _begin(agg, markets, ctx, vecs)
    uploads = _to_masked_input(server, clients, outbox)
    for m in ("m0", "m1"):
        server.receive(m, uploads[m])
    bad = bytearray(uploads["m2"])
    pos = {"vector start": len(bad) - 64 - 400_000, "vector middle": len(bad) // 2,
           "vector end": len(bad) - 65, "signature": len(bad) - 1}[where]
    bad[pos] ^= 1
    with pytest.raises(IntegrityError) as err:
        server.receive("m2", bytes(bad))   # added chunk by chunk before the signature failed
    assert err.value.market == "m2"
    for m in ("m3", "m4"):
        server.receive(m, uploads[m])
    outbox = _finish(server, clients, server.end_stage())
    expected = sum(vecs[m] for m in ("m0", "m1", "m3", "m4"))
    assert server.survivors == ("m0", "m1", "m3", "m4")
    for m in outbox:
        assert np.allclose(clients[m].result(), expected, atol=1e-6)


def test_upload_of_another_round_verifies_but_is_refused_and_undone():
    # Signed by the genuine market, so it is added while hashed; only the session check after
    # the signature refuses it, and the sum must come back to what it was.
    agg, markets, ctx, vecs = _round(4, 70_000, seed=b"replay")
    first = _to_masked_input(*_begin(agg, markets, ctx, vecs))
    server, clients, outbox = _begin(agg, markets, ctx, vecs)
    uploads = _to_masked_input(server, clients, outbox)
    server.receive("m0", uploads["m0"])
    with pytest.raises(ProtocolError, match="another session") as err:
        server.receive("m1", first["m1"])
    assert err.value.market == "m1"
    for m in ("m1", "m2", "m3"):
        server.receive(m, uploads[m])
    outbox = _finish(server, clients, server.end_stage())
    for m in outbox:
        assert np.allclose(clients[m].result(), sum(vecs.values()), atol=1e-6)


def test_repeated_or_unasked_upload_is_refused():
    agg, markets, ctx, vecs = _round(4, 1000, seed=b"repeat")
    server, clients, outbox = _begin(agg, markets, ctx, vecs)
    uploads = _to_masked_input(server, clients, outbox)
    server.receive("m0", uploads["m0"])
    with pytest.raises(ProtocolError, match="repeat"):
        server.receive("m0", uploads["m0"])
    with pytest.raises(ProtocolError, match="not asked"):
        server.receive("x9", uploads["m1"])


def test_handle_after_a_blamed_reply_starts_the_stage_over():
    # A caller that retries handle() without the offender must not count the others twice.
    agg, markets, ctx, vecs = _round(4, 5000, seed=b"retry")
    server, clients, outbox = _begin(agg, markets, ctx, vecs)
    uploads = _to_masked_input(server, clients, outbox)
    bad = dict(uploads, m3=uploads["m3"][:-1] + bytes([uploads["m3"][-1] ^ 1]))
    with pytest.raises(IntegrityError):
        server.handle(bad)
    outbox = _finish(server, clients, server.handle({m: uploads[m] for m in ("m0", "m1", "m2")}))
    for m in outbox:
        assert np.allclose(clients[m].result(), sum(vecs[m] for m in ("m0", "m1", "m2")),
                           atol=1e-6)
