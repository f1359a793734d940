"""Aggregator side of the ``ckks`` backend: relays key items, adds ciphertexts, never decrypts."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

from ...errors import AbortError, ProtocolError
from ...primitives.ckks import CkksPublicContext, scale_bits_for
from ..base import AggregatorEndpoint, RoundContext, Roster, ServerRound
from ..codec import decode_envelope, encode_envelope, expect
from .wire import (AGGREGATOR, BACKEND, DONE, KEY_ID_SIZE, KEYS, RESULT, UPLOAD, CkksOptions,
                   MarketBundle, parse_ascii, envelope_for, epoch_of, key_holder, pack, parse_roster, roster_entry,
                   u64, unpack, verify)

__all__ = ["CkksServer", "CkksAggregatorEndpoint"]


class CkksServer(ServerRound):
    def __init__(self, ctx: RoundContext, bundles: Mapping[str, MarketBundle], opts: CkksOptions) -> None:
        for p in ctx.participants:
            roster_entry(bundles, p)
        self._ctx, self._bundles, self._opts = ctx, bundles, opts
        self._epoch = epoch_of(ctx.round_id, opts.epoch_rounds)
        self._holder = key_holder(ctx, opts.epoch_rounds)
        self._scale_bits = scale_bits_for(opts.params, summands=len(ctx.participants))
        self._stage = KEYS
        self._public: CkksPublicContext | None = None
        self._key_id: bytes | None = None
        self._survivors: tuple[str, ...] = ()

    @property
    def key_holder(self) -> str:
        return self._holder

    @property
    def public_context(self) -> CkksPublicContext | None:
        """The evaluation context received from the key holder (no secret key)."""
        return self._public

    def start(self) -> dict[str, bytes]:
        return {self._holder: encode_envelope(envelope_for(self._ctx, KEYS, AGGREGATOR, b""))}

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        for m in replies:
            if m not in self._ctx.participants:
                raise ProtocolError(f"reply from non-participant {m!r}")
        if self._stage == KEYS:
            return self._keys(replies)
        if self._stage == UPLOAD:
            return self._sum(replies)
        raise ProtocolError("round already finished")

    def _keys(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        ctx = self._ctx
        if set(replies) - {self._holder}:
            raise ProtocolError("only the key holder answers the key request")
        if self._holder not in replies:
            raise AbortError(f"key holder {self._holder!r} dropped out before distributing keys")
        env = decode_envelope(replies[self._holder])
        expect(env, backend=BACKEND, stage=KEYS, round_id=ctx.round_id, run_id=ctx.run_id,
               label=ctx.label, sender=self._holder)
        body = verify(env, roster_entry(self._bundles, self._holder).identity)
        epoch, key_id, public, items_raw, count_raw = unpack(body, 5)
        if epoch != u64(self._epoch) or len(key_id) != KEY_ID_SIZE or len(count_raw) != 4:
            raise ProtocolError("key distribution for another epoch or malformed")
        recipients = [p for p in ctx.participants if p != self._holder]
        (count,) = struct.unpack(">I", count_raw)
        if count != len(recipients):
            raise ProtocolError("key distribution does not cover every participant")
        items = unpack(items_raw, count)
        digest = hashlib.sha256(public).digest()
        out = {}
        for r, entry in zip(recipients, items):
            item, sig = unpack(entry, 2)
            to, _eph, _sealed = unpack(item, 3)
            if parse_ascii(to) != r:
                raise ProtocolError("key items out of order")
            out[r] = encode_envelope(envelope_for(ctx, UPLOAD, AGGREGATOR, pack(key_id, digest, item, sig)))
        public_ctx = CkksPublicContext.from_bytes(public, self._opts.params,
                                                  n_threads=self._opts.n_threads)
        out[self._holder] = encode_envelope(envelope_for(ctx, UPLOAD, AGGREGATOR, b""))
        self._public, self._key_id, self._stage = public_ctx, key_id, UPLOAD
        return dict(sorted(out.items()))

    def _sum(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        ctx = self._ctx
        got, ciphertexts = [], []
        for m in sorted(replies):
            env = decode_envelope(replies[m])
            expect(env, backend=BACKEND, stage=UPLOAD, round_id=ctx.round_id,
                   run_id=ctx.run_id, label=ctx.label, sender=m)
            body = verify(env, roster_entry(self._bundles, m).identity)
            key_id, ciphertext = unpack(body, 2)
            if key_id != self._key_id:
                raise ProtocolError(f"upload of {m!r} is encrypted under another key")
            got.append(m)
            ciphertexts.append(ciphertext)
        if not got:
            raise AbortError("no market submitted an input")
        total = self._public.add(ciphertexts, length=ctx.length, scale_bits=self._scale_bits)
        payload = pack(self._key_id, ",".join(got).encode(), total)
        self._survivors, self._stage = tuple(got), DONE
        return {m: encode_envelope(envelope_for(ctx, RESULT, AGGREGATOR, payload)) for m in got}

    @property
    def done(self) -> bool:
        return self._stage == DONE

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._survivors


class CkksAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, opts: CkksOptions) -> None:
        self._opts = opts
        self._bundles: dict[str, MarketBundle] = {}

    def install_roster(self, roster: Roster) -> None:
        self._bundles = parse_roster(roster)

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        return CkksServer(ctx, self._bundles, self._opts)
