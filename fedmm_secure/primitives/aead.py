"""Authenticated encryption: AES-256-GCM with a random 96-bit nonce prepended.

Layout of a sealed message: ``nonce (12) | ciphertext | tag (16)``. Random nonces are safe here
because each :class:`SymmetricKey` seals few messages (a handful per round; the GCM random-nonce
limit is 2^32 messages per key). Anything that fails to open (wrong key, wrong associated data,
a flipped bit, truncation) raises the one opaque :class:`IntegrityError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError, ProtocolError
from .keys import SymmetricKey

__all__ = ["seal", "open_sealed", "NONCE_SIZE", "TAG_SIZE", "OVERHEAD"]

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


def _check(key: SymmetricKey, associated_data: bytes) -> None:
    if not isinstance(key, SymmetricKey):
        raise ProtocolError("key must be a SymmetricKey")
    if not isinstance(associated_data, (bytes, bytearray)):
        raise ProtocolError("associated_data must be bytes")


def seal(key: SymmetricKey, plaintext: bytes, *, associated_data: bytes,
         entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``associated_data`` is authenticated, not sent."""
    _check(key, associated_data)
    nonce = entropy(NONCE_SIZE)
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"entropy source must return exactly {NONCE_SIZE} bytes")
    ct = AESGCM(key._hazmat_bytes()).encrypt(bytes(nonce), bytes(plaintext), bytes(associated_data))
    return bytes(nonce) + ct


def open_sealed(key: SymmetricKey, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`IntegrityError` on any tampering."""
    _check(key, associated_data)
    if not isinstance(ciphertext, (bytes, bytearray, memoryview)):
        raise IntegrityError()
    data = bytes(ciphertext)
    if len(data) < OVERHEAD:
        raise IntegrityError()
    try:
        return AESGCM(key._hazmat_bytes()).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:],
                                                   bytes(associated_data))
    except InvalidTag:
        raise IntegrityError() from None
