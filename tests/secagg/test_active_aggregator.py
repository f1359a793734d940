"""An active, malicious aggregator against markets that own their policy.

One test per attack of the review: (a) carry on below the minimum cohort, (b) add a market to
the roster, (c) switch the backend or the privacy settings, (d) show colluders and honest markets
different survivor sets, (e) alter or substitute the RESULT, (f) replay into an identical
session. In each, every honest market refuses and nothing secret leaves it: the only way out of
a market is the reply its round returns, and the tests record every reply.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmm_secure.errors import AbortError, IntegrityError, PolicyError, ProtocolError
from fedmm_secure.secagg import MarketPolicy, Roster, RoundContext, create_backend
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import (ADVERTISE, AGREE, CONSISTENCY, MASKED_INPUT, NONCE, RESULT,
                                         SHARE_KEYS, UNMASK, MaskingAggregator)
from fedmm_secure.secagg.masking.wire import (pack_ids, pack_items, pack_sections, sign_message,
                                              unpack_items, unpack_sections)

from .helpers import det_entropy, federation

LENGTH = 16


def _ctx(ids, round_id=1, length=LENGTH):
    return RoundContext("run-active", round_id, tuple(ids), length, 1.0)


def _vectors(ids, seed=0, length=LENGTH):
    rng = np.random.default_rng(seed)
    return {m: rng.uniform(-1, 1, length) for m in ids}


class Round:
    """One masking round driven by hand; ``sent[m]`` is every reply market m produced."""

    def __init__(self, agg, markets, ctx, vecs):
        self.ctx, self.vecs = ctx, vecs
        self.server = agg.begin_round(ctx)
        self.clients = {m: markets[m].begin_round(ctx, vecs[m]) for m in ctx.participants}
        self.sent = {m: [] for m in ctx.participants}
        self.outbox = self.server.start()

    def answer(self, outbox=None):
        out = {}
        for m, msg in (self.outbox if outbox is None else outbox).items():
            reply = self.clients[m].handle(msg)
            self.sent[m].append(reply)
            out[m] = reply
        return out

    def step(self, replies=None):
        self.outbox = self.server.handle(self.answer() if replies is None else replies)

    def stages_sent(self, m):
        return {decode_envelope(r).stage for r in self.sent[m] if r is not None}


def _body(msg):
    return decode_envelope(msg).payload[32:-64]


def _resign(agg, ctx, msg, body):
    """The aggregator, with its own roster key, sends ``body`` instead."""
    env = decode_envelope(msg)
    return sign_message(agg._identity, ctx, env.stage, "aggregator", env.payload[:32], body)


SECRET_STAGES = {SHARE_KEYS, MASKED_INPUT, UNMASK}  # replies that carry shares or the masked input


# -- (a) the aggregator continues after dropouts below the minimum cohort ----------------------

def test_a_round_below_the_minimum_cohort_is_refused():
    ids = [f"m{i}" for i in range(3)]
    agg, markets, _, policy = federation(MaskingAggregator(entropy=det_entropy(b"a")), ids)
    assert policy.min_cohort == 3
    # After two of three markets dropped, the aggregator starts a "sum" over the last one.
    with pytest.raises(PolicyError, match="minimum cohort"):
        markets["m0"].begin_round(_ctx(["m0"]), np.ones(LENGTH))
    with pytest.raises(PolicyError):
        markets["m0"].begin_round(_ctx(["m0", "m1"]), np.ones(LENGTH))


def test_a_survivor_set_shrinking_below_the_minimum_mid_round_is_refused():
    ids = [f"m{i}" for i in range(5)]
    # The aggregator sized t for c = 0 (t = 4 of 5); the markets' minimum cohort is 4.
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(b"a2"), colluders=0), ids,
                                    min_cohort=4, colluders=0)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    r.step()
    r.step()
    r.step()
    r.step()   # masked inputs uploaded by all five
    # Claim only three uploaded: below every market's minimum; nobody signs that survivor set.
    for m in ("m0", "m1", "m2"):
        msg = _resign(agg, r.ctx, r.outbox[m], pack_ids(("m0", "m1", "m2")))
        with pytest.raises(PolicyError):
            r.clients[m].handle(msg)
    assert all(UNMASK not in r.stages_sent(m) and CONSISTENCY not in r.stages_sent(m) for m in ids)


# -- (b) the aggregator adds a market to the roster it hands out --------------------------------

def test_b_a_roster_with_an_extra_market_is_refused():
    be = MaskingAggregator(entropy=det_entropy(b"b"))
    ids = ["m0", "m1", "m2"]
    agg, markets, roster, policy = federation(be, ids)
    fake = be.create_market("m9")  # the aggregator's puppet
    forged = Roster({**roster.entries, "m9": fake.public_bundle()}, aggregator=roster.aggregator)
    victim = be.create_market("m0")
    with pytest.raises(PolicyError, match="pinned"):
        victim.install_roster(forged, policy=MarketPolicy.pin(roster, backends={"masking"},
                                                              privacy={}))
    # Nor can a round name a participant outside the pinned roster.
    with pytest.raises(ProtocolError):
        markets["m0"].begin_round(_ctx(ids + ["m9"]), np.ones(LENGTH))
    # A roster with the aggregator's key swapped is another roster too.
    swapped = Roster(roster.entries, aggregator=be.create_aggregator().public_bundle())
    with pytest.raises(PolicyError):
        be.create_market("m0").install_roster(swapped, policy=policy)


# -- (c) the aggregator asks for plain, or other privacy settings -------------------------------

def test_c_plain_or_other_privacy_settings_are_refused():
    ids = ["m0", "m1", "m2"]
    agg, markets, roster, policy = federation(MaskingAggregator(entropy=det_entropy(b"c")), ids,
                                              privacy={"enabled": True, "epsilon": 4.0})
    plain = create_backend("plain", allow_insecure=True).create_market("m0")
    with pytest.raises(PolicyError, match="plain"):
        plain.install_roster(roster, policy=policy)
    with pytest.raises(PolicyError, match="privacy"):
        policy.check_privacy({"enabled": False})
    with pytest.raises(PolicyError, match="privacy"):
        policy.check_privacy({"enabled": True, "epsilon": 40.0})
    policy.check_privacy({"epsilon": 4.0, "enabled": True})  # its own settings, in any order


# -- (d) different survivor lists to different markets, with colluders --------------------------

def test_d_equivocation_with_three_colluders_is_refused():
    # 5 markets, 3 colluding with the aggregator (c1, c2, c3). The attack: tell the target t0
    # that h1 dropped and h1 that t0 dropped, so t0 reveals its self-mask share and h1 its share
    # of t0's mask key; with the colluders' shares that is t = 4 of each (2t - n = 3 = c).
    ids = ["c1", "c2", "c3", "h1", "t0"]
    be = MaskingAggregator(entropy=det_entropy(b"d0"), threshold=4)
    agg, markets, _, _ = federation(be, ids, colluders=3)
    # Markets that assume c = 3 need 2t > n + c, i.e. t = 5: the old default t = 4 is refused
    # before any key is drawn.
    with pytest.raises(PolicyError, match="2t > n \\+ c"):
        markets["t0"].begin_round(_ctx(ids), np.ones(LENGTH))
    # At t = 5 the aggregator can run the round but not the split: an honest market signs a
    # survivor view (and later reveals) only if at least t markets are in it.
    be = MaskingAggregator(entropy=det_entropy(b"d"), colluders=3)
    agg, markets, _, _ = federation(be, ids, colluders=3)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    for _ in range(4):
        r.step()   # everyone uploaded; CONSISTENCY requests in the outbox
    views = {"t0": ("c1", "c2", "c3", "t0"), "h1": ("c1", "c2", "c3", "h1")}
    for target, view in views.items():
        with pytest.raises(AbortError):
            r.clients[target].handle(_resign(agg, r.ctx, r.outbox[target], pack_ids(view)))
        # Colluders sign anything; even with their signatures the honest market refuses.
        sigs = {m: sign_message(markets[m]._identity, r.ctx, CONSISTENCY, m,
                                decode_envelope(r.outbox[m]).payload[:32], pack_ids(view))
                for m in view}
        dropped = tuple(sorted(set(ids) - set(view)))
        req = pack_sections(pack_items(sorted(sigs.items())), pack_ids(view), pack_ids(dropped))
        with pytest.raises(ProtocolError):
            r.clients[target].handle(_resign(agg, r.ctx, r.outbox[target], req))
        assert not ({CONSISTENCY, UNMASK} & r.stages_sent(target))


# -- (e) altered or substituted RESULT -----------------------------------------------------------

def _masking_to_result(seed=b"e"):
    ids = [f"m{i}" for i in range(4)]
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(seed)), ids)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    for _ in range(6):
        r.step()
    assert decode_envelope(next(iter(r.outbox.values()))).stage == RESULT
    return agg, r


def test_e_masking_result_altered_in_transit_or_shown_differently_is_refused():
    agg, r = _masking_to_result()
    genuine = dict(r.outbox)
    flipped = bytearray(genuine["m1"])
    flipped[-100] ^= 0x01                    # one coordinate of the sum
    with pytest.raises(IntegrityError):
        r.clients["m1"].handle(bytes(flipped))
    # The aggregator itself shows m1 another (signed) sum: m1 decodes it but does not use it.
    ids_raw, to_raw, vec = unpack_sections(_body(genuine["m1"]), 3)
    other = bytearray(vec)
    other[0] ^= 0x01
    lie = _resign(agg, r.ctx, genuine["m1"], pack_sections(ids_raw, to_raw, bytes(other)))
    echoes = {m: r.clients[m].handle(lie if m == "m1" else msg) for m, msg in genuine.items()}
    with pytest.raises(ProtocolError):       # an honest aggregator sees it too
        r.server.handle(echoes)
    agree = _resign(agg, r.ctx, genuine["m0"], pack_items(sorted(echoes.items())))
    agree = sign_message(agg._identity, r.ctx, AGREE, "aggregator",
                         decode_envelope(genuine["m0"]).payload[:32], _body(agree))
    for m in r.ctx.participants:
        with pytest.raises(IntegrityError):  # every market sees that m1 confirmed another result
            r.clients[m].handle(agree)
        assert not r.clients[m].done
        with pytest.raises(ProtocolError):
            r.clients[m].result()


def test_e_masking_confirmations_cannot_be_forged_or_reflected():
    # Markets check each other's confirmations by pairwise tags (not by signatures): the
    # aggregator, without the pair's key, can neither forge m1's tag to m0 nor pass off m0's own
    # tag to m1 as m1's tag to m0.
    agg, r = _masking_to_result(b"e2")
    echoes = r.answer()
    env = decode_envelope(echoes["m1"])
    digest, tags_raw = unpack_sections(env.payload[32:-64], 2)
    m0_tags = unpack_items(unpack_sections(decode_envelope(echoes["m0"]).payload[32:-64], 2)[1])
    for fake_tag in (bytes(32), m0_tags["m1"]):
        tags = dict(unpack_items(tags_raw), m0=fake_tag)
        # "From m1", signed with the aggregator's key (it has no other).
        forged = sign_message(agg._identity, r.ctx, RESULT, "m1", env.payload[:32],
                              pack_sections(digest, pack_items(sorted(tags.items()))))
        agree = sign_message(agg._identity, r.ctx, AGREE, "aggregator",
                             decode_envelope(r.outbox["m0"]).payload[:32],
                             pack_items(sorted(dict(echoes, m1=forged).items())))
        with pytest.raises(IntegrityError):
            r.clients["m0"].handle(agree)
        assert not r.clients["m0"].done
    r.step(echoes)                    # the genuine confirmations still release the sum
    assert all(v is None for v in r.answer().values())
    assert np.allclose(r.clients["m0"].result(), sum(r.vecs.values()), atol=1e-6)


def test_e_ckks_result_replaced_by_one_markets_upload_is_refused():
    pytest.importorskip("tenseal")
    from fedmm_secure.secagg.ckks.wire import RESULT as CK_RESULT
    from fedmm_secure.secagg.ckks.wire import pack, signed, unpack, verify

    ids = ["de", "fr", "jp", "us"]
    be = create_backend("ckks", allow_insecure=False, n_threads=1)
    agg, markets, _, _ = federation(be, ids)
    ctx = RoundContext("run-active", 3, tuple(ids), LENGTH, 2.0)
    vecs = _vectors(ids, seed=3)
    server = agg.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, vecs[m]) for m in ids}
    ans = lambda out: {m: clients[m].handle(msg) for m, msg in out.items()}  # noqa: E731
    uploads = ans(server.handle(ans(server.start())))
    results = server.handle(uploads)
    # The aggregator returns jp's own upload as "the sum" to everyone, properly signed.
    session, key_id, jp_ct = unpack(verify(decode_envelope(uploads["jp"]),
                                           markets["jp"]._identity.public_key()), 3)
    fake = signed(ctx, CK_RESULT, "aggregator",
                  pack(session, pack(key_id, ",".join(ids).encode(), jp_ct)), agg._identity)
    for m in ids:
        with pytest.raises(IntegrityError):  # the tag slots are not the four markets' tags
            clients[m].handle(fake)
        assert not clients[m].done
    # A sum over fewer markets than the list claims fails the same check.
    two = server._public.add([jp_ct, unpack(verify(decode_envelope(uploads["de"]),
                                                   markets["de"]._identity.public_key()), 3)[2]],
                             length=LENGTH + 4, scale_bits=clients["de"]._scale_bits)
    fake2 = signed(ctx, CK_RESULT, "aggregator",
                   pack(session, pack(key_id, ",".join(ids).encode(), two)), agg._identity)
    with pytest.raises(IntegrityError):
        clients["de"].handle(fake2)
    # The genuine result still completes (the refusals changed nothing).
    echoes = ans(results)
    assert all(v is None for v in ans(server.handle(echoes)).values())
    expected = sum(np.clip(v, -2, 2) for v in vecs.values())
    assert np.allclose(clients["us"].result(), expected, atol=1e-5)


def test_result_is_decoded_exactly_and_malformed_results_are_refused():
    # Markets hash and decode the RESULT in one chunked pass (several chunks at this length);
    # what they release must equal the aggregator's own decoding bit for bit, and a signed
    # RESULT with a short vector or values outside the ring is refused after the signature.
    ids = [f"m{i}" for i in range(4)]
    length = 150_000
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(b"res"), ring_bits=20), ids)
    r = Round(agg, markets, _ctx(ids, length=length), _vectors(ids, length=length))
    for _ in range(6):
        r.step()
    genuine = dict(r.outbox)
    ids_raw, to_raw, vec = unpack_sections(_body(genuine["m0"]), 3)
    high = bytearray(vec)
    high[4 * 140_000 + 3] |= 0x80     # one coordinate outside Z_2^20, in the last chunk
    for body, match in ((pack_sections(ids_raw, to_raw, bytes(vec[:-4])), "bytes, expected"),
                        (pack_sections(ids_raw, to_raw, bytes(high)), "outside")):
        with pytest.raises(ProtocolError, match=match):
            r.clients["m0"].handle(_resign(agg, r.ctx, genuine["m0"], body))
    r.step()
    assert all(v is None for v in r.answer().values())
    for m in ids:
        assert np.array_equal(r.clients[m].result(), r.server.result())


# -- (f) replay into an otherwise identical session ----------------------------------------------

def test_f_messages_replayed_into_an_identical_session_are_refused():
    ids = [f"m{i}" for i in range(4)]
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(b"f")), ids)
    ctx, vecs = _ctx(ids, round_id=7), _vectors(ids, seed=7)
    first = Round(agg, markets, ctx, vecs)
    first.step()                      # nonces
    old_adverts = first.answer()      # session 1's signed advertisements
    # The aggregator reruns the very same round (same run, round, label, cohort, input).
    second = Round(agg, markets, ctx, vecs)
    second.step()
    second.step()                     # session 2's advertisements -> SHARE_KEYS requests
    genuine = unpack_items(_body(second.outbox["m0"]))
    spliced = dict(genuine, m1=old_adverts["m1"], m2=old_adverts["m2"])
    msg = _resign(agg, ctx, second.outbox["m0"], pack_items(sorted(spliced.items())))
    with pytest.raises(ProtocolError, match="another session"):
        second.clients["m0"].handle(msg)
    # Replaying session 1's whole nonce set (old nonces) into session 2 is refused as well.
    third = Round(agg, markets, ctx, vecs)
    third.answer()
    replay = first.outbox["m3"]       # session 1's ADVERTISE request, signed by the aggregator
    with pytest.raises(IntegrityError):
        third.clients["m3"].handle(replay)
    assert not (SECRET_STAGES & second.stages_sent("m0"))
    assert not (SECRET_STAGES & third.stages_sent("m3"))


def test_f_a_forged_peer_nonce_is_caught_before_any_share_leaves():
    # Markets do not verify their peers' nonce signatures (redundant, see masking.read_nonce):
    # the aggregator forges m1's nonce in what it shows m0. m0 advertises (public keys only)
    # but refuses at SHARE_KEYS, since m1's advertisement is signed over the genuine nonce set.
    ids = [f"m{i}" for i in range(4)]
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(b"fn")), ids)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    r.step()                          # nonces -> ADVERTISE requests carrying the nonce set
    nonces = unpack_items(_body(r.outbox["m0"]))
    forged = bytearray(nonces["m1"])
    forged[-65] ^= 0x01               # last byte of m1's nonce (its signature no longer holds)
    shown = _resign(agg, r.ctx, r.outbox["m0"],
                    pack_items(sorted(dict(nonces, m1=bytes(forged)).items())))
    adverts = r.answer(dict(r.outbox, m0=shown))
    m0_session = decode_envelope(adverts["m0"]).payload[:32]
    assert m0_session != decode_envelope(adverts["m1"]).payload[:32]
    req = sign_message(agg._identity, r.ctx, SHARE_KEYS, "aggregator", m0_session,
                       pack_items(sorted(adverts.items())))
    with pytest.raises(ProtocolError, match="another session"):
        r.clients["m0"].handle(req)
    assert not (SECRET_STAGES & r.stages_sent("m0"))


def test_own_entries_must_come_back_byte_for_byte():
    # Markets compare their own entry of each relayed set with what they sent instead of
    # verifying their own signature: a substituted own entry is an IntegrityError.
    ids = [f"m{i}" for i in range(4)]
    agg, markets, _, _ = federation(MaskingAggregator(entropy=det_entropy(b"own")), ids)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    r.step()
    r.step()                          # SHARE_KEYS requests carry every advertisement
    adverts = unpack_items(_body(r.outbox["m2"]))
    other = sign_message(markets["m2"]._identity, r.ctx, ADVERTISE, "m2",
                         decode_envelope(adverts["m2"]).payload[:32], bytes(64))
    msg = _resign(agg, r.ctx, r.outbox["m2"], pack_items(sorted(dict(adverts, m2=other).items())))
    with pytest.raises(IntegrityError):
        r.clients["m2"].handle(msg)
    r.step()                          # the genuine request still works
    assert SHARE_KEYS in r.stages_sent("m2")


# -- robust reconstruction ------------------------------------------------------------------------

def test_one_corrupt_share_with_enough_valid_ones_still_gives_the_exact_sum():
    ids = [f"m{i}" for i in range(8)]
    be = MaskingAggregator(entropy=det_entropy(b"robust"), threshold=5)
    agg, markets, _, _ = federation(be, ids)
    r = Round(agg, markets, _ctx(ids), _vectors(ids, seed=11))
    for _ in range(2):
        r.step()
    r.step({m: rep for m, rep in r.answer().items() if m != "m7"})   # m7 never shares keys
    for _ in range(2):
        r.step()                      # 7 markets upload and sign the survivor set
    replies = r.answer()              # UNMASK: 7 valid reveals for t = 5
    # m3 corrupts one revealed share and signs the message with its own (valid) key.
    env = decode_envelope(replies["m3"])
    items = unpack_items(env.payload[32:-64])
    share = bytearray(items["m0"])
    share[-1] ^= 0x01
    items["m0"] = bytes(share)
    replies["m3"] = sign_message(markets["m3"]._identity, r.ctx, UNMASK, "m3", env.payload[:32],
                                 pack_items(sorted(items.items())))
    r.step(replies)
    assert r.server.blamed.keys() == {"m3"}
    r.step()                          # confirmations
    assert all(v is None for v in r.answer().values())
    survivors = tuple(m for m in ids if m != "m7")
    assert r.server.survivors == survivors
    expected = sum(r.vecs[m] for m in survivors)
    for m in survivors:
        assert np.allclose(r.clients[m].result(), expected, atol=1e-6)


def test_fewer_than_t_valid_shares_aborts():
    ids = [f"m{i}" for i in range(6)]
    be = MaskingAggregator(entropy=det_entropy(b"few"), threshold=5)
    agg, markets, _, _ = federation(be, ids)
    r = Round(agg, markets, _ctx(ids), _vectors(ids))
    for _ in range(5):
        r.step()
    replies = r.answer()
    for bad in ("m1", "m2"):          # 6 reveals, 2 corrupt: 4 valid < t = 5
        env = decode_envelope(replies[bad])
        items = unpack_items(env.payload[32:-64])
        items["m0"] = items["m0"][:-1] + bytes([items["m0"][-1] ^ 1])
        replies[bad] = sign_message(markets[bad]._identity, r.ctx, UNMASK, bad, env.payload[:32],
                                    pack_items(sorted(items.items())))
    with pytest.raises(AbortError):
        r.step(replies)


def test_stage_order_is_the_documented_one():
    assert (NONCE, ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK, RESULT, AGREE) == tuple(range(8))
