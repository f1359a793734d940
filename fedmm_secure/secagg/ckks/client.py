"""Market side of the ``ckks`` backend: the market endpoint (long-term keys, the epoch key it
holds as key holder) and its round state machine.

Every aggregator message must carry the aggregator's roster signature; the round is checked
against the market's own policy; the decrypted sum is used only if its tag slots match the
listed survivors and every survivor confirmed the very same result message.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

from ...errors import IntegrityError, PolicyError, ProtocolError
from ...primitives.aead import open_sealed, seal
from ...primitives.ckks import CkksSecretContext, error_bound, scale_bits_for
from ...primitives.keys import (AgreementPrivateKey, AgreementPublicKey, IdentityPrivateKey,
                                IdentityPublicKey)
from ..base import ClientRound, MarketEndpoint, RoundContext, Roster
from ..codec import decode_envelope, expect
from ..policy import MarketPolicy
from .wire import (AGGREGATOR, AGREE, BACKEND, DONE, KEY_ID_SIZE, KEYS, NONCE_SIZE, RESULT,
                   SIG_DOMAIN, TAG_KEY_SIZE, TAG_SLOTS, TAG_TOLERANCE, UPLOAD, CkksOptions,
                   MarketBundle, epoch_of, kdf_label, key_holder, nonce_source, normalised, pack,
                   parse_ascii, parse_roster, result_digest, roster_entry, session_digest,
                   session_with_nonces, signed, tags, u64, unpack, unpack_map, verify)

__all__ = ["CkksClient", "CkksMarket"]

EpochKey = tuple[bytes, CkksSecretContext, bytes]  # key id, secret context, tag key


class CkksClient(ClientRound):
    def __init__(self, market: CkksMarket, ctx: RoundContext, vector: np.ndarray) -> None:
        self._m, self._ctx = market, ctx
        self._opts = market._opts
        self._epoch = epoch_of(ctx.round_id, self._opts.epoch_rounds)
        self._holder = key_holder(ctx, self._opts.epoch_rounds)
        self._scale_bits = scale_bits_for(self._opts.params, summands=len(ctx.participants))
        self._input, self._clipped = normalised(ctx, vector)
        self._base = session_digest(ctx, market._policy.roster_digest, self._opts.epoch_rounds)
        self._session = b""
        self._stage = KEYS
        self._nonce = b""
        self._u0: tuple[str, ...] = ()
        self._key: CkksSecretContext | None = None
        self._key_id: bytes | None = None
        self._tag_key = b""
        self._pending: np.ndarray | None = None
        self._digest = b""
        self._result: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()

    # -- stage handlers: parse and verify everything, then commit state at the end --

    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        if self._stage == DONE:
            raise ProtocolError("round already finished")
        # The aggregator's signature first: an altered message is the one opaque IntegrityError.
        body = verify(env, self._m._aggregator)
        expect(env, backend=BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=AGGREGATOR)
        session, rest = unpack(body, 2)
        if session != (self._base if self._stage in (KEYS, UPLOAD) else self._session):
            raise ProtocolError("message belongs to another session")
        if self._stage == KEYS:
            return self._distribute(rest)
        if self._stage == UPLOAD:
            return self._upload(rest)
        if self._stage == RESULT:
            return self._finish(rest, result_digest(message))
        return self._agree(rest)

    def _sign(self, stage: int, *fields: bytes) -> bytes:
        return signed(self._ctx, stage, self._m.market_id, pack(*fields), self._m._identity)

    def _distribute(self, payload: bytes) -> bytes:
        if payload:
            raise ProtocolError("unexpected payload in key request")
        nonce = (self._opts.entropy or os.urandom)(NONCE_SIZE)
        nonce_msg = self._sign(KEYS, self._base, nonce)
        keys_msg, key, key_id, tag_key = b"", None, None, b""
        if self._holder == self._m.market_id:
            key_id, key, tag_key = self._m._epoch_key(self._ctx.run_id, self._epoch)
            keys_msg = self._key_distribution(key_id, key, tag_key)
        reply = pack(nonce_msg, keys_msg)
        self._nonce, self._stage = bytes(nonce), UPLOAD
        self._key, self._key_id, self._tag_key = key, key_id, tag_key
        return reply

    def _key_distribution(self, key_id: bytes, key: CkksSecretContext, tag_key: bytes) -> bytes:
        m, ctx = self._m, self._ctx
        public = key.public_bytes()
        digest = hashlib.sha256(public).digest()
        items = []
        for r in ctx.participants:
            if r == m.market_id:
                continue
            static = roster_entry(m._bundles, r).agreement
            eph = AgreementPrivateKey.generate(entropy=self._opts.entropy)
            eph_pub = eph.public_key().to_bytes()
            label = kdf_label(ctx, self._epoch, m.market_id, r, key_id, digest, eph_pub)
            sealed = seal(eph.derive(static, context=label), tag_key + key._hazmat_bytes(),
                          associated_data=label, **nonce_source(self._opts.entropy))
            item = pack(r.encode(), eph_pub, sealed)
            items.append(pack(item, m._identity.sign(SIG_DOMAIN + label + item)))
        body = pack(u64(self._epoch), key_id, public, pack(*items), struct.pack(">I", len(items)))
        return signed(ctx, KEYS, m.market_id, body, m._identity)

    def _upload(self, payload: bytes) -> bytes:
        m, ctx = self._m, self._ctx
        nonce_msgs, key_item = unpack(payload, 2)
        signed_nonces = unpack_map(nonce_msgs)
        u0 = tuple(signed_nonces)
        if m.market_id not in u0 or self._holder not in u0 or not set(u0) <= set(ctx.participants):
            raise ProtocolError("nonce set must hold this market, the key holder, participants only")
        m._policy.check_cohort(u0, "nonce")
        nonces = {}
        for v, blob in signed_nonces.items():
            env = decode_envelope(blob)
            body = verify(env, roster_entry(m._bundles, v).identity)
            expect(env, backend=BACKEND, stage=KEYS, round_id=ctx.round_id, run_id=ctx.run_id,
                   label=ctx.label, sender=v)
            base, nonce = unpack(body, 2)
            if base != self._base or len(nonce) != NONCE_SIZE:
                raise ProtocolError("nonce for another session")
            nonces[v] = nonce
        if nonces[m.market_id] != self._nonce:
            raise IntegrityError()  # our own nonce was replaced: a replayed or spliced session
        if self._holder == m.market_id:
            if key_item:
                raise ProtocolError("the key holder expects no key item")
            key, key_id, tag_key = self._key, self._key_id, self._tag_key
        else:
            key, key_id, tag_key = self._open_key_item(key_item)
        session = session_with_nonces(self._base, nonces)
        values = np.concatenate([self._input, tags(tag_key, session, m.market_id)])
        ciphertext = key.encrypt(values, scale_bits=self._scale_bits)
        reply = self._sign(UPLOAD, session, key_id, ciphertext)
        self._key, self._key_id, self._tag_key = key, key_id, tag_key
        self._session, self._u0, self._stage = session, u0, RESULT
        return reply

    def _open_key_item(self, payload: bytes) -> tuple[CkksSecretContext, bytes, bytes]:
        m, ctx = self._m, self._ctx
        key_id, digest, item, sig = unpack(payload, 4)
        if len(key_id) != KEY_ID_SIZE or len(digest) != 32:
            raise ProtocolError("malformed key item")
        recipient, eph_pub, sealed = unpack(item, 3)
        if parse_ascii(recipient) != m.market_id:
            raise ProtocolError("key item addressed to another market")
        label = kdf_label(ctx, self._epoch, self._holder, m.market_id, key_id, digest, eph_pub)
        roster_entry(m._bundles, self._holder).identity.verify(sig, SIG_DOMAIN + label + item)
        sym = m._static.derive(AgreementPublicKey.from_bytes(eph_pub), context=label)
        secret = open_sealed(sym, sealed, associated_data=label)
        key = CkksSecretContext._hazmat_from_bytes(secret[TAG_KEY_SIZE:], self._opts.params,
                                                   n_threads=self._opts.n_threads)
        return key, key_id, secret[:TAG_KEY_SIZE]

    def _finish(self, payload: bytes, digest: bytes) -> bytes:
        key_id, survivors_raw, ciphertext = unpack(payload, 3)
        if key_id != self._key_id:
            raise ProtocolError("result encrypted under another key")
        survivors = tuple(parse_ascii(survivors_raw).split(",")) if survivors_raw else ()
        if (not survivors or self._m.market_id not in survivors
                or tuple(sorted(set(survivors))) != survivors
                or not set(survivors) <= set(self._u0)):
            raise ProtocolError("invalid survivor list")
        self._m._policy.check_cohort(survivors, "result")
        values = self._key.decrypt(ciphertext, length=self._ctx.length + TAG_SLOTS,
                                   scale_bits=self._scale_bits)
        want = sum(tags(self._tag_key, self._session, v) for v in survivors)
        if not np.all(np.abs(values[self._ctx.length:] - want) <= TAG_TOLERANCE):
            raise IntegrityError()  # not the sum of exactly the listed survivors' uploads
        reply = self._sign(RESULT, self._session, digest)
        self._pending = values[:self._ctx.length] * self._ctx.bounds()
        self._digest, self._survivors, self._stage = digest, survivors, AGREE
        self._key = None  # the round no longer needs the secret key
        return reply

    def _agree(self, payload: bytes) -> None:
        echoes = unpack_map(payload)
        if tuple(echoes) != self._survivors:
            raise ProtocolError("result confirmations must come from every survivor")
        ctx = self._ctx
        for v, blob in echoes.items():
            env = decode_envelope(blob)
            body = verify(env, roster_entry(self._m._bundles, v).identity)
            expect(env, backend=BACKEND, stage=RESULT, round_id=ctx.round_id, run_id=ctx.run_id,
                   label=ctx.label, sender=v)
            if body != pack(self._session, self._digest):
                raise IntegrityError()  # v was shown another result
        self._result, self._pending, self._stage = self._pending, None, DONE
        return None

    def report(self) -> dict:
        n = len(self._survivors) or len(self._ctx.participants)
        bound = error_bound(self._opts.params, summands=n, scale_bits=self._scale_bits)
        return {
            "clipped_coordinates": self._clipped,
            "max_abs_error_bound": float(bound * np.max(self._ctx.bounds())),
            "key_holder": self._holder,
            "epoch": self._epoch,
            "key_id": self._key_id.hex() if self._key_id else None,
            "scale_bits": self._scale_bits,
            "survivors": list(self._survivors),
            "ckks": self._opts.params.to_dict(),
        }


class CkksMarket(MarketEndpoint):
    def __init__(self, market_id: str, opts: CkksOptions) -> None:
        self.market_id = market_id
        self._opts = opts
        self._identity = IdentityPrivateKey.generate(entropy=opts.entropy)
        self._static = AgreementPrivateKey.generate(entropy=opts.entropy)
        self._bundles: dict[str, MarketBundle] = {}
        self._aggregator: IdentityPublicKey | None = None
        self._policy: MarketPolicy | None = None
        # The key this market holds as key holder: (run_id, epoch) -> (key id, context, tag
        # key). Only the current epoch is kept, so a past epoch's key is gone once the role
        # moves on.
        self._held: dict[tuple[str, int], EpochKey] = {}

    def public_bundle(self) -> bytes:
        return MarketBundle(self._identity.public_key(), self._static.public_key()).to_bytes()

    def install_roster(self, roster: Roster, *, policy: MarketPolicy) -> None:
        policy.check_backend(BACKEND)
        policy.check_roster(roster)
        bundles = parse_roster(roster)
        mine = roster_entry(bundles, self.market_id)
        if mine.to_bytes() != self.public_bundle():
            raise ProtocolError("the roster holds another bundle for this market")
        if not roster.aggregator:
            raise PolicyError("the roster names no aggregator key; its messages cannot be checked")
        self._aggregator = IdentityPublicKey.from_bytes(roster.aggregator)
        self._bundles, self._policy = bundles, policy

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        if self._policy is None:
            raise ProtocolError("install the roster before starting a round")
        for p in ctx.participants:
            roster_entry(self._bundles, p)
        self._policy.check_cohort(ctx.participants, "round")
        return CkksClient(self, ctx, np.asarray(vector, dtype=np.float64))

    def _epoch_key(self, run_id: str, epoch: int) -> EpochKey:
        slot = (run_id, epoch)
        if slot not in self._held:
            draw = self._opts.entropy or os.urandom
            key_id, tag_key = bytes(draw(KEY_ID_SIZE)), bytes(draw(TAG_KEY_SIZE))
            key = CkksSecretContext.generate(self._opts.params, n_threads=self._opts.n_threads)
            self._held = {k: v for k, v in self._held.items() if k[0] != run_id}
            self._held[slot] = (key_id, key, tag_key)
        return self._held[slot]
