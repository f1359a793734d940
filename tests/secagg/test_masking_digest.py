"""``masking`` signs BLAKE3 digests: known answer, streamed equals one-shot, bulk messages signed
over BLAKE3 (a SHA-256 signature of the same bytes is refused), and v1 peers are refused clearly."""

import hashlib
from unittest import mock

import numpy as np
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.primitives.keys import SIGNATURE_SIZE, IdentityPrivateKey, IdentityPublicKey
from fedmm_secure.secagg import RoundContext
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import MASKED_INPUT, MaskingAggregator, wire

from .helpers import det_entropy, federation

CTX = RoundContext("run-digest", 3, ("m0", "m1", "m2"), 16, 1.0)


def test_signed_digest_known_answer():
    vec = np.arange(100_000, dtype="<u4") * np.uint32(2654435761)
    parts = [b"FMSA head", bytes(range(32)), memoryview(vec).cast("B")]
    got = wire.signed_digest(parts)
    assert got == b"fedmm-secure/masking/v2/sig" + blake3(
        b"FMSA head" + bytes(range(32)) + vec.tobytes()).digest()
    assert got[-32:].hex() == "44645a19fffcd4e99fc7de9caf51ab2412b959ed081e5df16caf459644294886"


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(1, 5_000), words=st.integers(0, 3_000), extra=st.binary(max_size=40),
       seed=st.integers(0, 2**32 - 1))
def test_streamed_verification_equals_one_shot(chunk, words, extra, seed):
    # The RESULT is hashed in STREAM_CHUNK pieces while decoded; for any chunk size the digest
    # (what recipients echo) must be the one-shot signed_digest of the whole message.
    key = IdentityPrivateKey.generate(entropy=det_entropy(seed.to_bytes(4, "big")))
    vec = np.random.default_rng(seed).integers(0, 2**32, words, dtype=np.uint64).astype("<u4")
    session = hashlib.sha256(b"session").digest()
    body = extra + vec.tobytes()
    msg = wire.sign_message(key, CTX, wire.RESULT, wire.SERVER, session, body)
    seen = []
    with mock.patch.object(wire, "STREAM_CHUNK", chunk):
        opened = wire.open_signed_streamed(
            msg, decode_envelope(msg, view=True), ctx=CTX, stage=wire.RESULT, sender=wire.SERVER,
            session=session, keys={wire.SERVER: key.public_key()}, tail=len(vec.tobytes()),
            consume=lambda part, off: seen.append((off, bytes(part))))
    assert opened is not None
    payload, digest = opened
    assert bytes(payload) == body
    assert digest == wire.signed_digest([memoryview(msg)[:-SIGNATURE_SIZE]])
    assert b"".join(p for _, p in seen) == vec.tobytes()
    assert [off for off, _ in seen] == list(range(0, len(vec.tobytes()), chunk))


def _uploads():
    be = MaskingAggregator(entropy=det_entropy(b"digest"))
    ids = ["m0", "m1", "m2", "m3"]
    agg, markets, roster, _ = federation(be, ids, min_cohort=3)
    ctx = RoundContext("run-digest", 1, tuple(ids), 50_000, 2.0)
    rng = np.random.default_rng(5)
    server = agg.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, rng.uniform(-2, 2, ctx.length)) for m in ids}
    outbox = server.start()
    for _ in range(MASKED_INPUT):
        outbox = server.handle({m: clients[m].handle(msg) for m, msg in outbox.items()})
    return server, clients, roster, {m: clients[m].handle(msg) for m, msg in outbox.items()}


def test_upload_is_signed_over_blake3_and_a_sha256_signature_is_refused():
    server, _, roster, uploads = _uploads()
    msg = uploads["m1"]
    market = IdentityPublicKey.from_bytes(roster.bundle("m1"))
    unsigned = memoryview(msg)[:-SIGNATURE_SIZE]
    market.verify(msg[-SIGNATURE_SIZE:], b"fedmm-secure/masking/v2/sig" + blake3(unsigned).digest())
    with pytest.raises(IntegrityError):
        market.verify(msg[-SIGNATURE_SIZE:],
                      b"fedmm-secure/masking/v1/sig" + hashlib.sha256(unsigned).digest())
    server.receive("m1", msg)   # and the aggregator accepts it


@pytest.mark.parametrize("to", ["server", "client"])
def test_message_of_a_v1_peer_is_refused_with_a_clear_error(to):
    server, clients, _, uploads = _uploads()
    old = bytearray(uploads["m2"])
    assert old[4] == 2        # envelope version byte, right after the magic
    old[4] = 1
    with pytest.raises(ProtocolError, match=r"unsupported message version 1 \(expected 2\)"):
        if to == "server":
            server.receive("m2", bytes(old))
        else:
            clients["m2"].handle(bytes(old))
