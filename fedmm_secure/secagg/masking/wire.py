"""Wire format of the ``masking`` backend: stages, strict framing, session binding, signatures.

Everything here is shared by the market side (:mod:`.client`) and the aggregator side
(:mod:`.server`); parsing is strict, so anything malformed raises :class:`ProtocolError`, never
``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ...errors import ProtocolError
from ...primitives.aead import OVERHEAD
from ...primitives.digest import BulkHasher, bulk_digest
from ...primitives.keys import (SIGNATURE_SIZE, AgreementPublicKey, IdentityPrivateKey,
                                IdentityPublicKey, SymmetricKey)
from ...primitives.quantization import Quantizer
from ...primitives.shamir import SHARE_SIZE
from ..base import RoundContext
from ..codec import Envelope, decode_envelope, encode_envelope, expect

__all__ = [
    "NONCE", "ADVERTISE", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY", "UNMASK", "RESULT", "AGREE",
    "FINISHED", "NONCE_SIZE", "session_with_nonces", "share_commitment",
    "BACKEND", "SERVER", "DOMAIN", "DIGEST", "SHARE_PLAIN", "SEALED_SHARES", "KIND_B", "KIND_S",
    "Entropy", "default_threshold", "pack_ids", "unpack_ids", "pack_items", "unpack_items",
    "pack_sections", "unpack_sections", "session_digest", "context", "pair", "b_commitment",
    "signed_digest", "signed_head", "sign_message", "open_signed", "open_signed_digest",
    "open_signed_streamed", "read_unverified", "read_nonce", "echo_tag", "STREAM_CHUNK",
    "share_x",
    "ring_vector", "parse_advert", "blame",
]

NONCE, ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK, RESULT, AGREE = range(8)
FINISHED = -1
BACKEND = "masking"
SERVER = "aggregator"
# v2: signatures are over a BLAKE3 digest (v1: SHA-256). The envelope version was bumped with it,
# so a v1 peer is refused at decoding; the new domain keeps a v1 signature from ever verifying here.
DOMAIN = b"fedmm-secure/masking/v2"
DIGEST = 32
NONCE_SIZE = 32
SHARE_PLAIN = 2 * SHARE_SIZE
SEALED_SHARES = SHARE_PLAIN + OVERHEAD
KIND_B, KIND_S = b"b", b"s"
# 256 KiB (64 Ki ring elements): a chunk and its decoded float64 copy stay in L2.
STREAM_CHUNK = 1 << 18

Entropy = Callable[[int], bytes]


def default_threshold(n: int, *, colluders: int) -> int:
    """t = n - floor(n/3) (a third of the markets may drop at any stage), raised where needed to
    the smallest t with 2t > n + c, below which an aggregator with c colluding markets can show
    two groups different survivor sets and collect both shares of one market."""
    return max(n - n // 3, (n + colluders) // 2 + 1)


def pack_ids(ids: Sequence[str]) -> bytes:
    parts = [struct.pack(">H", len(ids))]
    for m in ids:
        b = m.encode("ascii")
        parts.append(bytes([len(b)]) + b)
    return b"".join(parts)


def read_id(data: bytes, pos: int) -> tuple[str, int]:
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


def unpack_ids(data: bytes) -> tuple[str, ...]:
    if len(data) < 2:
        raise ProtocolError("payload truncated")
    (count,) = struct.unpack_from(">H", data, 0)
    pos, out = 2, []
    for _ in range(count):
        m, pos = read_id(data, pos)
        out.append(m)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    return sorted_unique(out)


def pack_items(items: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [struct.pack(">H", len(items))]
    for m, blob in items:
        b = m.encode("ascii")
        parts.append(bytes([len(b)]) + b + struct.pack(">I", len(blob)) + blob)
    return b"".join(parts)


def read_sized(data: bytes, pos: int) -> tuple[bytes, int]:
    """One u32-length-prefixed field at ``pos``; returns it and the position after it."""
    if pos + 4 > len(data):
        raise ProtocolError("payload truncated")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if pos + n > len(data):
        raise ProtocolError("payload truncated")
    return data[pos:pos + n], pos + n


def unpack_items(data: bytes) -> dict[str, bytes]:
    if len(data) < 2:
        raise ProtocolError("payload truncated")
    (count,) = struct.unpack_from(">H", data, 0)
    pos, out = 2, {}
    order = []
    for _ in range(count):
        m, pos = read_id(data, pos)
        order.append(m)
        out[m], pos = read_sized(data, pos)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    sorted_unique(order)
    return out


def pack_sections(*sections: bytes | memoryview) -> bytes:
    parts: list[bytes | memoryview] = []
    for s in sections:
        parts += [struct.pack(">I", len(s)), s]
    return b"".join(parts)


def unpack_sections(data: bytes, count: int) -> list[bytes]:
    pos, out = 0, []
    for _ in range(count):
        item, pos = read_sized(data, pos)
        out.append(item)
    if pos != len(data):
        raise ProtocolError("trailing bytes in payload")
    return out


def sorted_unique(ids: Sequence[str]) -> tuple[str, ...]:
    t = tuple(ids)
    if any(a >= b for a, b in zip(t, t[1:])):
        raise ProtocolError("market ids must be sorted and distinct")
    return t


# ---------------------------------------------------------------------------------------------
# Session binding, signatures and key-derivation contexts

def lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def session_digest(ctx: RoundContext, threshold: int, q: Quantizer, roster: bytes) -> bytes:
    """The public configuration of a round, including the pinned roster (and with it the
    aggregator's key). Only the NONCE stage is bound to this alone."""
    h = hashlib.sha256(DOMAIN + b"/session")
    for part in (ctx.run_id.encode(), struct.pack(">Q", ctx.round_id), ctx.label.encode(),
                 pack_ids(ctx.participants), struct.pack(">QII", ctx.length, threshold, q.ring_bits),
                 q.rounding.encode(), roster):
        h.update(lp(part))
    bound = np.asarray(ctx.max_abs, dtype="<f8")
    h.update(lp(bound.tobytes()))
    return h.digest()


def session_with_nonces(base: bytes, nonces: Mapping[str, bytes]) -> bytes:
    """Every stage after NONCE is bound to this: the configuration plus every market's fresh
    nonce, so a message from another execution of an identical round never verifies."""
    h = hashlib.sha256(DOMAIN + b"/session-nonces")
    h.update(base)
    h.update(pack_items(sorted(nonces.items())))
    return h.digest()


def context(session: bytes, purpose: bytes, *ids: str) -> bytes:
    return b"".join([DOMAIN, b"/", purpose, b"|", session] + [lp(m.encode()) for m in ids])


def pair(u: str, v: str) -> tuple[str, str]:
    return (u, v) if u < v else (v, u)


def b_commitment(session: bytes, market: str, b: SymmetricKey) -> bytes:
    return hashlib.sha256(context(session, b"b-commit", market) + b._hazmat_bytes()).digest()


def share_commitment(session: bytes, dealer: str, holder: str, kind: bytes, share: bytes) -> bytes:
    """Hash commitment to one Shamir share, signed by its dealer at SHARE_KEYS, against which the
    aggregator checks the share when the holder reveals it (shares are uniform 256-bit values
    below the threshold, so the hash hides them)."""
    return hashlib.sha256(context(session, b"share-commit", dealer, holder) + kind + share).digest()


def signed_digest(parts: Sequence[bytes | memoryview]) -> bytes:
    """What is signed for a message made of ``parts``: the domain and the BLAKE3 digest."""
    # Hash-then-sign: Ed25519 would hash a 4 MB upload with SHA-512 twice when signing; one
    # BLAKE3 pass costs about one AES-CTR pass (SHA-256: ~3x) and is as binding. Every signed
    # message uses it, small ones too, so one verification path serves every stage.
    return DOMAIN + b"/sig" + bulk_digest(parts)


def signed_head(ctx: RoundContext, stage: int, sender: str, body_len: int) -> bytes:
    """Envelope bytes up to the payload, for a payload ``session | body | signature``."""
    # The codec ends every envelope with ``u32 payload length | payload``: encode the header
    # with an empty payload and patch the length, so a megabyte body is never concatenated twice.
    head = encode_envelope(Envelope(BACKEND, stage, ctx.round_id, ctx.run_id, ctx.label, sender,
                                    b""))[:-4]
    return head + struct.pack(">I", DIGEST + body_len + SIGNATURE_SIZE)


def sign_message(identity: IdentityPrivateKey, ctx: RoundContext, stage: int, sender: str,
                  session: bytes, body: bytes | memoryview) -> bytes:
    """An envelope whose payload is ``session | body | signature``; the Ed25519 signature covers
    every envelope byte before it."""
    head = signed_head(ctx, stage, sender, len(body))
    sig = identity.sign(signed_digest([head, session, body]))
    return b"".join([head, session, body, sig])


def open_signed(data: bytes, *, ctx: RoundContext, stage: int, sender: str, session: bytes,
                keys: Mapping[str, IdentityPublicKey], view: bool = False) -> bytes | memoryview:
    """Verify a signed message (a market's or the aggregator's) and return its body (between
    session digest and signature); ``view`` returns a zero-copy view, for megabyte messages."""
    return open_signed_digest(data, ctx=ctx, stage=stage, sender=sender, session=session,
                              keys=keys, view=view)[0]


def open_signed_digest(data: bytes, *, ctx: RoundContext, stage: int, sender: str, session: bytes,
                       keys: Mapping[str, IdentityPublicKey], view: bool = False,
                       env: Envelope | None = None) -> tuple[bytes | memoryview, bytes]:
    """:func:`open_signed`, also returning the signed digest (what markets echo to agree on a
    result without hashing it twice). ``env`` is ``data`` already decoded (with
    ``decode_envelope(data, view=True)``), so a megabyte message is parsed once, not twice."""
    if env is None:
        env = decode_envelope(data, view=view)
    if len(env.payload) < DIGEST + SIGNATURE_SIZE:
        raise ProtocolError("message truncated")
    key = keys.get(env.sender)
    if key is None:
        raise ProtocolError(f"message from {env.sender!r}, who is not on the roster")
    # Signature before content checks: any flipped byte of a well-formed message is reported as
    # the one opaque IntegrityError.
    digest = signed_digest([memoryview(data)[:-SIGNATURE_SIZE]])
    key.verify(bytes(env.payload[-SIGNATURE_SIZE:]), digest)
    expect(env, backend=BACKEND, stage=stage, round_id=ctx.round_id, run_id=ctx.run_id,
           label=ctx.label, sender=sender)
    if env.payload[:DIGEST] != session:
        raise ProtocolError("message belongs to another session configuration")
    body = memoryview(env.payload)[DIGEST:-SIGNATURE_SIZE]
    return (body if view else bytes(body)), digest


def open_signed_streamed(data: bytes, env: Envelope, *, ctx: RoundContext, stage: int, sender: str,
                         session: bytes, keys: Mapping[str, IdentityPublicKey], tail: int,
                         consume: Callable[[memoryview, int], None]
                         ) -> tuple[memoryview, bytes] | None:
    """:func:`open_signed_digest` (views only) for a message whose body ends with ``tail``
    bytes of vector: each chunk of the vector is handed to ``consume(chunk, offset)`` right
    after it is hashed, while it is in cache, so a megabyte RESULT is read from memory once
    instead of once to verify and once to decode.

    ``consume`` runs before the signature is checked: it must not raise, and whatever it
    produced must be dropped if this raises. Returns ``None`` (``consume`` never called) when
    the message is too short to end with such a vector; the caller then opens it normally.
    """
    if len(env.payload) < DIGEST + tail + SIGNATURE_SIZE:
        return None
    key = keys.get(env.sender)
    if key is None:
        raise ProtocolError(f"message from {env.sender!r}, who is not on the roster")
    mv = memoryview(data)
    end = len(mv) - SIGNATURE_SIZE
    first = end - tail
    h = BulkHasher(mv[:first])
    for off in range(0, tail, STREAM_CHUNK):
        part = mv[first + off:min(first + off + STREAM_CHUNK, end)]
        h.update(part)
        consume(part, off)
    digest = DOMAIN + b"/sig" + h.digest()   # what signed_digest gives for the same bytes
    key.verify(bytes(env.payload[-SIGNATURE_SIZE:]), digest)
    expect(env, backend=BACKEND, stage=stage, round_id=ctx.round_id, run_id=ctx.run_id,
           label=ctx.label, sender=sender)
    if env.payload[:DIGEST] != session:
        raise ProtocolError("message belongs to another session configuration")
    return memoryview(env.payload)[DIGEST:-SIGNATURE_SIZE], digest


def read_unverified(data: bytes, *, ctx: RoundContext, stage: int, sender: str,
                    session: bytes, env: Envelope | None = None) -> bytes:
    """The body of a signed message, parsed strictly but deliberately *not* signature-checked:
    only where every field is authenticated otherwise (:func:`read_nonce`; result confirmations,
    whose pairwise tags are the proof; the aggregator messages the market client lists as
    relaying only authenticated content)."""
    if env is None:
        env = decode_envelope(data)
    if len(env.payload) < DIGEST + SIGNATURE_SIZE:
        raise ProtocolError("message truncated")
    expect(env, backend=BACKEND, stage=stage, round_id=ctx.round_id, run_id=ctx.run_id,
           label=ctx.label, sender=sender)
    if env.payload[:DIGEST] != session:
        raise ProtocolError("message belongs to another session configuration")
    return bytes(env.payload[DIGEST:-SIGNATURE_SIZE])


def read_nonce(data: bytes, *, ctx: RoundContext, sender: str, session: bytes) -> bytes:
    """A peer's NONCE message, parsed strictly but not signature-checked.

    Checking it would be redundant: every later message of the peer is signed over the session
    hash of the whole nonce set, after the peer checked its own nonce is in it. So one verified
    advertisement from v at SHARE_KEYS proves v saw exactly this nonce set, v's genuine nonce
    included, before anything secret leaves this market; a forged nonce only makes that check
    fail. (Skipping it saves one Ed25519 verification per peer and round.)
    """
    body = read_unverified(data, ctx=ctx, stage=NONCE, sender=sender, session=session)
    if len(body) != NONCE_SIZE:
        raise ProtocolError("nonce of the wrong length")
    return body


def echo_tag(key: SymmetricKey, sender: str, recipient: str, digest: bytes) -> bytes:
    """``sender``'s confirmation to ``recipient`` that it got the RESULT with ``digest``.

    HMAC-SHA256 under a key only the two markets hold (derived from their share-encryption
    agreement, whose public halves are in their signed advertisements), so the aggregator cannot
    forge it; the direction is in the input, so a tag cannot be reflected back to its sender.
    Markets need to convince only each other, not a third party: a MAC does, at a fraction of
    an Ed25519 verification per peer.
    """
    msg = b"".join([DOMAIN, b"/echo", lp(sender.encode()), lp(recipient.encode()), digest])
    return hmac.new(key._hazmat_bytes(), msg, hashlib.sha256).digest()


def share_x(ctx: RoundContext, market: str) -> int:
    return ctx.participants.index(market) + 1


def ring_vector(ctx: RoundContext, q: Quantizer, payload: bytes) -> np.ndarray:
    if len(payload) != 4 * ctx.length:
        raise ProtocolError(f"vector of {len(payload)} bytes, expected {4 * ctx.length}")
    v = np.frombuffer(payload, dtype="<u4")
    if q.ring_bits < 32 and np.any(v >> np.uint32(q.ring_bits)):
        raise ProtocolError(f"vector holds values outside Z_2^{q.ring_bits}")
    return v


def parse_advert(body: bytes) -> tuple[AgreementPublicKey, AgreementPublicKey]:
    if len(body) != 64:
        raise ProtocolError("advertisement must hold two 32-byte public keys")
    return AgreementPublicKey.from_bytes(body[:32]), AgreementPublicKey.from_bytes(body[32:])


def blame(err: ProtocolError, market: str) -> ProtocolError:
    err.market = market  # type: ignore[attr-defined]  # lets the caller drop the offender and retry
    return err

