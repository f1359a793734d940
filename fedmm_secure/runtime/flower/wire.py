"""Wire format between the coordinator (ServerApp) and a market worker (behind a ClientApp).

Every exchange is one ``(kind, payload)`` pair each way. In Flower it travels as a Message
whose RecordDict holds one ConfigRecord ``{"kind": str, "payload": bytes}``; between the
short-lived ClientApp process and the market's long-lived worker it travels over a loopback
socket as a length-prefixed frame. Control payloads are JSON; protocol payloads are our
secure-aggregation backend's own bytes, untouched (an optional JSON header rides in front).
"""

from __future__ import annotations

import base64
import json
import socket
import struct

import numpy as np

from ...errors import ProtocolError

__all__ = ["KINDS", "pack_frame", "recv_frame", "pack_json", "unpack_json", "pack_with_header",
           "unpack_with_header", "encode_bound", "decode_bound", "b64", "unb64", "RECORD_KEY", "with_node_config",
           "error_reply", "guarded"]

RECORD_KEY = "fedmm"
KINDS = ("hello", "start", "secagg", "broadcast", "request", "error")
_MAX_FRAME = 1 << 30


def pack_frame(kind: str, payload: bytes) -> bytes:
    k = kind.encode()
    return struct.pack(">HQ", len(k), len(payload)) + k + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        c = sock.recv(min(n, 1 << 20))
        if not c:
            raise ProtocolError("connection closed mid-frame")
        chunks.append(c)
        n -= len(c)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[str, bytes]:
    klen, plen = struct.unpack(">HQ", _recv_exact(sock, 10))
    if klen > 64 or plen > _MAX_FRAME:
        raise ProtocolError("frame too large")
    kind = _recv_exact(sock, klen).decode()
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    return kind, _recv_exact(sock, plen)


def pack_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def unpack_json(blob: bytes) -> dict:
    try:
        out = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("malformed control message") from None
    if not isinstance(out, dict):
        raise ProtocolError("malformed control message")
    return out


def pack_with_header(header: dict, body: bytes) -> bytes:
    h = pack_json(header)
    return struct.pack(">I", len(h)) + h + body


def unpack_with_header(blob: bytes) -> tuple[dict, bytes]:
    if len(blob) < 4:
        raise ProtocolError("truncated message")
    (n,) = struct.unpack(">I", blob[:4])
    if 4 + n > len(blob):
        raise ProtocolError("truncated message")
    return unpack_json(blob[4:4 + n]), blob[4 + n:]


def encode_bound(max_abs: float | np.ndarray) -> float | str:
    # Per-coordinate bounds go as raw float64 (exact), so both sides build identical contexts.
    a = np.asarray(max_abs, dtype=np.float64)
    return float(a) if a.ndim == 0 else b64(a.astype("<f8").tobytes())


def decode_bound(v: float | str) -> float | np.ndarray:
    if isinstance(v, (int, float)):
        return float(v)
    return np.frombuffer(unb64(v), dtype="<f8").copy()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode(), validate=True)
    except ValueError:
        raise ProtocolError("malformed base64 field") from None


def with_node_config(kind: str, payload: bytes, node_config) -> bytes:
    """``hello`` with the SuperNode's node config (``market``, ``data``) added on the market's
    side: where a market's data lives is the market's setting, not the aggregator's."""
    if kind != "hello" or not node_config:
        return payload
    hello = unpack_json(payload)
    hello["node"] = {k: str(node_config[k]) for k in ("market", "data") if k in node_config}
    return pack_json(hello)


def error_reply(exc: Exception) -> tuple[str, bytes]:
    """A market's failure as the ``error`` reply the coordinator reports (and treats as a dropout)."""
    return "error", f"{type(exc).__name__}: {exc}".encode()


def guarded(handle):
    """``handle(kind, payload)`` that answers failures with :func:`error_reply` instead of raising."""

    def safe(kind: str, payload: bytes) -> tuple[str, bytes]:
        try:
            return handle(kind, payload)
        except Exception as e:
            return error_reply(e)

    return safe
