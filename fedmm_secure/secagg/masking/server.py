"""Aggregator side of the ``masking`` backend: relays, checks quorums, unmasks the sum.

The aggregator signs every message it sends with its roster key, over the session the
recipients are in. It rebuilds each missing seed from any t revealed shares that match their
dealer's signed commitment, skipping (and naming in :attr:`MaskingServer.blamed`) the others.

Masked uploads are taken one at a time (:meth:`MaskingServer.receive`): each is hashed for its
signature and added into one running sum chunk by chunk while the chunk is in cache, and can be
dropped by the caller right after, so the aggregator's memory is O(d), not O(n d). The masks are
removed, the sum reduced and the RESULT hashed for its signature in one more chunked pass; the
float sum is decoded only if :meth:`MaskingServer.result` is asked for it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ...errors import AbortError, ProtocolError
from ...primitives.digest import BulkHasher
from ...primitives.keys import (SIGNATURE_SIZE, AgreementPrivateKey, AgreementPublicKey,
                                IdentityPrivateKey, IdentityPublicKey, SymmetricKey)
from ...primitives.prg import accumulate_masks
from ...primitives.quantization import Quantizer
from ...primitives.shamir import SHARE_SIZE, Share, recover_secrets
from ..base import RoundContext, ServerRound
from ..codec import decode_envelope
from .wire import (ADVERTISE, AGREE, CONSISTENCY, DIGEST, DOMAIN, KIND_B, KIND_S, MASKED_INPUT,
                   NONCE, NONCE_SIZE, RESULT, SEALED_SHARES, SERVER, SHARE_KEYS, UNMASK,
                   b_commitment, blame, context, open_signed, open_signed_streamed, pack_ids,
                   pack_items, pack_sections, pair, parse_advert, ring_vector, session_digest,
                   session_with_nonces, share_commitment, share_x, sign_message, signed_digest,
                   signed_head, unpack_items, unpack_sections)

__all__ = ["MaskingServer"]


class MaskingServer(ServerRound):
    def __init__(self, ctx: RoundContext, keys: Mapping[str, IdentityPublicKey], *,
                 identity: IdentityPrivateKey, roster_digest: bytes, threshold: int,
                 quantizer: Quantizer) -> None:
        self._ctx, self._keys, self._t, self._q = ctx, keys, threshold, quantizer
        self._identity = identity
        self._base = session_digest(ctx, threshold, quantizer, roster_digest)
        self._session = self._base
        self._stage = NONCE
        self._expected: tuple[str, ...] = ()
        self._adverts: dict[str, bytes] = {}
        self._s_pks: dict[str, AgreementPublicKey] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}
        self._commit: dict[str, bytes] = {}
        self._share_commits: dict[str, dict[str, bytes]] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._ring_sum: np.ndarray | None = None
        # This stage's verified replies (body, raw) and, at MASKED_INPUT, the running sum.
        self._received: dict[str, tuple[bytes | memoryview, bytes]] = {}
        self._running: np.ndarray | None = None
        # After UNMASK: the reduced ring sum (uint32) the RESULT carries; result() decodes it.
        self._result: np.ndarray | None = None
        self._result_digest = b""
        self._blamed: dict[str, str] = {}
        self._done = False
        self._aborted = False

    @property
    def blamed(self) -> dict[str, str]:
        """Markets whose revealed shares did not match their dealers' commitments, and why."""
        return dict(self._blamed)

    def _sign(self, stage: int, body: bytes | memoryview, session: bytes | None = None
              ) -> tuple[bytes, bytes]:
        session = self._session if session is None else session
        msg = sign_message(self._identity, self._ctx, stage, SERVER, session, body)
        return msg, signed_digest([memoryview(msg)[:-SIGNATURE_SIZE]])

    def _broadcast(self, stage: int, body: bytes | memoryview, to: Sequence[str],
                   session: bytes | None = None) -> dict[str, bytes]:
        msg, _ = self._sign(stage, body, session)  # one envelope, no recipient field: sign once
        return {m: msg for m in to}

    def start(self) -> dict[str, bytes]:
        if self._expected:
            raise ProtocolError("round already started")
        self._expected = self._ctx.participants
        return self._broadcast(NONCE, b"", self._expected)

    def _open(self, m: str, data: bytes) -> bytes:
        return open_signed(data, ctx=self._ctx, stage=self._stage, sender=m, session=self._session,
                           keys=self._keys, view=self._stage == MASKED_INPUT)

    def _abort(self, reason: str) -> None:
        self._aborted = True
        self._adverts, self._sealed, self._ring_sum, self._result = {}, {}, None, None
        self._received, self._running = {}, None
        raise AbortError(f"{reason}; round aborted, nothing released")

    def _quorum(self, ids: Sequence[str], what: str) -> None:
        if len(ids) < self._t:
            self._abort(f"{what}: {len(ids)} markets answered, threshold is {self._t}")

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        # All replies of the stage at once: the stage starts over (a retry after a blamed reply
        # must not count the others twice).
        self._check_open()
        self._received, self._running = {}, None
        for m in sorted(replies):
            self.receive(m, replies[m])
        return self.end_stage()

    def _check_open(self) -> None:
        if self._aborted:
            raise AbortError("round was aborted")
        if self._done:
            raise ProtocolError("round already finished")
        if not self._expected:
            raise ProtocolError("round not started")

    def receive(self, market: str, reply: bytes) -> None:
        """Verify one market's reply to the current stage and keep what the stage needs: a
        masked upload is added into the running sum in the same chunked pass that hashes it
        for its signature, so the caller may drop it at once. A reply that fails (a
        :class:`ProtocolError` naming the market in ``.market``) leaves nothing behind."""
        self._check_open()
        if market not in self._expected or market in self._received:
            raise ProtocolError(f"reply from {market!r}, who was not asked at this stage "
                                "(not a participant, dropped earlier, or a repeat)")
        try:
            if self._stage == MASKED_INPUT:
                self._add_upload(market, reply)
                self._received[market] = (b"", b"")
            else:
                self._received[market] = (self._open(market, reply), reply)
        except ProtocolError as err:
            raise blame(err, market)

    def end_stage(self) -> dict[str, bytes]:
        """Close the stage over the replies received (absent markets have dropped out)."""
        self._check_open()
        received, self._received = self._received, {}
        bodies = {m: received[m][0] for m in sorted(received)}
        replies = {m: received[m][1] for m in sorted(received)}
        handler = (self._on_nonce, self._on_advertise, self._on_share_keys, self._on_masked_input,
                   self._on_consistency, self._on_unmask, self._on_result)[self._stage]
        return handler(bodies, replies)

    def _add_upload(self, m: str, data: bytes) -> None:
        n = self._ctx.length
        if self._running is None:
            self._running = np.zeros(n, dtype=np.uint32)
        total = self._running
        env = decode_envelope(data, view=True)
        if len(env.payload) != DIGEST + 4 * n + SIGNATURE_SIZE:
            # Verified as usual first, so a forged message is still the opaque IntegrityError.
            ring_vector(self._ctx, self._q, self._open(m, data))
            raise ProtocolError("masked upload of the wrong length")  # ring_vector raised
        added = 0
        outside = False

        def add(part: memoryview, offset: int) -> None:
            # Runs before the signature is known to hold: never raises; undone below on failure.
            nonlocal added, outside
            v = np.frombuffer(part, dtype="<u4")
            i = offset // 4
            if self._q.ring_bits < 32 and np.any(v >> np.uint32(self._q.ring_bits)):
                outside = True
            seg = total[i:i + v.shape[0]]
            np.add(seg, v, out=seg)   # wraps mod 2^32 by design
            added = offset + len(part)

        try:
            open_signed_streamed(data, env, ctx=self._ctx, stage=MASKED_INPUT, sender=m,
                                 session=self._session, keys=self._keys, tail=4 * n, consume=add)
            if outside:
                raise ProtocolError(f"vector holds values outside Z_2^{self._q.ring_bits}")
        except BaseException:
            vec = np.frombuffer(memoryview(env.payload)[DIGEST:DIGEST + added], dtype="<u4")
            np.subtract(total[:vec.shape[0]], vec, out=total[:vec.shape[0]])
            raise

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

    def _on_nonce(self, bodies, replies) -> dict[str, bytes]:
        def check(m: str, body: bytes) -> bytes:
            if len(body) != NONCE_SIZE:
                raise ProtocolError("nonce of the wrong length")
            return bytes(body)

        nonces = self._validate_each(bodies, check)
        u0 = tuple(sorted(nonces))
        self._quorum(u0, "nonce")
        out = pack_items([(m, bytes(replies[m])) for m in u0])
        # Markets learn the nonces from this message, so it is still bound to the base session.
        msgs = self._broadcast(ADVERTISE, out, u0, session=self._base)
        self._session = session_with_nonces(self._base, nonces)
        self._advance(ADVERTISE, u0)
        return msgs

    def _on_advertise(self, bodies, replies) -> dict[str, bytes]:
        parsed = self._validate_each(bodies, lambda m, b: parse_advert(b))
        u1 = tuple(sorted(parsed))
        self._quorum(u1, "advertise")
        self._adverts = {m: bytes(replies[m]) for m in u1}
        self._s_pks = {m: parsed[m][1] for m in u1}
        out = pack_items([(m, self._adverts[m]) for m in u1])
        self._advance(SHARE_KEYS, u1)
        return self._broadcast(SHARE_KEYS, out, u1)

    def _on_share_keys(self, bodies, replies) -> dict[str, bytes]:
        u1 = self._expected

        def check(m: str, body: bytes) -> tuple[bytes, dict[str, bytes], dict[str, bytes]]:
            b_commit, commits_raw, sealed_raw = unpack_sections(body, 3)
            commits, items = unpack_items(commits_raw), unpack_items(sealed_raw)
            if len(b_commit) != DIGEST:
                raise ProtocolError("self-mask commitment of the wrong length")
            if set(commits) != set(u1) or any(len(c) != 2 * DIGEST for c in commits.values()):
                raise ProtocolError("share commitments must cover every advertised market")
            if set(items) != set(u1) - {m}:
                raise ProtocolError("sealed shares must address every other advertised market")
            if any(len(ct) != SEALED_SHARES for ct in items.values()):
                raise ProtocolError("sealed shares of the wrong length")
            return bytes(b_commit), commits, items

        parsed = self._validate_each(bodies, check)
        u2 = tuple(sorted(parsed))
        self._quorum(u2, "share-keys")
        self._commit = {m: parsed[m][0] for m in u2}
        self._share_commits = {m: parsed[m][1] for m in u2}
        self._sealed = {m: parsed[m][2] for m in u2}
        self._u2 = u2
        self._advance(MASKED_INPUT, u2)
        return {v: self._sign(MASKED_INPUT,
                              pack_items([(u, self._sealed[u][v]) for u in u2 if u != v]))[0]
                for v in u2}

    def _on_masked_input(self, bodies, replies) -> dict[str, bytes]:
        u3 = tuple(sorted(bodies))
        self._quorum(u3, "masked-input")
        total, self._running = self._running, None
        self._ring_sum, self._u3, self._sealed = total, u3, {}
        self._advance(CONSISTENCY, u3)
        return self._broadcast(CONSISTENCY, pack_ids(u3), u3)

    def _on_consistency(self, bodies, replies) -> dict[str, bytes]:
        expected = pack_ids(self._u3)

        def check(m: str, body: bytes) -> None:
            if body != expected:
                raise ProtocolError("market signed a different survivor set")

        self._validate_each(bodies, check)
        u4 = tuple(sorted(bodies))
        self._quorum(u4, "consistency")
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        payload = pack_sections(pack_items([(m, bytes(replies[m])) for m in u4]),
                                pack_ids(self._u3), pack_ids(dropped))
        self._advance(UNMASK, u4)
        return self._broadcast(UNMASK, payload, u4)

    def _valid_share(self, holder: str, dealer: str, kind: bytes, raw: bytes) -> Share | None:
        """The holder's revealed share of the dealer's secret, if it is the committed one."""
        commits = self._share_commits[dealer].get(holder)
        want = None if commits is None else commits[:DIGEST] if kind == KIND_B else commits[DIGEST:]
        if want != share_commitment(self._session, dealer, holder, kind, raw):
            return None
        share = Share.from_bytes(raw)
        return share if share.x == share_x(self._ctx, holder) else None

    def _on_unmask(self, bodies, replies) -> dict[str, bytes]:
        u3 = self._u3
        dropped = tuple(v for v in self._u2 if v not in u3)
        want = {v: KIND_B for v in u3} | {v: KIND_S for v in dropped}

        def check(m: str, body: bytes) -> dict[str, bytes]:
            items = unpack_items(body)
            if set(items) != set(want):
                raise ProtocolError("revealed shares do not match the request")
            for blob in items.values():
                if len(blob) != 1 + SHARE_SIZE:
                    raise ProtocolError("revealed share of the wrong length")
            return items

        revealed = self._validate_each(bodies, check)
        u5 = tuple(sorted(revealed))
        self._quorum(u5, "unmask")
        order = list(u3) + list(dropped)
        share_sets = []
        for v in order:
            good = []
            for m in u5:
                blob = revealed[m][v]
                share = (self._valid_share(m, v, want[v], blob[1:]) if blob[:1] == want[v]
                         else None)
                if share is None:
                    self._blamed[m] = f"revealed share of {v!r} does not match its commitment"
                else:
                    good.append(share)
            if len(good) < self._t:
                self._abort(f"{len(good)} valid shares of {v!r}, threshold is {self._t}")
            share_sets.append(good[:self._t])
        secrets = recover_secrets(share_sets, threshold=self._t)
        b_keys = []
        for v, raw in zip(u3, secrets[:len(u3)]):
            b = SymmetricKey(raw)
            if b_commitment(self._session, v, b) != self._commit[v]:
                # The dealer's own shares are inconsistent (no verifiable secret sharing).
                self._abort("a reconstructed self-mask does not match its commitment")
            b_keys.append(b)
        add, sub = [], []
        for v, raw in zip(dropped, secrets[len(u3):]):
            s_key = AgreementPrivateKey._hazmat_from_bytes(raw)
            if s_key.public_key() != self._s_pks[v]:
                self._abort("a reconstructed mask key does not match its signed public key")
            for u in u3:
                seed = s_key.derive(self._s_pks[u],
                                    context=context(self._session, b"pair-mask", *pair(u, v)))
                # u added +PRG(s_uv) if u < v, -PRG(s_uv) otherwise; undo it.
                (sub if u < v else add).append(seed)
        msg, self._result_digest, self._result = self._unmask_sum(u3, u5, add, sub + b_keys)
        self._advance(RESULT, u5)
        return {m: msg for m in u5}

    def _unmask_sum(self, u3: Sequence[str], u5: Sequence[str], add: list[SymmetricKey],
                    sub: list[SymmetricKey]) -> tuple[bytes, bytes, np.ndarray]:
        """The signed RESULT message, its digest and the ring sum: masks removed, the sum
        reduced and hashed for the signature in one chunked pass over the vector."""
        total, q, n = self._ring_sum, self._q, self._ctx.length
        # The vector is the last section: everything before it, its length prefix included.
        prefix = pack_sections(pack_ids(u3), pack_ids(u5)) + struct.pack(">I", 4 * n)
        head = signed_head(self._ctx, RESULT, SERVER, len(prefix) + 4 * n)
        h = BulkHasher(head + self._session + prefix)

        def finish(part: np.ndarray) -> None:
            if q.ring_bits < 32:
                part &= np.uint32(q.modulus - 1)
            h.update(part)

        accumulate_masks(total, add=add, subtract=sub, finish_chunk=finish)
        digest = DOMAIN + b"/sig" + h.digest()   # what signed_digest gives for the same bytes
        msg = b"".join([head, self._session, prefix,
                        memoryview(total.astype("<u4", copy=False)).cast("B"),
                        self._identity.sign(digest)])
        return msg, digest, total

    def _on_result(self, bodies, replies) -> dict[str, bytes]:
        def check(m: str, body: bytes) -> None:
            digest, tags_raw = unpack_sections(body, 2)
            if digest != self._result_digest:
                raise ProtocolError("market confirmed another result")
            # Tags for the other recipients, under pair keys the aggregator does not hold.
            tags = unpack_items(tags_raw)
            if set(tags) != set(self._expected) - {m} or any(len(t) != DIGEST for t in tags.values()):
                raise ProtocolError("result confirmation must tag every other recipient")

        self._validate_each(bodies, check)
        if tuple(sorted(bodies)) != self._expected:
            # Markets release the sum only when every recipient confirmed it.
            self._abort("not every recipient confirmed the result")
        payload = pack_items([(m, bytes(replies[m])) for m in self._expected])
        msgs = self._broadcast(AGREE, payload, self._expected)
        self._advance(AGREE, ())
        self._done = True
        return msgs

    @property
    def done(self) -> bool:
        return self._done

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._u3 if self._done else ()

    def result(self) -> np.ndarray:
        if self._result is None or not self._done:
            raise ProtocolError("round not finished")
        # Decoded on request, not in the round: the aggregator's part of the protocol ends with
        # the signed ring sum, and the deployed runtimes never ask it for the float sum (a fresh
        # array per call, as the copy was).
        return self._q.dequantize_sum(self._result)
