"""Versioned binary envelope used by every backend's messages.

Layout (big-endian): ``magic "FMSA" | version u8 | backend u8 | stage u8 | round u64 |
run_id (u8 len + ascii) | label (u8 len + ascii) | sender (u8 len + ascii) | payload (u32 len +
bytes)``. Decoding is strict: trailing bytes, truncation, an unknown version or a field that does
not match what the receiver expects raise :class:`ProtocolError`, never a partial object.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ProtocolError

__all__ = ["Envelope", "encode_envelope", "decode_envelope", "VERSION", "BACKEND_CODES"]

MAGIC = b"FMSA"
# 2: masking signatures over BLAKE3 digests instead of SHA-256; peers of different versions
# refuse each other's first message with one clear error instead of an opaque bad signature.
VERSION = 2
BACKEND_CODES = {"plain": 1, "masking": 2, "ckks": 3}
_NAMES = {v: k for k, v in BACKEND_CODES.items()}
_HEAD = struct.Struct(">4sBBBQ")


@dataclass(frozen=True)
class Envelope:
    backend: str
    stage: int
    round_id: int
    run_id: str
    label: str
    sender: str
    payload: bytes | memoryview  # memoryview only from ``decode_envelope(..., view=True)``


def _short(s: str) -> bytes:
    b = s.encode("ascii")
    if len(b) > 255:
        raise ProtocolError("envelope field too long")
    return bytes([len(b)]) + b


def encode_envelope(env: Envelope) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, BACKEND_CODES[env.backend], env.stage, env.round_id)
    return b"".join(
        [head, _short(env.run_id), _short(env.label), _short(env.sender),
         struct.pack(">I", len(env.payload)), env.payload]
    )


def decode_envelope(data: bytes, *, view: bool = False) -> Envelope:
    """Parse ``data``; ``view`` makes the payload a read-only view into ``data`` instead of a
    copy (a megabyte upload or result is then never copied just to be parsed)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"message must be bytes, got {type(data).__name__}")
    # A view is only taken of immutable bytes: a signature checked over a caller's bytearray
    # must not change under the reader afterwards.
    whole = data if isinstance(data, bytes) else bytes(data)
    data = bytes(data[:_HEAD.size + 3 * 256 + 4]) if view else bytes(data)
    if len(data) < _HEAD.size:
        raise ProtocolError("message truncated")
    magic, version, code, stage, round_id = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise ProtocolError("not a fedmm-secure message")
    if version != VERSION:
        raise ProtocolError(f"unsupported message version {version} (expected {VERSION})")
    names = _NAMES
    if code not in names:
        raise ProtocolError(f"unknown backend code {code}")
    pos = _HEAD.size
    fields = []
    for _ in range(3):
        if pos >= len(data):
            raise ProtocolError("message truncated")
        n = data[pos]
        pos += 1
        if pos + n > len(data):
            raise ProtocolError("message truncated")
        try:
            fields.append(data[pos:pos + n].decode("ascii"))
        except UnicodeDecodeError:
            raise ProtocolError("malformed message header") from None
        pos += n
    if pos + 4 > len(data):
        raise ProtocolError("message truncated")
    (plen,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if pos + plen != len(whole):
        raise ProtocolError("message length does not match its header")
    payload = memoryview(whole).toreadonly()[pos:] if view else data[pos:]
    return Envelope(names[code], stage, round_id, fields[0], fields[1], fields[2], payload)


def expect(env: Envelope, *, backend: str, stage: int, round_id: int, run_id: str, label: str,
           sender: str | None = None) -> None:
    """Check an envelope against what the receiver's state machine expects next."""
    if env.backend != backend:
        raise ProtocolError(f"message for backend {env.backend!r}, expected {backend!r}")
    if env.run_id != run_id or env.label != label:
        raise ProtocolError("message belongs to another run or aggregation")
    if env.round_id != round_id:
        raise ProtocolError(f"message for round {env.round_id}, expected round {round_id}")
    if env.stage != stage:
        raise ProtocolError(f"message for stage {env.stage}, expected stage {stage}")
    if sender is not None and env.sender != sender:
        raise ProtocolError(f"message from {env.sender!r}, expected {sender!r}")
