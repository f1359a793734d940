"""Aggregator side of the ``masking`` backend: relays, checks quorums, unmasks the sum."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ...errors import AbortError, IntegrityError, ProtocolError
from ...primitives.keys import AgreementPrivateKey, AgreementPublicKey, IdentityPublicKey, SymmetricKey
from ...primitives.prg import accumulate_masks
from ...primitives.quantization import Quantizer
from ...primitives.shamir import SHARE_SIZE, Share, recover_secrets
from ..base import RoundContext, ServerRound
from .wire import (ADVERTISE, CONSISTENCY, DIGEST, KIND_B, KIND_S, MASKED_INPUT, RESULT,
                   SEALED_SHARES, SHARE_KEYS, UNMASK, b_commitment, blame, context, open_signed,
                   pack_ids, pack_items, pack_sections, pair, parse_advert, ring_vector,
                   server_message, session_digest, share_x, unpack_items)

__all__ = ["MaskingServer"]


class MaskingServer(ServerRound):
    def __init__(self, ctx: RoundContext, keys: Mapping[str, IdentityPublicKey], *,
                 threshold: int, quantizer: Quantizer) -> None:
        self._ctx, self._keys, self._t, self._q = ctx, keys, threshold, quantizer
        self._session = session_digest(ctx, threshold, quantizer)
        self._stage = ADVERTISE
        self._expected: tuple[str, ...] = ()
        self._adverts: dict[str, bytes] = {}
        self._s_pks: dict[str, AgreementPublicKey] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}
        self._commit: dict[str, bytes] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._ring_sum: np.ndarray | None = None
        self._consistency: dict[str, bytes] = {}
        self._result: np.ndarray | None = None
        self._done = False
        self._aborted = False

    def start(self) -> dict[str, bytes]:
        if self._expected:
            raise ProtocolError("round already started")
        self._expected = self._ctx.participants
        return {m: server_message(self._ctx, ADVERTISE, b"") for m in self._expected}

    def _open(self, m: str, data: bytes) -> bytes:
        return open_signed(data, ctx=self._ctx, stage=self._stage, sender=m, session=self._session,
                            keys=self._keys, view=self._stage == MASKED_INPUT)

    def _abort(self, reason: str) -> None:
        self._aborted = True
        self._adverts, self._sealed, self._ring_sum = {}, {}, None
        raise AbortError(f"{reason}; round aborted, nothing released")

    def _quorum(self, ids: Sequence[str], what: str) -> None:
        if len(ids) < self._t:
            self._abort(f"{what}: {len(ids)} markets answered, threshold is {self._t}")

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        if self._aborted:
            raise AbortError("round was aborted")
        if self._done:
            raise ProtocolError("round already finished")
        if not self._expected:
            raise ProtocolError("round not started")
        for m in replies:
            if m not in self._expected:
                raise ProtocolError(f"reply from {m!r}, who was not asked at this stage "
                                    "(not a participant, dropped earlier, or a repeat)")
        bodies = {}
        for m in sorted(replies):
            try:
                bodies[m] = self._open(m, replies[m])
            except ProtocolError as err:
                raise blame(err, m)
        handler = (self._on_advertise, self._on_share_keys, self._on_masked_input,
                   self._on_consistency, self._on_unmask)[self._stage]
        return handler(bodies, replies)

    def _validate_each(self, bodies: Mapping[str, bytes], check: Callable[[str, bytes], object]
                       ) -> dict[str, object]:
        out = {}
        for m, body in bodies.items():
            try:
                out[m] = check(m, body)
            except ProtocolError as err:
                raise blame(err, m)
        return out

    def _advance(self, stage: int, expected: Sequence[str]) -> None:
        self._stage, self._expected = stage, tuple(expected)

    def _on_advertise(self, bodies, replies) -> dict[str, bytes]:
        parsed = self._validate_each(bodies, lambda m, b: parse_advert(b))
        u1 = tuple(sorted(parsed))
        self._quorum(u1, "advertise")
        self._adverts = {m: bytes(replies[m]) for m in u1}
        self._s_pks = {m: parsed[m][1] for m in u1}
        out = pack_items([(m, self._adverts[m]) for m in u1])
        self._advance(SHARE_KEYS, u1)
        return {m: server_message(self._ctx, SHARE_KEYS, out) for m in u1}

    def _on_share_keys(self, bodies, replies) -> dict[str, bytes]:
        u1 = self._expected

        def check(m: str, body: bytes) -> tuple[bytes, dict[str, bytes]]:
            if len(body) < DIGEST:
                raise ProtocolError("payload truncated")
            items = unpack_items(body[DIGEST:])
            if set(items) != set(u1) - {m}:
                raise ProtocolError("sealed shares must address every other advertised market")
            if any(len(ct) != SEALED_SHARES for ct in items.values()):
                raise ProtocolError("sealed shares of the wrong length")
            return body[:DIGEST], items

        parsed = self._validate_each(bodies, check)
        u2 = tuple(sorted(parsed))
        self._quorum(u2, "share-keys")
        self._commit = {m: parsed[m][0] for m in u2}
        self._sealed = {m: parsed[m][1] for m in u2}
        self._u2 = u2
        self._advance(MASKED_INPUT, u2)
        return {v: server_message(self._ctx, MASKED_INPUT,
                                   pack_items([(u, self._sealed[u][v]) for u in u2 if u != v]))
                for v in u2}

    def _on_masked_input(self, bodies, replies) -> dict[str, bytes]:
        vecs = self._validate_each(bodies, lambda m, b: ring_vector(self._ctx, self._q, b))
        u3 = tuple(sorted(vecs))
        self._quorum(u3, "masked-input")
        total = np.zeros(self._ctx.length, dtype=np.uint32)
        for m in u3:
            np.add(total, vecs[m], out=total)  # wraps mod 2^32 by design
        self._ring_sum, self._u3, self._sealed = total, u3, {}
        self._advance(CONSISTENCY, u3)
        return {m: server_message(self._ctx, CONSISTENCY, pack_ids(u3)) for m in u3}

    def _on_consistency(self, bodies, replies) -> dict[str, bytes]:
        expected = pack_ids(self._u3)

        def check(m: str, body: bytes) -> None:
            if body != expected:
                raise ProtocolError("market signed a different survivor set")

        self._validate_each(bodies, check)
        u4 = tuple(sorted(bodies))
        self._quorum(u4, "consistency")
        self._consistency = {m: bytes(replies[m]) for m in u4}
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        payload = pack_sections(pack_items([(m, self._consistency[m]) for m in u4]),
                                 pack_ids(self._u3), pack_ids(dropped))
        self._advance(UNMASK, u4)
        return {m: server_message(self._ctx, UNMASK, payload) for m in u4}

    def _on_unmask(self, bodies, replies) -> dict[str, bytes]:
        u3 = self._u3
        dropped = tuple(v for v in self._u2 if v not in u3)
        want = {v: KIND_B for v in u3} | {v: KIND_S for v in dropped}

        def check(m: str, body: bytes) -> dict[str, Share]:
            items = unpack_items(body)
            if set(items) != set(want):
                raise ProtocolError("revealed shares do not match the request")
            out = {}
            for v, blob in items.items():
                if blob[:1] != want[v] or len(blob) != 1 + SHARE_SIZE:
                    raise ProtocolError("revealed share of the wrong kind or length")
                share = Share.from_bytes(blob[1:])
                if share.x != share_x(self._ctx, m):
                    raise IntegrityError()
                out[v] = share
            return out

        shares = self._validate_each(bodies, check)
        u5 = tuple(sorted(shares))
        self._quorum(u5, "unmask")
        order = list(u3) + list(dropped)
        secrets = recover_secrets([[shares[m][v] for m in u5] for v in order], threshold=self._t)
        b_keys = []
        for v, raw in zip(u3, secrets[:len(u3)]):
            b = SymmetricKey(raw)
            if b_commitment(self._session, v, b) != self._commit[v]:
                self._abort("a reconstructed self-mask does not match its commitment")
            b_keys.append(b)
        add, sub = [], []
        for v, raw in zip(dropped, secrets[len(u3):]):
            s_key = AgreementPrivateKey._hazmat_from_bytes(raw)
            if s_key.public_key() != self._s_pks[v]:
                self._abort("a reconstructed mask key does not match its signed public key")
            for u in u3:
                seed = s_key.derive(self._s_pks[u], context=context(self._session, b"pair-mask", *pair(u, v)))
                # u added +PRG(s_uv) if u < v, -PRG(s_uv) otherwise; undo it.
                (sub if u < v else add).append(seed)
        total = self._ring_sum
        accumulate_masks(total, add=add, subtract=sub + b_keys)
        if self._q.ring_bits < 32:
            total &= np.uint32(self._q.modulus - 1)
        self._result = self._q.dequantize_sum(total)
        payload = pack_sections(pack_ids(u3), memoryview(total.astype("<u4", copy=False)).cast("B"))
        self._advance(RESULT, ())
        self._done = True
        return {m: server_message(self._ctx, RESULT, payload) for m in u5}

    @property
    def done(self) -> bool:
        return self._done

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._u3 if self._done else ()

    def result(self) -> np.ndarray:
        if self._result is None:
            raise ProtocolError("round not finished")
        return self._result.copy()
