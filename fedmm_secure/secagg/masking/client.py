"""Market side of the ``masking`` backend: one market's state machine for one round.

Every message from the aggregator must carry the aggregator's roster signature over the session;
every stage is checked against the market's own :class:`~fedmm_secure.secagg.policy.MarketPolicy`
before anything leaves the market, and the decoded sum is released only after every market that
received the result has echoed, signed, the digest of the very same result message.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

import numpy as np

from ...errors import AbortError, IntegrityError, ProtocolError
from ...primitives.aead import open_sealed, seal
from ...primitives.digest import BulkHasher
from ...primitives.keys import (AgreementPrivateKey, AgreementPublicKey, IdentityPrivateKey,
                                IdentityPublicKey, SymmetricKey)
from ...primitives.prg import accumulate_masks
from ...primitives.quantization import Quantizer
from ...primitives.shamir import SHARE_SIZE, Share, split_key
from ..base import ClientRound, RoundContext
from ..codec import Envelope, decode_envelope, expect
from ..policy import MarketPolicy
from .wire import (ADVERTISE, AGREE, BACKEND, CONSISTENCY, DOMAIN, FINISHED, KIND_B, KIND_S,
                   MASKED_INPUT, NONCE, NONCE_SIZE, RESULT, SEALED_SHARES, SERVER, SHARE_KEYS,
                   UNMASK, Entropy, b_commitment, context, echo_tag, open_signed,
                   open_signed_digest, open_signed_streamed, pack_ids, pack_items, pack_sections, pair, parse_advert,
                   read_nonce, read_unverified, session_digest, session_with_nonces, share_commitment, share_x,
                   sign_message, signed_head, unpack_ids, unpack_items, unpack_sections)

__all__ = ["MaskingClient"]



class MaskingClient(ClientRound):
    def __init__(self, market: str, ctx: RoundContext, vector: np.ndarray, *,
                 identity: IdentityPrivateKey, keys: Mapping[str, IdentityPublicKey],
                 aggregator_key: IdentityPublicKey, policy: MarketPolicy, threshold: int,
                 quantizer: Quantizer, entropy: Entropy) -> None:
        if vector.shape != (ctx.length,):
            raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
        # The market's own rules, before any key or nonce is drawn.
        policy.check_cohort(ctx.participants, "round")
        policy.check_threshold(threshold, len(ctx.participants))
        self._market, self._ctx, self._policy = market, ctx, policy
        self._identity, self._keys = identity, keys
        self._server_keys = {SERVER: aggregator_key}
        self._t, self._q, self._entropy = threshold, quantizer, entropy
        self._base = session_digest(ctx, threshold, quantizer, policy.roster_digest)
        self._session = self._base
        rng = None
        if quantizer.rounding == "stochastic":
            # Dither only (not a secret): seeded from the entropy source, never from global state.
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(entropy(32), "big")))
        self._encoded, self._clipped = quantizer.quantize(vector, rng=rng)
        self._stage = NONCE
        # What this market itself sent at NONCE, ADVERTISE, CONSISTENCY and RESULT: its own entry
        # in each signed set the aggregator relays back must be these very bytes, compared
        # instead of re-verifying our own signature (one Ed25519 verification saved per set).
        self._sent: dict[int, bytes] = {}
        self._enc_keys: dict[str, SymmetricKey] = {}
        self._echo_keys: dict[str, SymmetricKey] = {}
        self._u0: tuple[str, ...] = ()
        self._c_key: AgreementPrivateKey | None = None
        self._s_key: AgreementPrivateKey | None = None
        self._peers: dict[str, tuple[AgreementPublicKey, AgreementPublicKey]] = {}
        self._b: SymmetricKey | None = None
        self._own_shares: tuple[Share, Share] | None = None
        self._held: dict[str, tuple[Share, Share]] = {}
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._revealed: dict[str, bytes] = {}
        self._pending: np.ndarray | None = None
        self._result_digest = b""
        self._recipients: tuple[str, ...] = ()
        self._result: np.ndarray | None = None

    # -- helpers
    def _sign(self, stage: int, body: bytes) -> bytes:
        return sign_message(self._identity, self._ctx, stage, self._market, self._session, body)

    def _aad(self, sender: str, recipient: str) -> bytes:
        return context(self._session, b"share-aad", sender, recipient)

    def _share_key(self, peer: str, peer_key: AgreementPublicKey) -> SymmetricKey:
        return self._c_key.derive(peer_key, context=context(self._session, b"share-enc",
                                                            *pair(self._market, peer)))

    def _open_peers(self, signed: Mapping[str, bytes], stage: int) -> dict[str, bytes]:
        """Bodies of the peers' signed messages of ``stage``; our own entry must be exactly what
        we sent (so a substituted or replayed own message is an :class:`IntegrityError`)."""
        if signed.get(self._market) != self._sent[stage]:
            raise IntegrityError()
        return {v: (bytes(open_signed(blob, ctx=self._ctx, stage=stage, sender=v,
                                      session=self._session, keys=self._keys))
                    if v != self._market else b"")
                for v, blob in signed.items()}

    def _check_quorum(self, ids: Sequence[str], what: str) -> None:
        self._policy.check_cohort(ids, what)
        if len(ids) < self._t:
            raise AbortError(f"{what}: {len(ids)} markets, threshold is {self._t}")

    # -- state machine
    def handle(self, message: bytes) -> bytes | None:
        # Parsed once, as a view: the megabyte RESULT is neither copied nor decoded twice.
        env: Envelope = decode_envelope(message, view=True)
        if self._stage == FINISHED:
            raise ProtocolError("round already finished")
        expect(env, backend=BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=SERVER)
        stage = self._stage
        if stage == RESULT:
            reply = self._finish(message, env)
        else:
            # The aggregator signs every message over the session this market is in: a relayed,
            # altered or foreign message fails here, before any handler looks at it.
            body, _ = open_signed_digest(message, ctx=self._ctx, stage=stage, sender=SERVER,
                                         session=self._session, keys=self._server_keys,
                                         view=True, env=env)
            handler = (self._send_nonce, self._advertise, self._share_keys, self._masked_input,
                       self._consistency, self._unmask, None, self._agree)[stage]
            reply = handler(bytes(body))
        if env.stage in (NONCE, ADVERTISE, CONSISTENCY, RESULT):  # see self._sent
            self._sent[env.stage] = reply
        return reply

    def _send_nonce(self, payload: bytes) -> bytes:
        if payload:
            raise ProtocolError("nonce request must be empty")
        reply = self._sign(NONCE, self._entropy(NONCE_SIZE))
        self._stage = ADVERTISE
        return reply

    def _advertise(self, payload: bytes) -> bytes:
        signed = unpack_items(payload)
        u0 = tuple(signed)
        if self._market not in u0 or not set(u0) <= set(self._ctx.participants):
            raise ProtocolError("nonce set must contain this market and participants only")
        self._check_quorum(u0, "nonce")
        if signed[self._market] != self._sent[NONCE]:
            raise IntegrityError()  # our own nonce was replaced: a replayed or spliced session
        # Peers' nonces are parsed, not verified: their advertisements, verified at SHARE_KEYS
        # before any share leaves, are signed over the hash of this very set (see read_nonce).
        nonces = {v: read_nonce(blob, ctx=self._ctx, sender=v, session=self._base)
                  for v, blob in signed.items()}
        session = session_with_nonces(self._base, nonces)
        c_key = AgreementPrivateKey.generate(entropy=self._entropy)
        s_key = AgreementPrivateKey.generate(entropy=self._entropy)
        body = c_key.public_key().to_bytes() + s_key.public_key().to_bytes()
        reply = sign_message(self._identity, self._ctx, ADVERTISE, self._market, session, body)
        self._session, self._c_key, self._s_key, self._stage = session, c_key, s_key, SHARE_KEYS
        self._u0 = u0
        return reply

    def _share_keys(self, payload: bytes) -> bytes:
        adverts = unpack_items(payload)
        u1 = tuple(adverts)
        if self._market not in u1 or not set(u1) <= set(self._u0):
            raise ProtocolError("advertised set must contain this market and nonce senders only")
        self._check_quorum(u1, "advertise")
        # Our own advertisement must come back byte for byte (the relay altered or substituted
        # our keys otherwise); every other one is verified.
        peers = {v: parse_advert(body) for v, body in self._open_peers(adverts, ADVERTISE).items()
                 if v != self._market}
        b = SymmetricKey.generate(entropy=self._entropy)
        xs = [share_x(self._ctx, v) for v in u1]
        b_shares = split_key(b, threshold=self._t, xs=xs, entropy=self._entropy)
        s_shares = split_key(self._s_key, threshold=self._t, xs=xs, entropy=self._entropy)
        sealed, commits, enc_keys = [], [], {}
        for v, sb, ss in zip(u1, b_shares, s_shares):
            rb, rs = sb.to_bytes(), ss.to_bytes()
            # Signed commitments let the aggregator tell a corrupt revealed share from a good
            # one and rebuild from any t good shares instead of aborting.
            commits.append((v, share_commitment(self._session, self._market, v, KIND_B, rb)
                            + share_commitment(self._session, self._market, v, KIND_S, rs)))
            if v == self._market:
                own = (sb, ss)
                continue
            # One key per pair and direction-independent (the pair is sorted): kept to open v's
            # shares at MASKED_INPUT instead of a second X25519 exchange per peer.
            enc_keys[v] = self._share_key(v, peers[v][0])
            ct = seal(enc_keys[v], rb + rs,
                      associated_data=self._aad(self._market, v), entropy=self._entropy)
            sealed.append((v, ct))
        reply = self._sign(SHARE_KEYS, pack_sections(b_commitment(self._session, self._market, b),
                                                     pack_items(commits), pack_items(sealed)))
        self._peers, self._b, self._own_shares, self._stage = peers, b, own, MASKED_INPUT
        self._enc_keys = enc_keys
        return reply

    def _masked_input(self, payload: bytes) -> bytes:
        incoming = unpack_items(payload)
        u2 = tuple(sorted(set(incoming) | {self._market}))
        if not set(incoming) <= set(self._peers):
            raise ProtocolError("shares from markets that did not advertise")
        self._check_quorum(u2, "share-keys")
        me = share_x(self._ctx, self._market)
        held = {}
        for v, ct in incoming.items():
            if len(ct) != SEALED_SHARES:
                raise ProtocolError("sealed shares of the wrong length")
            plain = open_sealed(self._enc_keys[v], ct, associated_data=self._aad(v, self._market))
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
        digest = BulkHasher(head + self._session)
        ring_mask = np.uint32(self._q.modulus - 1)

        def finish(part: np.ndarray) -> None:
            # Reduce and hash each chunk while it is in cache: saves a second pass over the
            # 4 MB upload in main memory (BLAKE3 itself, about one AES-CTR pass, remains).
            if self._q.ring_bits < 32:
                part &= ring_mask
            digest.update(part)

        accumulate_masks(y, add=add, subtract=sub, finish_chunk=finish)
        # What signed_digest gives for the same bytes.
        sig = self._identity.sign(DOMAIN + b"/sig" + digest.digest())
        reply = b"".join([head, self._session, memoryview(y).cast("B"), sig])
        # Result confirmations to and from each peer are MACed under a key only the pair holds
        # (see echo_tag); derived here, where the pair's share-encryption key is dropped.
        self._echo_keys = {v: self._enc_keys[v].derive(
            context=context(self._session, b"echo-mac", *pair(self._market, v))) for v in incoming}
        self._held, self._u2, self._stage = held, u2, CONSISTENCY
        self._encoded, self._enc_keys = np.zeros(0, dtype=np.uint32), {}
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
        for v, body in self._open_peers(sigs, CONSISTENCY).items():
            if v != self._market and body != expected:
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

    def _finish(self, message: bytes, env: Envelope) -> bytes:
        q, n = self._q, self._ctx.length
        pending = np.empty(n, dtype=np.float64)
        outside: list[int] = []

        def decode(part: memoryview, offset: int) -> None:
            # Called while the chunk is in cache, before the signature is known to hold: never
            # raises (the range check is reported after it), and `pending` is dropped on failure.
            ring = np.frombuffer(part, dtype="<u4").astype(np.uint32, copy=False)
            i = offset // 4
            if q.ring_bits < 32 and np.any(ring >> np.uint32(q.ring_bits)):
                outside.append(i)
            q.dequantize_into(ring, pending[i:i + ring.shape[0]], start=i)

        # One pass over the megabyte RESULT: hashed for the aggregator's signature (and the
        # digest every recipient echoes) and decoded chunk by chunk in the same pass.
        opened = open_signed_streamed(message, env, ctx=self._ctx, stage=RESULT, sender=SERVER,
                                      session=self._session, keys=self._server_keys, tail=4 * n,
                                      consume=decode)
        if opened is None:   # too short to hold the vector: verify it anyway, then refuse
            opened = open_signed_digest(message, ctx=self._ctx, stage=RESULT, sender=SERVER,
                                        session=self._session, keys=self._server_keys, view=True,
                                        env=env)
        payload, digest = opened
        ids_raw, to_raw, vec_raw = unpack_sections(payload, 3)  # views: no megabyte copies
        if unpack_ids(bytes(ids_raw)) != self._u3:
            raise ProtocolError("result is over a different survivor set")
        recipients = unpack_ids(bytes(to_raw))
        if self._market not in recipients or not set(recipients) <= set(self._u3):
            raise ProtocolError("result recipients must be survivors, including this market")
        if len(recipients) < self._t:
            raise ProtocolError("result recipients fewer than the threshold")
        # The vector is the last section, so at the right length it is exactly the decoded tail.
        if len(vec_raw) != 4 * n:
            raise ProtocolError(f"vector of {len(vec_raw)} bytes, expected {4 * n}")
        if outside:
            raise ProtocolError(f"vector holds values outside Z_2^{q.ring_bits}")
        # Not released yet: only once every recipient has confirmed the same result message. The
        # signed digest is for the aggregator; each other recipient gets its own tag.
        tags = [(v, echo_tag(self._echo_keys[v], self._market, v, digest))
                for v in recipients if v != self._market]
        reply = self._sign(RESULT, pack_sections(digest, pack_items(tags)))
        self._pending, self._result_digest, self._recipients = pending, digest, recipients
        self._held, self._stage = {}, AGREE
        return reply

    def _agree(self, payload: bytes) -> None:
        echoes = unpack_items(payload)
        if tuple(echoes) != self._recipients:
            raise ProtocolError("result confirmations must come from every recipient")
        if echoes[self._market] != self._sent[RESULT]:
            raise IntegrityError()
        for v, blob in echoes.items():
            if v == self._market:
                continue
            # v's signature is for the aggregator; what convinces this market is v's tag to it,
            # which only v could compute and only over the digest v itself received.
            _, tags_raw = unpack_sections(read_unverified(blob, ctx=self._ctx, stage=RESULT,
                                                          sender=v, session=self._session), 2)
            tag = unpack_items(tags_raw).get(self._market, b"")
            want = echo_tag(self._echo_keys[v], v, self._market, self._result_digest)
            if not hmac.compare_digest(tag, want):
                raise IntegrityError()  # v was shown another result
        self._result, self._pending, self._stage = self._pending, None, FINISHED
        self._echo_keys = {}
        return None

    def report(self) -> dict:
        return {"clipped_coordinates": self._clipped,
                "max_abs_error_bound": self._q.max_abs_error_bound(),
                "ring_bits": self._q.ring_bits,
                "scale": self._q.min_scale,
                "threshold": self._t}

