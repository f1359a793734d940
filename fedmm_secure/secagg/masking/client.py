"""Market side of the ``masking`` backend: one market's state machine for one round."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from ...errors import AbortError, IntegrityError, ProtocolError
from ...primitives.aead import open_sealed, seal
from ...primitives.keys import (AgreementPrivateKey, AgreementPublicKey, IdentityPrivateKey,
                                IdentityPublicKey, SymmetricKey)
from ...primitives.prg import accumulate_masks
from ...primitives.quantization import Quantizer
from ...primitives.shamir import SHARE_SIZE, Share, split_key
from ..base import ClientRound, RoundContext
from ..codec import decode_envelope, expect
from .wire import (ADVERTISE, BACKEND, CONSISTENCY, DOMAIN, FINISHED, KIND_B, KIND_S, MASKED_INPUT,
                   RESULT, SEALED_SHARES, SERVER, SHARE_KEYS, UNMASK, Entropy, b_commitment, context,
                   open_signed, pack_ids, pack_items, pair, parse_advert, ring_vector, share_x,
                   session_digest, sign_message, signed_head, unpack_ids, unpack_items,
                   unpack_sections)

__all__ = ["MaskingClient"]


class MaskingClient(ClientRound):
    def __init__(self, market: str, ctx: RoundContext, vector: np.ndarray, *,
                 identity: IdentityPrivateKey, keys: Mapping[str, IdentityPublicKey],
                 threshold: int, quantizer: Quantizer, entropy: Entropy) -> None:
        if vector.shape != (ctx.length,):
            raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
        self._market, self._ctx = market, ctx
        self._identity, self._keys = identity, keys
        self._t, self._q, self._entropy = threshold, quantizer, entropy
        self._session = session_digest(ctx, threshold, quantizer)
        rng = None
        if quantizer.rounding == "stochastic":
            # Dither only (not a secret): seeded from the entropy source, never from global state.
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(entropy(32), "big")))
        self._encoded, self._clipped = quantizer.quantize(vector, rng=rng)
        self._stage = ADVERTISE
        self._c_key: AgreementPrivateKey | None = None
        self._s_key: AgreementPrivateKey | None = None
        self._peers: dict[str, tuple[AgreementPublicKey, AgreementPublicKey]] = {}
        self._b: SymmetricKey | None = None
        self._own_shares: tuple[Share, Share] | None = None
        self._held: dict[str, tuple[Share, Share]] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._revealed: dict[str, bytes] = {}
        self._result: np.ndarray | None = None

    # -- helpers
    def _sign(self, stage: int, body: bytes) -> bytes:
        return sign_message(self._identity, self._ctx, stage, self._market, self._session, body)

    def _aad(self, sender: str, recipient: str) -> bytes:
        return context(self._session, b"share-aad", sender, recipient)

    def _share_key(self, peer: str, peer_key: AgreementPublicKey) -> SymmetricKey:
        return self._c_key.derive(peer_key, context=context(self._session, b"share-enc",
                                                             *pair(self._market, peer)))

    def _check_quorum(self, ids: Sequence[str], what: str) -> None:
        if len(ids) < self._t:
            raise AbortError(f"{what}: {len(ids)} markets, threshold is {self._t}")

    # -- state machine
    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        if self._stage == FINISHED:
            raise ProtocolError("round already finished")
        expect(env, backend=BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=SERVER)
        handler = (self._advertise, self._share_keys, self._masked_input, self._consistency,
                   self._unmask, self._finish)[self._stage]
        return handler(env.payload)

    def _advertise(self, payload: bytes) -> bytes:
        if payload:
            raise ProtocolError("advertise request must be empty")
        c_key = AgreementPrivateKey.generate(entropy=self._entropy)
        s_key = AgreementPrivateKey.generate(entropy=self._entropy)
        reply = self._sign(ADVERTISE, c_key.public_key().to_bytes() + s_key.public_key().to_bytes())
        self._c_key, self._s_key, self._stage = c_key, s_key, SHARE_KEYS
        return reply

    def _share_keys(self, payload: bytes) -> bytes:
        adverts = unpack_items(payload)
        u1 = tuple(adverts)
        if self._market not in u1 or not set(u1) <= set(self._ctx.participants):
            raise ProtocolError("advertised set must contain this market and participants only")
        self._check_quorum(u1, "advertise")
        peers = {}
        for v, blob in adverts.items():
            body = open_signed(blob, ctx=self._ctx, stage=ADVERTISE, sender=v,
                                session=self._session, keys=self._keys)
            peers[v] = parse_advert(body)
        if peers[self._market] != (self._c_key.public_key(), self._s_key.public_key()):
            raise IntegrityError()  # the relay altered or substituted our own keys
        b = SymmetricKey.generate(entropy=self._entropy)
        xs = [share_x(self._ctx, v) for v in u1]
        b_shares = split_key(b, threshold=self._t, xs=xs, entropy=self._entropy)
        s_shares = split_key(self._s_key, threshold=self._t, xs=xs, entropy=self._entropy)
        sealed = []
        for v, sb, ss in zip(u1, b_shares, s_shares):
            if v == self._market:
                own = (sb, ss)
                continue
            ct = seal(self._share_key(v, peers[v][0]), sb.to_bytes() + ss.to_bytes(),
                      associated_data=self._aad(self._market, v), entropy=self._entropy)
            sealed.append((v, ct))
        reply = self._sign(SHARE_KEYS, b_commitment(self._session, self._market, b)
                           + pack_items(sealed))
        self._peers, self._b, self._own_shares, self._stage = peers, b, own, MASKED_INPUT
        return reply

    def _masked_input(self, payload: bytes) -> bytes:
        incoming = unpack_items(payload)
        u2 = tuple(sorted(set(incoming) | {self._market}))
        if self._market in incoming or not set(incoming) <= set(self._peers):
            raise ProtocolError("shares from markets that did not advertise")
        self._check_quorum(u2, "share-keys")
        me = share_x(self._ctx, self._market)
        held = {}
        for v, ct in incoming.items():
            if len(ct) != SEALED_SHARES:
                raise ProtocolError("sealed shares of the wrong length")
            plain = open_sealed(self._share_key(v, self._peers[v][0]), ct, associated_data=self._aad(v, self._market))
            sb, ss = Share.from_bytes(plain[:SHARE_SIZE]), Share.from_bytes(plain[SHARE_SIZE:])
            if sb.x != me or ss.x != me:
                raise IntegrityError()
            held[v] = (sb, ss)
        held[self._market] = self._own_shares
        add, sub = [self._b], []
        for v in u2:
            if v == self._market:
                continue
            seed = self._s_key.derive(self._peers[v][1],
                                      context=context(self._session, b"pair-mask", *pair(self._market, v)))
            (add if self._market < v else sub).append(seed)
        # Everything above validated the message; masking in place is the first state change
        # (the unmasked encoding must not outlive this stage anyway).
        y = self._encoded
        head = signed_head(self._ctx, MASKED_INPUT, self._market, 4 * y.shape[0])
        digest = hashlib.sha256(head + self._session)
        ring_mask = np.uint32(self._q.modulus - 1)

        def finish(part: np.ndarray) -> None:
            # Reduce and hash each chunk while it is in cache: saves a second pass over the
            # 4 MB upload in main memory (SHA-256 itself, ~2.4 ms per 4 MB, remains).
            if self._q.ring_bits < 32:
                part &= ring_mask
            digest.update(part)

        accumulate_masks(y, add=add, subtract=sub, finish_chunk=finish)
        sig = self._identity.sign(DOMAIN + b"/sig" + digest.digest())
        reply = b"".join([head, self._session, memoryview(y).cast("B"), sig])
        self._held, self._u2, self._stage = held, u2, CONSISTENCY
        self._encoded = np.zeros(0, dtype=np.uint32)
        return reply

    def _consistency(self, payload: bytes) -> bytes:
        u3 = unpack_ids(payload)
        if self._market not in u3 or not set(u3) <= set(self._u2):
            raise ProtocolError("survivor set must contain this market and share-keys markets only")
        self._check_quorum(u3, "masked-input")
        reply = self._sign(CONSISTENCY, pack_ids(u3))
        self._u3, self._stage = u3, UNMASK
        return reply

    def _unmask(self, payload: bytes) -> bytes:
        sigs_raw, want_b_raw, want_s_raw = unpack_sections(payload, 3)
        sigs = unpack_items(sigs_raw)
        want_b, want_s = unpack_ids(want_b_raw), unpack_ids(want_s_raw)
        both = (set(want_b) | set(k for k, kind in self._revealed.items() if kind == KIND_B)) & \
               (set(want_s) | set(k for k, kind in self._revealed.items() if kind == KIND_S))
        if both:
            raise ProtocolError(f"refusing to reveal both shares of {sorted(both)}")
        if self._market not in sigs or not set(sigs) <= set(self._u3):
            raise ProtocolError("consistency signatures must come from survivors, including us")
        self._check_quorum(tuple(sigs), "consistency")
        expected = pack_ids(self._u3)
        for v, blob in sigs.items():
            body = open_signed(blob, ctx=self._ctx, stage=CONSISTENCY, sender=v,
                                session=self._session, keys=self._keys)
            if body != expected:
                raise IntegrityError()  # v was shown a different survivor set
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        if want_b != self._u3 or want_s != dropped:
            raise ProtocolError("unmask request does not match the agreed survivor set")
        items = [(v, KIND_B + self._held[v][0].to_bytes()) for v in want_b]
        items += [(v, KIND_S + self._held[v][1].to_bytes()) for v in want_s]
        reply = self._sign(UNMASK, pack_items(sorted(items)))
        self._revealed.update({v: kind[:1] for v, kind in items})
        self._stage = RESULT
        return reply

    def _finish(self, payload: bytes) -> None:
        ids_raw, vec_raw = unpack_sections(memoryview(payload), 2)  # views: no 4 MB copies
        if unpack_ids(bytes(ids_raw)) != self._u3:
            raise ProtocolError("result is over a different survivor set")
        ring = ring_vector(self._ctx, self._q, vec_raw).astype(np.uint32, copy=False)
        total = self._q.dequantize_sum(ring)
        self._result, self._stage = total, FINISHED
        self._held = {}
        return None

    def report(self) -> dict:
        return {"clipped_coordinates": self._clipped,
                "max_abs_error_bound": self._q.max_abs_error_bound(),
                "ring_bits": self._q.ring_bits,
                "scale": self._q.min_scale,
                "threshold": self._t}

