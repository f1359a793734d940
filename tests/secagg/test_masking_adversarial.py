"""Tampering, replay, reordering and a curious aggregator against the ``masking`` backend.

Every rejected message must leave the receiver's state unchanged: after each failure the test
carries on with the honest messages and the round still produces the right sum.
"""

import numpy as np
import pytest

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.secagg import RoundContext
from fedmm_secure.secagg.codec import Envelope, decode_envelope, encode_envelope
from fedmm_secure.secagg.masking import (ADVERTISE, CONSISTENCY, MASKED_INPUT, SHARE_KEYS,
                                         UNMASK, MaskingAggregator)
from fedmm_secure.secagg.masking.wire import (pack_ids, pack_items, pack_sections, sign_message,
                                              unpack_items, unpack_sections)

from .helpers import det_entropy, federation

N, LENGTH = 5, 64


class Harness:
    """Drives one round stage by stage so tests can interfere between stages."""

    def __init__(self, seed=b"adv", round_id=1):
        be = MaskingAggregator(entropy=det_entropy(seed))
        self.ids = [f"m{i}" for i in range(N)]
        self.agg, self.markets, _, _ = federation(be, self.ids)
        self.ctx = RoundContext("run-adv", round_id, tuple(self.ids), LENGTH, 1.0)
        rng = np.random.default_rng(5)
        self.vecs = {m: rng.uniform(-1, 1, LENGTH) for m in self.ids}
        self.server = self.agg.begin_round(self.ctx)
        self.clients = {m: self.markets[m].begin_round(self.ctx, self.vecs[m]) for m in self.ids}
        self.outbox = self.server.start()
        self.stage = 0

    def replies(self):
        return {m: self.clients[m].handle(msg) for m, msg in self.outbox.items()}

    def step(self, replies=None):
        replies = self.replies() if replies is None else replies
        self.last_replies = replies
        self.outbox = self.server.handle(replies)
        self.stage += 1
        return replies

    def run_to(self, stage):
        while self.stage < stage:
            self.step()

    def finish(self):
        while not self.server.done:
            self.step()
        for m, msg in self.outbox.items():
            assert self.clients[m].handle(msg) is None
        expected = sum(self.vecs[m] for m in self.server.survivors)
        for m in self.outbox:
            assert np.allclose(self.clients[m].result(), expected, atol=1e-6)
        assert np.allclose(self.server.result(), expected, atol=1e-6)


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x40
    return bytes(b)


def _rewrap(message: bytes, payload: bytes) -> bytes:
    env = decode_envelope(message)
    return encode_envelope(Envelope(env.backend, env.stage, env.round_id, env.run_id, env.label,
                                    env.sender, payload))


def _body(message: bytes) -> bytes:
    return decode_envelope(message).payload[32:-64]


def _resign(h, message: bytes, body: bytes) -> bytes:
    """The aggregator itself (with its roster key) sends ``body`` instead: a malicious server."""
    env = decode_envelope(message)
    return sign_message(h.agg._identity, h.ctx, env.stage, "aggregator", env.payload[:32], body)


@pytest.mark.parametrize("stage", [ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK])
def test_tampered_reply_is_rejected_and_state_survives(stage):
    h = Harness()
    h.run_to(stage)
    replies = h.replies()
    for pos in (-1, -70, len(replies["m2"]) // 2):  # signature, payload end, payload middle
        bad = dict(replies, m2=_flip(replies["m2"], pos))
        with pytest.raises(IntegrityError):
            h.server.handle(bad)
    h.step(replies)
    h.finish()


@pytest.mark.parametrize("stage", [ADVERTISE, MASKED_INPUT, UNMASK])
def test_truncated_malformed_and_misaddressed_replies(stage):
    h = Harness()
    h.run_to(stage)
    replies = h.replies()
    for bad in (replies["m1"][:-1], replies["m1"][:10], b"", b"garbage" * 20, "text",
                replies["m1"] + b"\x00"):
        with pytest.raises(ProtocolError):
            h.server.handle(dict(replies, m1=bad))
    with pytest.raises(ProtocolError):  # m0's valid message passed off as m1's
        h.server.handle(dict(replies, m1=replies["m0"]))
    with pytest.raises(ProtocolError):  # not a participant
        h.server.handle(dict(replies, intruder=replies["m0"]))
    h.step(replies)
    h.finish()


def test_replayed_and_late_replies_are_rejected():
    h = Harness()
    first = h.step()
    second = h.replies()
    with pytest.raises(ProtocolError):  # stage-0 reply replayed at stage 1
        h.server.handle(dict(second, m3=first["m3"]))
    h.step(second)
    h.step()
    h.step(dict((m, r) for m, r in h.replies().items() if m != "m4"))  # m4 drops at stage 3
    msgs = {m: h.clients[m].handle(msg) for m, msg in h.outbox.items()}
    with pytest.raises(ProtocolError):  # m4 is gone; it cannot come back (or answer twice)
        h.server.handle(dict(msgs, m4=h.last_replies["m0"]))
    h.step(msgs)
    h.finish()
    with pytest.raises(ProtocolError):
        h.server.handle(msgs)


def test_wrong_length_masked_input_signed_by_a_real_market():
    h = Harness()
    h.run_to(MASKED_INPUT)
    replies = h.replies()
    session = decode_envelope(replies["m2"]).payload[:32]
    ident = h.markets["m2"]._identity  # a market that misbehaves with its own valid key
    for body in (bytes(4 * LENGTH - 4), bytes(4 * LENGTH + 4), bytes(8 * LENGTH)):
        forged = sign_message(ident, h.ctx, MASKED_INPUT, "m2", session, body)
        with pytest.raises(ProtocolError):
            h.server.handle(dict(replies, m2=forged))
    h.step(replies)
    h.finish()


def test_client_rejects_wrong_stage_round_and_replay():
    h = Harness()
    other = Harness(round_id=2)
    start_msgs = dict(h.outbox)
    h.step()
    with pytest.raises(ProtocolError):  # replay of the advertise request
        h.clients["m0"].handle(start_msgs["m0"])
    with pytest.raises(ProtocolError):  # message of another round
        h.clients["m0"].handle(other.outbox["m0"])
    other.step()
    with pytest.raises(ProtocolError):  # right stage, wrong round (and other keys)
        h.clients["m0"].handle(other.outbox["m0"])
    h.step()  # -> masked input requests in outbox
    masked_req = dict(h.outbox)
    h.step()
    with pytest.raises(ProtocolError):  # reordered: an old stage message after a newer one
        h.clients["m1"].handle(masked_req["m1"])
    with pytest.raises(ProtocolError):
        h.clients["m1"].handle(h.outbox["m1"][:-3])
    with pytest.raises(ProtocolError):
        h.clients["m1"].handle(b"\x00" * 40)
    h.finish()


def test_client_rejects_out_of_order_result():
    h = Harness()
    msgs = dict(h.outbox)
    skipped = Harness()
    skipped.run_to(UNMASK)
    with pytest.raises(ProtocolError):
        h.clients["m0"].handle(skipped.outbox["m0"])
    h.clients["m0"].handle(msgs["m0"])  # state untouched: the right message still works


def test_relay_tampering_with_advertisements_or_shares_is_detected():
    h = Harness()
    h.step()
    msg = h.outbox["m3"]
    env = decode_envelope(msg)
    for pos in range(40, len(env.payload), 37):
        with pytest.raises(ProtocolError):  # IntegrityError or a framing error
            h.clients["m3"].handle(_rewrap(msg, _flip(env.payload, pos)))
    h.step()
    msg = h.outbox["m3"]
    env = decode_envelope(msg)
    with pytest.raises(IntegrityError):  # a flipped bit in the aggregator's signature
        h.clients["m3"].handle(_rewrap(msg, _flip(env.payload, len(env.payload) - 5)))
    with pytest.raises(IntegrityError):  # a flipped bit inside a sealed share (re-signed: the
        # aggregator relays it; the AEAD catches it)
        body = bytearray(_body(msg))
        body[-5] ^= 0x01
        h.clients["m3"].handle(_resign(h, msg, bytes(body)))
    h.finish()


def _unmask_request(h, m, *, want_b, want_s):
    msg = h.outbox[m]
    sigs, _, _ = unpack_sections(_body(msg), 3)
    return _resign(h, msg, pack_sections(sigs, pack_ids(want_b), pack_ids(want_s)))


def test_client_refuses_to_reveal_both_shares_of_a_peer():
    h = Harness()
    h.step()
    h.step()
    h.step(dict((m, r) for m, r in h.replies().items() if m != "m4"))  # m4 drops before upload
    h.run_to(UNMASK)
    survivors = ("m0", "m1", "m2", "m3")
    # Both shares of m2 (a survivor): would unmask m2's input.
    with pytest.raises(ProtocolError, match="both"):
        h.clients["m0"].handle(_unmask_request(h, "m0", want_b=survivors, want_s=("m2", "m4")))
    # Claiming survivor m2 dropped (asking its mask key instead of its self-mask)
    with pytest.raises(ProtocolError):
        h.clients["m0"].handle(_unmask_request(h, "m0", want_b=("m0", "m1", "m3"),
                                               want_s=("m2", "m4")))
    h.finish()  # the honest request still goes through


def test_client_rejects_inconsistent_survivor_views():
    h = Harness()
    h.run_to(CONSISTENCY)
    msgs = dict(h.outbox)
    body = _body(msgs["m0"])
    with pytest.raises(ProtocolError):  # survivor set without the recipient
        h.clients["m0"].handle(_resign(h, msgs["m0"], pack_ids(("m1", "m2", "m3", "m4"))))
    with pytest.raises(ProtocolError):  # unknown market in the survivor set
        h.clients["m0"].handle(_resign(h, msgs["m0"], body[:-2] + b"m9"))
    # Show m0 a smaller survivor set than everyone else: its signature will not match theirs.
    small = pack_ids(("m0", "m1", "m2", "m3"))
    replies = {m: h.clients[m].handle(msg if m != "m0" else _resign(h, msg, small))
               for m, msg in msgs.items()}
    with pytest.raises(ProtocolError):  # the aggregator itself sees the mismatch
        h.server.handle(replies)
    honest = dict(replies)
    honest.pop("m0")  # drop the confused market; 4 >= t remain
    h.step(honest)
    h.finish()


def test_consistency_signature_mismatch_detected_by_client():
    h = Harness()
    h.run_to(CONSISTENCY)
    msgs = dict(h.outbox)
    h.step({m: h.clients[m].handle(msg) for m, msg in msgs.items()})
    # Replace m2's consistency signature in m1's unmask request with m2's signature over a
    # different survivor set (a forged view): m1 must refuse.
    msg = h.outbox["m1"]
    sigs, want_b, want_s = unpack_sections(_body(msg), 3)
    session = decode_envelope(h.last_replies["m2"]).payload[:32]
    forged = sign_message(h.markets["m2"]._identity, h.ctx, CONSISTENCY, "m2", session,
                           pack_ids(("m0", "m1", "m2", "m3")))
    items = unpack_items(sigs)
    items["m2"] = forged
    bad = _resign(h, msg, pack_sections(pack_items(sorted(items.items())), want_b, want_s))
    with pytest.raises(IntegrityError):
        h.clients["m1"].handle(bad)
    h.finish()


def test_market_cannot_impersonate_another():
    h = Harness()
    h.run_to(MASKED_INPUT)
    replies = h.replies()
    env = decode_envelope(replies["m1"])
    session, body = env.payload[:32], env.payload[32:-64]
    # m2 signs m1's (or any) upload under m1's name with its own identity key
    forged = sign_message(h.markets["m2"]._identity, h.ctx, MASKED_INPUT, "m1", session, body)
    with pytest.raises(IntegrityError):
        h.server.handle(dict(replies, m1=forged))
    h.step(replies)
    h.finish()
