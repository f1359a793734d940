"""``masking``: pairwise-mask secure summation (Bonawitz et al., CCS'17) with dropout recovery.

One round, driven by the aggregator (stage numbers are the envelope's ``stage`` field and the
driver's ``drop_at`` indices):

0. ADVERTISE     market u draws fresh X25519 keys c_u (share encryption) and s_u (mask seeds)
                 and signs both public keys with its long-term Ed25519 identity (the roster).
1. SHARE_KEYS    u checks every advertisement's signature, draws a self-mask seed b_u, Shamir-
                 shares b_u and the private scalar of s_u t-of-n, and sends peer v its two
                 shares AES-GCM-sealed under HKDF(X25519(c_u, c_v)); the aggregator only relays.
                 u also commits to b_u (SHA-256) so a corrupted reconstruction is detected.
2. MASKED_INPUT  u opens the shares addressed to it and uploads
                 y_u = q(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
                 in Z_2^k, 4 bytes per coordinate; s_uv = HKDF(X25519(s_u, s_v)) with a context
                 naming the session and the pair, PRG = AES-256-CTR.
3. CONSISTENCY   the aggregator announces U3 (who uploaded); each u signs U3.
4. UNMASK        the aggregator forwards the U3 signatures and asks, explicitly, for b-shares of
                 U3 and s-shares of U2 \\ U3. u checks that at least t markets signed the same U3
                 and that the request is exactly that split; it never reveals both shares of
                 one peer (that would unmask the peer's input).
5. RESULT        the aggregator rebuilds the missing seeds, removes every mask, and sends the ring
                 sum and U3 to the markets that answered; each decodes the float64 sum.

Every market message is an envelope (:mod:`.codec`) whose payload ends with an Ed25519
signature over the domain tag and the SHA-256 digest of every envelope byte before it
(hash-then-sign: one fast pass over a megabyte upload instead of Ed25519's two SHA-512 passes,
the same layout as the ``ckks`` backend); every payload starts with a digest of the session (run,
round, label, participants, length, bounds, threshold, ring), so nothing can be replayed into
another round, stage or configuration. Fewer than t markets at any stage aborts the round
(:class:`AbortError`) and nothing is released. Invalid messages raise :class:`ProtocolError` /
:class:`IntegrityError` before any state changes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import AbortError, ConfigError, IntegrityError, ProtocolError
from ..primitives.aead import OVERHEAD, open_sealed, seal
from ..primitives.keys import (SIGNATURE_SIZE, AgreementPrivateKey, AgreementPublicKey,
                               IdentityPrivateKey, IdentityPublicKey, SymmetricKey)
from ..primitives.prg import accumulate_masks
from ..primitives.quantization import ROUNDING_MODES, Quantizer, make_quantizer
from ..primitives.shamir import SHARE_SIZE, Share, recover_secrets, split_key
from .base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                   SecureAggregator, ServerRound)
from .codec import Envelope, decode_envelope, encode_envelope, expect
from .registry import register_backend

__all__ = ["MaskingAggregator", "default_threshold"]

ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK, RESULT = range(6)
_FINISHED = -1
_BACKEND = "masking"
_SERVER = "aggregator"
_DOMAIN = b"fedmm-secure/masking/v1"
_DIGEST = 32
_SHARE_PLAIN = 2 * SHARE_SIZE
_SEALED_SHARES = _SHARE_PLAIN + OVERHEAD
_KIND_B, _KIND_S = b"b", b"s"

Entropy = Callable[[int], bytes]


def default_threshold(n: int) -> int:
    """t = n - floor(n/3): any floor(n/3) markets (>= 1/3 for n divisible by 3) may drop at any
    stage, and t > n/2 so two disjoint quorums cannot both exist."""
    return n - n // 3


# ---------------------------------------------------------------------------------------------
# Wire helpers (strict: anything malformed raises ProtocolError, never IndexError/struct.error)

def _pack_ids(ids: Sequence[str]) -> bytes:
    parts = [struct.pack(">H", len(ids))]
    for m in ids:
        b = m.encode("ascii")
        parts.append(bytes([len(b)]) + b)
    return b"".join(parts)


def _read_id(data: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(data):
        raise ProtocolError("payload truncated")
    n = data[pos]
    pos += 1
    if n == 0 or pos + n > len(data):
        raise ProtocolError("payload truncated")
    try:
        return data[pos:pos + n].decode("ascii"), pos + n
    except UnicodeDecodeError:
        raise ProtocolError("malformed market id") from None


def _unpack_ids(data: bytes) -> tuple[str, ...]:
    if len(data) < 2:
        raise ProtocolError("payload truncated")
    (count,) = struct.unpack_from(">H", data, 0)
    pos, out = 2, []
    for _ in range(count):
        m, pos = _read_id(data, pos)
        out.append(m)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    return _sorted_unique(out)


def _pack_items(items: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [struct.pack(">H", len(items))]
    for m, blob in items:
        b = m.encode("ascii")
        parts.append(bytes([len(b)]) + b + struct.pack(">I", len(blob)) + blob)
    return b"".join(parts)


def _read_sized(data: bytes, pos: int) -> tuple[bytes, int]:
    """One u32-length-prefixed field at ``pos``; returns it and the position after it."""
    if pos + 4 > len(data):
        raise ProtocolError("payload truncated")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if pos + n > len(data):
        raise ProtocolError("payload truncated")
    return data[pos:pos + n], pos + n


def _unpack_items(data: bytes) -> dict[str, bytes]:
    if len(data) < 2:
        raise ProtocolError("payload truncated")
    (count,) = struct.unpack_from(">H", data, 0)
    pos, out = 2, {}
    order = []
    for _ in range(count):
        m, pos = _read_id(data, pos)
        order.append(m)
        out[m], pos = _read_sized(data, pos)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    _sorted_unique(order)
    return out


def _pack_sections(*sections: bytes | memoryview) -> bytes:
    parts: list[bytes | memoryview] = []
    for s in sections:
        parts += [struct.pack(">I", len(s)), s]
    return b"".join(parts)


def _unpack_sections(data: bytes, count: int) -> list[bytes]:
    pos, out = 0, []
    for _ in range(count):
        item, pos = _read_sized(data, pos)
        out.append(item)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    return out


def _sorted_unique(ids: Sequence[str]) -> tuple[str, ...]:
    t = tuple(ids)
    if any(a >= b for a, b in zip(t, t[1:])):
        raise ProtocolError("market ids must be sorted and distinct")
    return t


# ---------------------------------------------------------------------------------------------
# Session binding, signatures and key-derivation contexts

def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _session_digest(ctx: RoundContext, threshold: int, q: Quantizer) -> bytes:
    h = hashlib.sha256(_DOMAIN + b"/session")
    for part in (ctx.run_id.encode(), struct.pack(">Q", ctx.round_id), ctx.label.encode(),
                 _pack_ids(ctx.participants), struct.pack(">QII", ctx.length, threshold, q.ring_bits),
                 q.rounding.encode()):
        h.update(_lp(part))
    bound = np.asarray(ctx.max_abs, dtype="<f8")
    h.update(_lp(bound.tobytes()))
    return h.digest()


def _context(session: bytes, purpose: bytes, *ids: str) -> bytes:
    return b"".join([_DOMAIN, b"/", purpose, b"|", session] + [_lp(m.encode()) for m in ids])


def _pair(u: str, v: str) -> tuple[str, str]:
    return (u, v) if u < v else (v, u)


def _b_commitment(session: bytes, market: str, b: SymmetricKey) -> bytes:
    return hashlib.sha256(_context(session, b"b-commit", market) + b._hazmat_bytes()).digest()


def _signed_digest(parts: Sequence[bytes | memoryview]) -> bytes:
    # Hash-then-sign: Ed25519 would hash a 4 MB upload with SHA-512 twice when signing; one
    # SHA-256 pass (SHA-NI) is several times cheaper and as binding.
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return _DOMAIN + b"/sig" + h.digest()


def _signed_head(ctx: RoundContext, stage: int, sender: str, body_len: int) -> bytes:
    """Envelope bytes up to the payload, for a payload ``session | body | signature``."""
    # The codec ends every envelope with ``u32 payload length | payload``: encode the header
    # with an empty payload and patch the length, so a megabyte body is never concatenated twice.
    head = encode_envelope(Envelope(_BACKEND, stage, ctx.round_id, ctx.run_id, ctx.label, sender,
                                    b""))[:-4]
    return head + struct.pack(">I", _DIGEST + body_len + SIGNATURE_SIZE)


def _sign_message(identity: IdentityPrivateKey, ctx: RoundContext, stage: int, sender: str,
                  session: bytes, body: bytes | memoryview) -> bytes:
    """An envelope whose payload is ``session | body | signature``; the Ed25519 signature covers
    every envelope byte before it."""
    head = _signed_head(ctx, stage, sender, len(body))
    sig = identity.sign(_signed_digest([head, session, body]))
    return b"".join([head, session, body, sig])


def _open_signed(data: bytes, *, ctx: RoundContext, stage: int, sender: str, session: bytes,
                 keys: Mapping[str, IdentityPublicKey], view: bool = False) -> bytes | memoryview:
    """Verify a market's signed message and return its body (between session digest and
    signature); ``view`` returns a zero-copy view, for megabyte uploads."""
    env = decode_envelope(data)
    if len(env.payload) < _DIGEST + SIGNATURE_SIZE:
        raise ProtocolError("message truncated")
    key = keys.get(env.sender)
    if key is None:
        raise ProtocolError(f"message from {env.sender!r}, who is not on the roster")
    # Signature before content checks: any flipped byte of a well-formed message is reported as
    # the one opaque IntegrityError.
    key.verify(env.payload[-SIGNATURE_SIZE:],
               _signed_digest([memoryview(data)[:-SIGNATURE_SIZE]]))
    expect(env, backend=_BACKEND, stage=stage, round_id=ctx.round_id, run_id=ctx.run_id,
           label=ctx.label, sender=sender)
    if env.payload[:_DIGEST] != session:
        raise ProtocolError("message belongs to another session configuration")
    if view:
        return memoryview(env.payload)[_DIGEST:-SIGNATURE_SIZE]
    return env.payload[_DIGEST:-SIGNATURE_SIZE]


def _server_message(ctx: RoundContext, stage: int, payload: bytes) -> bytes:
    return encode_envelope(Envelope(_BACKEND, stage, ctx.round_id, ctx.run_id, ctx.label, _SERVER,
                                    payload))


def _x(ctx: RoundContext, market: str) -> int:
    return ctx.participants.index(market) + 1


def _ring_vector(ctx: RoundContext, q: Quantizer, payload: bytes) -> np.ndarray:
    if len(payload) != 4 * ctx.length:
        raise ProtocolError(f"vector of {len(payload)} bytes, expected {4 * ctx.length}")
    v = np.frombuffer(payload, dtype="<u4")
    if q.ring_bits < 32 and np.any(v >> np.uint32(q.ring_bits)):
        raise ProtocolError(f"vector holds values outside Z_2^{q.ring_bits}")
    return v


def _parse_advert(body: bytes) -> tuple[AgreementPublicKey, AgreementPublicKey]:
    if len(body) != 64:
        raise ProtocolError("advertisement must hold two 32-byte public keys")
    return AgreementPublicKey.from_bytes(body[:32]), AgreementPublicKey.from_bytes(body[32:])


def _blame(err: ProtocolError, market: str) -> ProtocolError:
    err.market = market  # type: ignore[attr-defined]  # lets the caller drop the offender and retry
    return err


# ---------------------------------------------------------------------------------------------
# Market side

class _MaskingClient(ClientRound):
    def __init__(self, market: str, ctx: RoundContext, vector: np.ndarray, *,
                 identity: IdentityPrivateKey, keys: Mapping[str, IdentityPublicKey],
                 threshold: int, quantizer: Quantizer, entropy: Entropy) -> None:
        if vector.shape != (ctx.length,):
            raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
        self._market, self._ctx = market, ctx
        self._identity, self._keys = identity, keys
        self._t, self._q, self._entropy = threshold, quantizer, entropy
        self._session = _session_digest(ctx, threshold, quantizer)
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
        return _sign_message(self._identity, self._ctx, stage, self._market, self._session, body)

    def _aad(self, sender: str, recipient: str) -> bytes:
        return _context(self._session, b"share-aad", sender, recipient)

    def _share_key(self, peer: str, peer_key: AgreementPublicKey) -> SymmetricKey:
        return self._c_key.derive(peer_key, context=_context(self._session, b"share-enc",
                                                             *_pair(self._market, peer)))

    def _check_quorum(self, ids: Sequence[str], what: str) -> None:
        if len(ids) < self._t:
            raise AbortError(f"{what}: {len(ids)} markets, threshold is {self._t}")

    # -- state machine
    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        if self._stage == _FINISHED:
            raise ProtocolError("round already finished")
        expect(env, backend=_BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=_SERVER)
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
        adverts = _unpack_items(payload)
        u1 = tuple(adverts)
        if self._market not in u1 or not set(u1) <= set(self._ctx.participants):
            raise ProtocolError("advertised set must contain this market and participants only")
        self._check_quorum(u1, "advertise")
        peers = {}
        for v, blob in adverts.items():
            body = _open_signed(blob, ctx=self._ctx, stage=ADVERTISE, sender=v,
                                session=self._session, keys=self._keys)
            peers[v] = _parse_advert(body)
        if peers[self._market] != (self._c_key.public_key(), self._s_key.public_key()):
            raise IntegrityError()  # the relay altered or substituted our own keys
        b = SymmetricKey.generate(entropy=self._entropy)
        xs = [_x(self._ctx, v) for v in u1]
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
        reply = self._sign(SHARE_KEYS, _b_commitment(self._session, self._market, b)
                           + _pack_items(sealed))
        self._peers, self._b, self._own_shares, self._stage = peers, b, own, MASKED_INPUT
        return reply

    def _masked_input(self, payload: bytes) -> bytes:
        incoming = _unpack_items(payload)
        u2 = tuple(sorted(set(incoming) | {self._market}))
        if self._market in incoming or not set(incoming) <= set(self._peers):
            raise ProtocolError("shares from markets that did not advertise")
        self._check_quorum(u2, "share-keys")
        me = _x(self._ctx, self._market)
        held = {}
        for v, ct in incoming.items():
            if len(ct) != _SEALED_SHARES:
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
                                      context=_context(self._session, b"pair-mask", *_pair(self._market, v)))
            (add if self._market < v else sub).append(seed)
        # Everything above validated the message; masking in place is the first state change
        # (the unmasked encoding must not outlive this stage anyway).
        y = self._encoded
        head = _signed_head(self._ctx, MASKED_INPUT, self._market, 4 * y.shape[0])
        digest = hashlib.sha256(head + self._session)
        ring_mask = np.uint32(self._q.modulus - 1)

        def finish(part: np.ndarray) -> None:
            # Reduce and hash each chunk while it is in cache: saves a second pass over the
            # 4 MB upload in main memory (SHA-256 itself, ~2.4 ms per 4 MB, remains).
            if self._q.ring_bits < 32:
                part &= ring_mask
            digest.update(part)

        accumulate_masks(y, add=add, subtract=sub, finish_chunk=finish)
        sig = self._identity.sign(_DOMAIN + b"/sig" + digest.digest())
        reply = b"".join([head, self._session, memoryview(y).cast("B"), sig])
        self._held, self._u2, self._stage = held, u2, CONSISTENCY
        self._encoded = np.zeros(0, dtype=np.uint32)
        return reply

    def _consistency(self, payload: bytes) -> bytes:
        u3 = _unpack_ids(payload)
        if self._market not in u3 or not set(u3) <= set(self._u2):
            raise ProtocolError("survivor set must contain this market and share-keys markets only")
        self._check_quorum(u3, "masked-input")
        reply = self._sign(CONSISTENCY, _pack_ids(u3))
        self._u3, self._stage = u3, UNMASK
        return reply

    def _unmask(self, payload: bytes) -> bytes:
        sigs_raw, want_b_raw, want_s_raw = _unpack_sections(payload, 3)
        sigs = _unpack_items(sigs_raw)
        want_b, want_s = _unpack_ids(want_b_raw), _unpack_ids(want_s_raw)
        both = (set(want_b) | set(k for k, kind in self._revealed.items() if kind == _KIND_B)) & \
               (set(want_s) | set(k for k, kind in self._revealed.items() if kind == _KIND_S))
        if both:
            raise ProtocolError(f"refusing to reveal both shares of {sorted(both)}")
        if self._market not in sigs or not set(sigs) <= set(self._u3):
            raise ProtocolError("consistency signatures must come from survivors, including us")
        self._check_quorum(tuple(sigs), "consistency")
        expected = _pack_ids(self._u3)
        for v, blob in sigs.items():
            body = _open_signed(blob, ctx=self._ctx, stage=CONSISTENCY, sender=v,
                                session=self._session, keys=self._keys)
            if body != expected:
                raise IntegrityError()  # v was shown a different survivor set
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        if want_b != self._u3 or want_s != dropped:
            raise ProtocolError("unmask request does not match the agreed survivor set")
        items = [(v, _KIND_B + self._held[v][0].to_bytes()) for v in want_b]
        items += [(v, _KIND_S + self._held[v][1].to_bytes()) for v in want_s]
        reply = self._sign(UNMASK, _pack_items(sorted(items)))
        self._revealed.update({v: kind[:1] for v, kind in items})
        self._stage = RESULT
        return reply

    def _finish(self, payload: bytes) -> None:
        ids_raw, vec_raw = _unpack_sections(memoryview(payload), 2)  # views: no 4 MB copies
        if _unpack_ids(bytes(ids_raw)) != self._u3:
            raise ProtocolError("result is over a different survivor set")
        ring = _ring_vector(self._ctx, self._q, vec_raw).astype(np.uint32, copy=False)
        total = self._q.dequantize_sum(ring)
        self._result, self._stage = total, _FINISHED
        self._held = {}
        return None

    def report(self) -> dict:
        return {"clipped_coordinates": self._clipped,
                "max_abs_error_bound": self._q.max_abs_error_bound(),
                "ring_bits": self._q.ring_bits,
                "scale": self._q.min_scale,
                "threshold": self._t}


# ---------------------------------------------------------------------------------------------
# Aggregator side

class _MaskingServer(ServerRound):
    def __init__(self, ctx: RoundContext, keys: Mapping[str, IdentityPublicKey], *,
                 threshold: int, quantizer: Quantizer) -> None:
        self._ctx, self._keys, self._t, self._q = ctx, keys, threshold, quantizer
        self._session = _session_digest(ctx, threshold, quantizer)
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
        return {m: _server_message(self._ctx, ADVERTISE, b"") for m in self._expected}

    def _open(self, m: str, data: bytes) -> bytes:
        return _open_signed(data, ctx=self._ctx, stage=self._stage, sender=m, session=self._session,
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
                raise _blame(err, m)
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
                raise _blame(err, m)
        return out

    def _advance(self, stage: int, expected: Sequence[str]) -> None:
        self._stage, self._expected = stage, tuple(expected)

    def _on_advertise(self, bodies, replies) -> dict[str, bytes]:
        parsed = self._validate_each(bodies, lambda m, b: _parse_advert(b))
        u1 = tuple(sorted(parsed))
        self._quorum(u1, "advertise")
        self._adverts = {m: bytes(replies[m]) for m in u1}
        self._s_pks = {m: parsed[m][1] for m in u1}
        out = _pack_items([(m, self._adverts[m]) for m in u1])
        self._advance(SHARE_KEYS, u1)
        return {m: _server_message(self._ctx, SHARE_KEYS, out) for m in u1}

    def _on_share_keys(self, bodies, replies) -> dict[str, bytes]:
        u1 = self._expected

        def check(m: str, body: bytes) -> tuple[bytes, dict[str, bytes]]:
            if len(body) < _DIGEST:
                raise ProtocolError("payload truncated")
            items = _unpack_items(body[_DIGEST:])
            if set(items) != set(u1) - {m}:
                raise ProtocolError("sealed shares must address every other advertised market")
            if any(len(ct) != _SEALED_SHARES for ct in items.values()):
                raise ProtocolError("sealed shares of the wrong length")
            return body[:_DIGEST], items

        parsed = self._validate_each(bodies, check)
        u2 = tuple(sorted(parsed))
        self._quorum(u2, "share-keys")
        self._commit = {m: parsed[m][0] for m in u2}
        self._sealed = {m: parsed[m][1] for m in u2}
        self._u2 = u2
        self._advance(MASKED_INPUT, u2)
        return {v: _server_message(self._ctx, MASKED_INPUT,
                                   _pack_items([(u, self._sealed[u][v]) for u in u2 if u != v]))
                for v in u2}

    def _on_masked_input(self, bodies, replies) -> dict[str, bytes]:
        vecs = self._validate_each(bodies, lambda m, b: _ring_vector(self._ctx, self._q, b))
        u3 = tuple(sorted(vecs))
        self._quorum(u3, "masked-input")
        total = np.zeros(self._ctx.length, dtype=np.uint32)
        for m in u3:
            np.add(total, vecs[m], out=total)  # wraps mod 2^32 by design
        self._ring_sum, self._u3, self._sealed = total, u3, {}
        self._advance(CONSISTENCY, u3)
        return {m: _server_message(self._ctx, CONSISTENCY, _pack_ids(u3)) for m in u3}

    def _on_consistency(self, bodies, replies) -> dict[str, bytes]:
        expected = _pack_ids(self._u3)

        def check(m: str, body: bytes) -> None:
            if body != expected:
                raise ProtocolError("market signed a different survivor set")

        self._validate_each(bodies, check)
        u4 = tuple(sorted(bodies))
        self._quorum(u4, "consistency")
        self._consistency = {m: bytes(replies[m]) for m in u4}
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        payload = _pack_sections(_pack_items([(m, self._consistency[m]) for m in u4]),
                                 _pack_ids(self._u3), _pack_ids(dropped))
        self._advance(UNMASK, u4)
        return {m: _server_message(self._ctx, UNMASK, payload) for m in u4}

    def _on_unmask(self, bodies, replies) -> dict[str, bytes]:
        u3 = self._u3
        dropped = tuple(v for v in self._u2 if v not in u3)
        want = {v: _KIND_B for v in u3} | {v: _KIND_S for v in dropped}

        def check(m: str, body: bytes) -> dict[str, Share]:
            items = _unpack_items(body)
            if set(items) != set(want):
                raise ProtocolError("revealed shares do not match the request")
            out = {}
            for v, blob in items.items():
                if blob[:1] != want[v] or len(blob) != 1 + SHARE_SIZE:
                    raise ProtocolError("revealed share of the wrong kind or length")
                share = Share.from_bytes(blob[1:])
                if share.x != _x(self._ctx, m):
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
            if _b_commitment(self._session, v, b) != self._commit[v]:
                self._abort("a reconstructed self-mask does not match its commitment")
            b_keys.append(b)
        add, sub = [], []
        for v, raw in zip(dropped, secrets[len(u3):]):
            s_key = AgreementPrivateKey._hazmat_from_bytes(raw)
            if s_key.public_key() != self._s_pks[v]:
                self._abort("a reconstructed mask key does not match its signed public key")
            for u in u3:
                seed = s_key.derive(self._s_pks[u], context=_context(self._session, b"pair-mask", *_pair(u, v)))
                # u added +PRG(s_uv) if u < v, -PRG(s_uv) otherwise; undo it.
                (sub if u < v else add).append(seed)
        total = self._ring_sum
        accumulate_masks(total, add=add, subtract=sub + b_keys)
        if self._q.ring_bits < 32:
            total &= np.uint32(self._q.modulus - 1)
        self._result = self._q.dequantize_sum(total)
        payload = _pack_sections(_pack_ids(u3), memoryview(total.astype("<u4", copy=False)).cast("B"))
        self._advance(RESULT, ())
        self._done = True
        return {m: _server_message(self._ctx, RESULT, payload) for m in u5}

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


# ---------------------------------------------------------------------------------------------
# Endpoints and backend

class _Options:
    def __init__(self, threshold: int | None, ring_bits: int, rounding: str, entropy: Entropy,
                 max_error: float | None) -> None:
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ConfigError("threshold", f"got {threshold!r}", allowed="a positive int or None")
        if not isinstance(ring_bits, int) or not 8 <= ring_bits <= 32:
            raise ConfigError("ring_bits", f"got {ring_bits!r}", allowed="an int in [8, 32]")
        if rounding not in ROUNDING_MODES:
            raise ConfigError("rounding", f"got {rounding!r}", allowed=", ".join(ROUNDING_MODES))
        if not callable(entropy):
            raise ConfigError("entropy", "must be a callable n -> n random bytes")
        self.threshold, self.ring_bits, self.rounding = threshold, ring_bits, rounding
        self.entropy, self.max_error = entropy, max_error

    def for_round(self, ctx: RoundContext) -> tuple[int, Quantizer]:
        n = len(ctx.participants)
        t = default_threshold(n) if self.threshold is None else self.threshold
        if not (n / 2 < t <= n):
            raise ConfigError("threshold", f"{t} with {n} participants",
                              allowed=f"n/2 < t <= n, i.e. {n // 2 + 1}..{n}")
        q = make_quantizer(bounds=ctx.max_abs, length=ctx.length, n_participants=n,
                           ring_bits=self.ring_bits, rounding=self.rounding,
                           max_error=self.max_error)
        return t, q


def _roster_keys(roster: Roster) -> dict[str, IdentityPublicKey]:
    if not isinstance(roster, Roster):
        raise ProtocolError("roster must be a Roster")
    return {m: IdentityPublicKey.from_bytes(roster.bundle(m)) for m in roster.markets}


def _check_round(ctx: RoundContext, keys: Mapping[str, IdentityPublicKey]) -> None:
    if not keys:
        raise ProtocolError("install the roster before starting a round")
    missing = [m for m in ctx.participants if m not in keys]
    if missing:
        raise ProtocolError(f"participants not on the roster: {missing}")


class _MaskingMarket(MarketEndpoint):
    def __init__(self, market_id: str, options: _Options) -> None:
        self.market_id = market_id
        self._options = options
        self._identity = IdentityPrivateKey.generate(entropy=options.entropy)
        self._keys: dict[str, IdentityPublicKey] = {}

    def public_bundle(self) -> bytes:
        return self._identity.public_key().to_bytes()

    def install_roster(self, roster: Roster) -> None:
        keys = _roster_keys(roster)
        if keys.get(self.market_id) != self._identity.public_key():
            raise ProtocolError(f"the roster does not hold {self.market_id!r}'s identity key")
        self._keys = keys

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        _check_round(ctx, self._keys)
        t, q = self._options.for_round(ctx)
        return _MaskingClient(self.market_id, ctx, np.asarray(vector, dtype=np.float64),
                              identity=self._identity, keys=self._keys, threshold=t, quantizer=q,
                              entropy=self._options.entropy)


class _MaskingAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, options: _Options) -> None:
        self._options = options
        self._keys: dict[str, IdentityPublicKey] = {}

    def install_roster(self, roster: Roster) -> None:
        self._keys = _roster_keys(roster)

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        _check_round(ctx, self._keys)
        t, q = self._options.for_round(ctx)
        return _MaskingServer(ctx, self._keys, threshold=t, quantizer=q)


class MaskingAggregator(SecureAggregator):
    """Pairwise-mask secure summation with t-of-n dropout recovery.

    ``threshold``: shares needed to rebuild a seed (default ``n - n // 3``; must satisfy
    n/2 < t <= n). ``ring_bits``: the ring Z_2^k the sum lives in (8..32; uploads are 4 bytes per
    coordinate). ``rounding``: ``"nearest"`` or ``"stochastic"``. ``entropy``: randomness source
    for every key, seed, share and nonce (default ``os.urandom``). ``max_error``: optional
    ceiling on the decoded sum's quantization error, checked when a round starts.
    """

    name = "masking"
    secure = True

    def __init__(self, *, threshold: int | None = None, ring_bits: int = 32,
                 rounding: str = "nearest", entropy: Entropy = os.urandom,
                 max_error: float | None = None) -> None:
        self._options = _Options(threshold, ring_bits, rounding, entropy, max_error)

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _MaskingMarket(market_id, self._options)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _MaskingAggregatorEndpoint(self._options)


register_backend("masking", MaskingAggregator)
