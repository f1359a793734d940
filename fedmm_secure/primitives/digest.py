"""BLAKE3 digest of bulk payloads: the hash in hash-then-sign of megabyte uploads and results.

Why not SHA-256: a masked upload or a RESULT holds 4 bytes per coordinate, and the aggregator
hashes n of them per round. On the reference CPU (SHA-NI and VAES) SHA-256 costs about 3x
AES-CTR per byte, so hashing alone was several times the aggregator's AES floor; BLAKE3 costs
about as much as AES-CTR (bench/RESULTS_masking.md). It is a 256-bit hash with 128-bit collision
resistance, like SHA-256, so a signature over the digest binds the payload as strongly.

The hasher is the PyPI ``blake3`` binding used on one thread (no ``max_threads``): the output
does not depend on threading, and the cores belong to the caller's other work. Domain separation
is the caller's: the digest is of exactly the bytes given, and callers sign it behind their own
domain prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from blake3 import blake3

__all__ = ["DIGEST_SIZE", "BulkHasher", "bulk_digest"]

DIGEST_SIZE = 32

Chunk = bytes | bytearray | memoryview | np.ndarray


def _as_bytes(data: Chunk) -> bytes | bytearray | memoryview:
    # The binding takes only byte-formatted buffers; hashlib takes any contiguous one. Arrays and
    # typed views are re-viewed as bytes without a copy (C-contiguous only, else TypeError: a
    # strided view would hash different bytes than the wire carries).
    if isinstance(data, np.ndarray):
        return memoryview(data).cast("B")
    if isinstance(data, memoryview) and data.format != "B":
        return data.cast("B")
    return data


class BulkHasher:
    """Incremental BLAKE3: ``update`` in any chunking gives the digest of the concatenation."""

    __slots__ = ("_h",)

    def __init__(self, data: Chunk = b"") -> None:
        self._h = blake3()
        self.update(data)

    def update(self, data: Chunk) -> None:
        self._h.update(_as_bytes(data))

    def digest(self) -> bytes:
        """The 32-byte digest of everything so far (the hasher stays usable)."""
        return self._h.digest()


def bulk_digest(parts: Iterable[Chunk]) -> bytes:
    """The BLAKE3 digest of the concatenation of ``parts``, without concatenating them."""
    h = BulkHasher()
    for p in parts:
        h.update(p)
    return h.digest()
