"""Aggregator side of the ``ckks`` backend: relays key items and nonces, adds ciphertexts, never
decrypts. It signs every message it sends with its roster key."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

from ...errors import AbortError, ProtocolError
from ...primitives.ckks import CkksPublicContext, scale_bits_for
from ...primitives.keys import IdentityPrivateKey
from ..base import AggregatorEndpoint, RoundContext, Roster, ServerRound
from ..codec import decode_envelope, expect
from .wire import (AGGREGATOR, AGREE, BACKEND, DONE, KEY_ID_SIZE, KEYS, NONCE_SIZE, RESULT,
                   TAG_SLOTS, UPLOAD, CkksOptions, MarketBundle, epoch_of, key_holder, pack,
                   pack_map, parse_ascii, parse_roster, result_digest, roster_entry, session_digest,
                   session_with_nonces, signed, u64, unpack, verify)

__all__ = ["CkksServer", "CkksAggregatorEndpoint"]


class CkksServer(ServerRound):
    def __init__(self, ctx: RoundContext, bundles: Mapping[str, MarketBundle], opts: CkksOptions, *,
                 identity: IdentityPrivateKey, roster_digest: bytes) -> None:
        for p in ctx.participants:
            roster_entry(bundles, p)
        self._ctx, self._bundles, self._opts = ctx, bundles, opts
        self._identity = identity
        self._epoch = epoch_of(ctx.round_id, opts.epoch_rounds)
        self._holder = key_holder(ctx, opts.epoch_rounds)
        self._scale_bits = scale_bits_for(opts.params, summands=len(ctx.participants))
        self._base = session_digest(ctx, roster_digest, opts.epoch_rounds)
        self._session = b""
        self._stage = KEYS
        self._public: CkksPublicContext | None = None
        self._key_id: bytes | None = None
        self._digest = b""
        self._survivors: tuple[str, ...] = ()
        self._done = False

    @property
    def key_holder(self) -> str:
        return self._holder

    @property
    def public_context(self) -> CkksPublicContext | None:
        """The evaluation context received from the key holder (no secret key)."""
        return self._public

    def _send(self, stage: int, session: bytes, body: bytes) -> bytes:
        return signed(self._ctx, stage, AGGREGATOR, pack(session, body), self._identity)

    def _open(self, m: str, data: bytes, stage: int) -> bytes:
        ctx = self._ctx
        env = decode_envelope(data)
        expect(env, backend=BACKEND, stage=stage, round_id=ctx.round_id, run_id=ctx.run_id,
               label=ctx.label, sender=m)
        return verify(env, roster_entry(self._bundles, m).identity)

    def start(self) -> dict[str, bytes]:
        msg = self._send(KEYS, self._base, b"")
        return {m: msg for m in self._ctx.participants}

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        for m in replies:
            if m not in self._ctx.participants:
                raise ProtocolError(f"reply from non-participant {m!r}")
        if self._stage == KEYS:
            return self._keys(replies)
        if self._stage == UPLOAD:
            return self._sum(replies)
        if self._stage == RESULT:
            return self._agree(replies)
        raise ProtocolError("round already finished")

    def _keys(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        ctx = self._ctx
        if self._holder not in replies:
            raise AbortError(f"key holder {self._holder!r} dropped out before distributing keys")
        nonce_msgs, nonces, keys_msg = {}, {}, b""
        for m in sorted(replies):
            nonce_msg, extra = unpack(replies[m], 2)
            base, nonce = unpack(self._open(m, nonce_msg, KEYS), 2)
            if base != self._base or len(nonce) != NONCE_SIZE:
                raise ProtocolError(f"nonce of {m!r} is for another session")
            if (m == self._holder) != bool(extra):
                raise ProtocolError("only the key holder distributes keys")
            nonce_msgs[m], nonces[m] = nonce_msg, nonce
            if m == self._holder:
                keys_msg = extra
        body = self._open(self._holder, keys_msg, KEYS)
        epoch, key_id, public, items_raw, count_raw = unpack(body, 5)
        if epoch != u64(self._epoch) or len(key_id) != KEY_ID_SIZE or len(count_raw) != 4:
            raise ProtocolError("key distribution for another epoch or malformed")
        recipients = [p for p in ctx.participants if p != self._holder]
        (count,) = struct.unpack(">I", count_raw)
        if count != len(recipients):
            raise ProtocolError("key distribution does not cover every participant")
        items = dict(zip(recipients, unpack(items_raw, count)))
        digest = hashlib.sha256(public).digest()
        out = {}
        relayed = pack_map(nonce_msgs)
        for r in sorted(nonce_msgs):
            item_msg = b""
            if r != self._holder:
                item, sig = unpack(items[r], 2)
                to, _eph, _sealed = unpack(item, 3)
                if parse_ascii(to) != r:
                    raise ProtocolError("key items out of order")
                item_msg = pack(key_id, digest, item, sig)
            out[r] = self._send(UPLOAD, self._base, pack(relayed, item_msg))
        public_ctx = CkksPublicContext.from_bytes(public, self._opts.params,
                                                  n_threads=self._opts.n_threads)
        self._public, self._key_id, self._stage = public_ctx, key_id, UPLOAD
        self._session = session_with_nonces(self._base, nonces)
        return out

    def _sum(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        got, ciphertexts = [], []
        for m in sorted(replies):
            session, key_id, ciphertext = unpack(self._open(m, replies[m], UPLOAD), 3)
            if session != self._session:
                raise ProtocolError(f"upload of {m!r} belongs to another session")
            if key_id != self._key_id:
                raise ProtocolError(f"upload of {m!r} is encrypted under another key")
            got.append(m)
            ciphertexts.append(ciphertext)
        if not got:
            raise AbortError("no market submitted an input")
        total = self._public.add(ciphertexts, length=self._ctx.length + TAG_SLOTS,
                                 scale_bits=self._scale_bits)
        msg = self._send(RESULT, self._session, pack(self._key_id, ",".join(got).encode(), total))
        self._survivors, self._stage = tuple(got), RESULT
        self._digest = result_digest(msg)
        return {m: msg for m in got}

    def _agree(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        for m in sorted(replies):
            if unpack(self._open(m, replies[m], RESULT), 2) != [self._session, self._digest]:
                raise ProtocolError(f"{m!r} confirmed another result")
        if tuple(sorted(replies)) != self._survivors:
            # Markets use the sum only when every survivor confirmed it.
            self._survivors, self._stage = (), DONE
            raise AbortError("not every survivor confirmed the result; nothing released")
        msg = self._send(AGREE, self._session, pack_map(dict(replies)))
        self._stage, self._done = DONE, True
        return {m: msg for m in self._survivors}

    @property
    def done(self) -> bool:
        return self._done

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._survivors if self._done else ()


class CkksAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, opts: CkksOptions) -> None:
        self._opts = opts
        self._identity = IdentityPrivateKey.generate(entropy=opts.entropy)
        self._bundles: dict[str, MarketBundle] = {}
        self._roster_digest = b""

    def public_bundle(self) -> bytes:
        return self._identity.public_key().to_bytes()

    def install_roster(self, roster: Roster) -> None:
        if roster.aggregator != self.public_bundle():
            raise ProtocolError("the roster holds another aggregator key")
        self._bundles, self._roster_digest = parse_roster(roster), roster.digest()

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        return CkksServer(ctx, self._bundles, self._opts, identity=self._identity,
                          roster_digest=self._roster_digest)
