"""Market side of the ``ckks`` backend: the market endpoint (long-term keys, the epoch key it
holds as key holder) and its round state machine."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

from ...primitives.aead import open_sealed, seal
from ...primitives.ckks import CkksSecretContext, error_bound, scale_bits_for
from ...primitives.keys import AgreementPrivateKey, AgreementPublicKey, IdentityPrivateKey
from ...errors import ProtocolError
from ..base import ClientRound, MarketEndpoint, RoundContext, Roster
from ..codec import Envelope, decode_envelope, expect
from .wire import (AGGREGATOR, BACKEND, DONE, KEY_ID_SIZE, KEYS, RESULT, SIG_DOMAIN, UPLOAD,
                   CkksOptions, MarketBundle, parse_ascii, epoch_of, kdf_label, key_holder, nonce_source,
                   normalised, pack, parse_roster, roster_entry, signed, u64, unpack)

__all__ = ["CkksClient", "CkksMarket"]


class CkksClient(ClientRound):
    def __init__(self, market: "CkksMarket", ctx: RoundContext, vector: np.ndarray) -> None:
        self._m, self._ctx = market, ctx
        self._opts = market._opts
        self._epoch = epoch_of(ctx.round_id, self._opts.epoch_rounds)
        self._holder = key_holder(ctx, self._opts.epoch_rounds)
        self._scale_bits = scale_bits_for(self._opts.params, summands=len(ctx.participants))
        self._input, self._clipped = normalised(ctx, vector)
        self._stage = KEYS if self._holder == market.market_id else UPLOAD
        self._key: CkksSecretContext | None = None
        self._key_id: bytes | None = None
        self._result: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()

    # -- stage handlers: parse and verify everything, then commit state at the end --

    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        expect(env, backend=BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=AGGREGATOR)
        if self._stage == KEYS:
            return self._distribute(env)
        if self._stage == UPLOAD:
            return self._upload(env)
        if self._stage == RESULT:
            return self._finish(env)
        raise ProtocolError("round already finished")

    def _distribute(self, env: Envelope) -> bytes:
        if env.payload:
            raise ProtocolError("unexpected payload in key request")
        m, ctx = self._m, self._ctx
        key_id, key = m._epoch_key(ctx.run_id, self._epoch)
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
            sealed = seal(eph.derive(static, context=label), key._hazmat_bytes(),
                          associated_data=label, **nonce_source(self._opts.entropy))
            item = pack(r.encode(), eph_pub, sealed)
            items.append(pack(item, m._identity.sign(SIG_DOMAIN + label + item)))
        body = pack(u64(self._epoch), key_id, public, pack(*items), struct.pack(">I", len(items)))
        reply = signed(ctx, KEYS, m.market_id, body, m._identity)
        self._stage = UPLOAD
        self._key, self._key_id = key, key_id
        return reply

    def _upload(self, env: Envelope) -> bytes:
        m, ctx = self._m, self._ctx
        if self._holder == m.market_id:
            if env.payload:
                raise ProtocolError("the key holder expects no key item")
            key, key_id = self._key, self._key_id
        else:
            key, key_id = self._open_key_item(env.payload)
        ciphertext = key.encrypt(self._input, scale_bits=self._scale_bits)
        reply = signed(ctx, UPLOAD, m.market_id, pack(key_id, ciphertext), m._identity)
        self._key, self._key_id, self._stage = key, key_id, RESULT
        return reply

    def _open_key_item(self, payload: bytes) -> tuple[CkksSecretContext, bytes]:
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
        key = CkksSecretContext._hazmat_from_bytes(secret, self._opts.params,
                                                   n_threads=self._opts.n_threads)
        return key, key_id

    def _finish(self, env: Envelope) -> None:
        key_id, survivors_raw, ciphertext = unpack(env.payload, 3)
        if key_id != self._key_id:
            raise ProtocolError("result encrypted under another key")
        survivors = tuple(parse_ascii(survivors_raw).split(",")) if survivors_raw else ()
        if (not survivors or self._m.market_id not in survivors
                or len(set(survivors)) != len(survivors)
                or not set(survivors) <= set(self._ctx.participants)):
            raise ProtocolError("invalid survivor list")
        normalised = self._key.decrypt(ciphertext, length=self._ctx.length,
                                       scale_bits=self._scale_bits)
        self._result = normalised * self._ctx.bounds()
        self._survivors, self._stage = tuple(sorted(survivors)), DONE
        self._key = None  # the round no longer needs the secret key
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
        # The key this market holds as key holder: (run_id, epoch) -> (key id, context). Only
        # the current epoch is kept, so a past epoch's key is gone once the role moves on.
        self._held: dict[tuple[str, int], tuple[bytes, CkksSecretContext]] = {}

    def public_bundle(self) -> bytes:
        return MarketBundle(self._identity.public_key(), self._static.public_key()).to_bytes()

    def install_roster(self, roster: Roster) -> None:
        bundles = parse_roster(roster)
        mine = roster_entry(bundles, self.market_id)
        if mine.to_bytes() != self.public_bundle():
            raise ProtocolError("the roster holds another bundle for this market")
        self._bundles = bundles

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        for p in ctx.participants:
            roster_entry(self._bundles, p)
        return CkksClient(self, ctx, np.asarray(vector, dtype=np.float64))

    def _epoch_key(self, run_id: str, epoch: int) -> tuple[bytes, CkksSecretContext]:
        slot = (run_id, epoch)
        if slot not in self._held:
            key_id = (self._opts.entropy or os.urandom)(KEY_ID_SIZE)
            key = CkksSecretContext.generate(self._opts.params, n_threads=self._opts.n_threads)
            self._held = {k: v for k, v in self._held.items() if k[0] != run_id}
            self._held[slot] = (bytes(key_id), key)
        return self._held[slot]
