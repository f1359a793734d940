"""Wire format and key schedule of the ``ckks`` backend, shared by both sides."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ...errors import IntegrityError, ProtocolError
from ...primitives.ckks import CkksParameters
from ...primitives.digest import bulk_digest
from ...primitives.keys import (PUBLIC_KEY_SIZE, SIGNATURE_SIZE, AgreementPublicKey,
                                IdentityPrivateKey, IdentityPublicKey)
from ..base import RoundContext, Roster
from ..codec import Envelope, encode_envelope

__all__ = ["AGREE", "NONCE_SIZE", "TAG_SLOTS", "TAG_TOLERANCE", "TAG_KEY_SIZE", "session_digest",
           "session_with_nonces", "tags", "pack_map", "unpack_map",
           "BACKEND", "KEYS", "UPLOAD", "RESULT", "DONE", "AGGREGATOR", "KEY_ID_SIZE", "SIG_DOMAIN",
           "KDF_DOMAIN", "BUNDLE_MAGIC", "Entropy", "pack", "unpack", "u64", "parse_ascii", "envelope_for", "signed",
           "verify", "MarketBundle", "parse_roster", "epoch_of", "key_holder", "kdf_label",
           "CkksOptions", "roster_entry", "normalised", "nonce_source", "result_digest"]

BACKEND = "ckks"
KEYS, UPLOAD, RESULT, AGREE = 0, 1, 2, 3
DONE = -1
AGGREGATOR = "aggregator"
KEY_ID_SIZE = 16
NONCE_SIZE = 32
TAG_KEY_SIZE = 32
TAG_SLOTS = 4
# CKKS sums carry ~1e-7 error; a substituted or partial sum misses by O(1) in every tag slot.
TAG_TOLERANCE = 1e-4
SIG_DOMAIN = b"fedmm-secure/v1/ckks/message\x00"
KDF_DOMAIN = b"fedmm-secure/v1/ckks/key-distribution\x00"
BUNDLE_MAGIC = b"FMCK\x01"

Entropy = Callable[[int], bytes]


def pack(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + bytes(f) for f in fields)


def unpack(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` length-prefixed fields and nothing after them."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise ProtocolError("message truncated")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise ProtocolError("message truncated")
        out.append(bytes(data[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise ProtocolError("trailing bytes after message")
    return out


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def pack_map(items: Mapping[str, bytes]) -> bytes:
    """Sorted ``name -> bytes`` pairs: ``u32 count`` then one length-prefixed pair each."""
    keys = sorted(items)
    return struct.pack(">I", len(keys)) + pack(*[pack(k.encode("ascii"), items[k]) for k in keys])


def unpack_map(data: bytes) -> dict[str, bytes]:
    if len(data) < 4:
        raise ProtocolError("message truncated")
    (count,) = struct.unpack(">I", data[:4])
    if count > len(data):
        raise ProtocolError("malformed list")
    out: dict[str, bytes] = {}
    for f in unpack(data[4:], count):
        k, v = unpack(f, 2)
        name = parse_ascii(k)
        if out and name <= max(out):
            raise ProtocolError("names must be sorted and distinct")
        out[name] = v
    return out


def session_digest(ctx: RoundContext, roster: bytes, epoch_rounds: int) -> bytes:
    """The round's public configuration and the pinned roster (with the aggregator's key)."""
    bound = np.asarray(ctx.max_abs, dtype="<f8").tobytes()
    return hashlib.sha256(SIG_DOMAIN + b"session" + pack(
        ctx.run_id.encode(), u64(ctx.round_id), ctx.label.encode(),
        ",".join(ctx.participants).encode(), u64(ctx.length), bound, roster,
        u64(epoch_rounds))).digest()


def session_with_nonces(base: bytes, nonces: Mapping[str, bytes]) -> bytes:
    """Every stage after KEYS is bound to this, so nothing from another execution of an
    identical round verifies."""
    return hashlib.sha256(SIG_DOMAIN + b"session-nonces" + base + pack_map(nonces)).digest()


def result_digest(message: bytes) -> bytes:
    """What every survivor echoes, signed, to confirm it got the very same RESULT message.

    BLAKE3 of the whole signed message (megabytes of ciphertext): about one AES-CTR pass per
    byte, a third of SHA-256 here. Only ever compared with another result_digest, inside messages
    signed under SIG_DOMAIN, so it needs no domain of its own.
    """
    return bulk_digest([message])


def tags(tag_key: bytes, session: bytes, market: str) -> np.ndarray:
    """The market's tag values in [-1, 1], known to every key holder and never to the aggregator.

    Every upload carries its tags in TAG_SLOTS extra slots; the decrypted sum's tag slots must
    equal the sum of the listed survivors' tags, so a "sum" that is one market's upload, a
    multiple of it, or a sum over other markets than claimed is refused before it is used.
    """
    raw = hmac.new(tag_key, SIG_DOMAIN + b"tag" + session + market.encode(), hashlib.sha512).digest()
    words = np.frombuffer(raw[:8 * TAG_SLOTS], dtype=">u8").astype(np.float64)
    return words / 2.0 ** 63 - 1.0


def parse_ascii(b: bytes) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed identifier") from None


def envelope_for(ctx: RoundContext, stage: int, sender: str, payload: bytes) -> Envelope:
    return Envelope(BACKEND, stage, ctx.round_id, ctx.run_id, ctx.label, sender, payload)


def signed(ctx: RoundContext, stage: int, sender: str, body: bytes,
            key: IdentityPrivateKey) -> bytes:
    unsigned = encode_envelope(envelope_for(ctx, stage, sender, body))
    return encode_envelope(envelope_for(ctx, stage, sender, body + key.sign(SIG_DOMAIN + unsigned)))


def verify(env: Envelope, key: IdentityPublicKey) -> bytes:
    """Check the trailing signature over the envelope; return the signed body."""
    if len(env.payload) < SIGNATURE_SIZE:
        raise IntegrityError()
    body, sig = env.payload[:-SIGNATURE_SIZE], env.payload[-SIGNATURE_SIZE:]
    unsigned = encode_envelope(Envelope(env.backend, env.stage, env.round_id, env.run_id,
                                        env.label, env.sender, body))
    key.verify(sig, SIG_DOMAIN + unsigned)
    return body


# ---------------------------------------------------------------------------------------------
# Roster bundle and key schedule


@dataclass(frozen=True)
class MarketBundle:
    """A market's long-term public bundle on the roster.

    Wire form (69 bytes): ``b"FMCK" | version 0x01 | Ed25519 identity key (32) | X25519 static
    key (32)``.
    """

    identity: IdentityPublicKey
    agreement: AgreementPublicKey

    def to_bytes(self) -> bytes:
        return BUNDLE_MAGIC + self.identity.to_bytes() + self.agreement.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> MarketBundle:
        data = bytes(data)
        if len(data) != len(BUNDLE_MAGIC) + 2 * PUBLIC_KEY_SIZE or not data.startswith(BUNDLE_MAGIC):
            raise ProtocolError("not a ckks roster bundle")
        k = len(BUNDLE_MAGIC)
        return cls(IdentityPublicKey.from_bytes(data[k:k + PUBLIC_KEY_SIZE]),
                   AgreementPublicKey.from_bytes(data[k + PUBLIC_KEY_SIZE:]))


def parse_roster(roster: Roster) -> dict[str, MarketBundle]:
    return {m: MarketBundle.from_bytes(roster.bundle(m)) for m in roster.markets}


def epoch_of(round_id: int, epoch_rounds: int) -> int:
    return round_id // epoch_rounds


def key_holder(ctx: RoundContext, epoch_rounds: int) -> str:
    """The market that owns the CKKS key for this round's epoch."""
    return ctx.participants[epoch_of(ctx.round_id, epoch_rounds) % len(ctx.participants)]


def kdf_label(ctx: RoundContext, epoch: int, holder: str, recipient: str, key_id: bytes,
               public_digest: bytes, eph: bytes) -> bytes:
    return KDF_DOMAIN + pack(ctx.run_id.encode(), ctx.label.encode(), u64(ctx.round_id),
                               u64(epoch), holder.encode(), recipient.encode(), key_id,
                               public_digest, eph)


@dataclass(frozen=True)
class CkksOptions:
    epoch_rounds: int
    params: CkksParameters
    n_threads: int
    entropy: Entropy | None


def roster_entry(bundles: Mapping[str, MarketBundle], m: str) -> MarketBundle:
    try:
        return bundles[m]
    except KeyError:
        raise ProtocolError(f"market {m!r} is not on the roster") from None


def normalised(ctx: RoundContext, vector: np.ndarray) -> tuple[np.ndarray, int]:
    if vector.shape != (ctx.length,):
        raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
    if not np.all(np.isfinite(vector)):
        raise ProtocolError("input holds non-finite values")
    bounds = ctx.bounds()
    clipped = int(np.count_nonzero(np.abs(vector) > bounds))
    return np.clip(vector, -bounds, bounds) / bounds, clipped


def nonce_source(entropy: Entropy | None) -> dict:
    return {} if entropy is None else {"entropy": entropy}
