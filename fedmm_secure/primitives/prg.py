"""Mask expansion: a :class:`SymmetricKey` becomes a stream of ring elements in Z_2^32.

The PRG is AES-256-CTR keyed with the full 256-bit key, counter block starting at zero, and the
keystream read as little-endian uint32. A fixed counter start is safe because every key expanded
here is used for exactly one stream (self-mask seeds are fresh per round; pairwise seeds come out
of HKDF with a context that names the run, round, label and pair). No numpy RNG, no Mersenne
Twister: every mask bit is AES output.

Speed matters (the keystream is the floor of a masking client's cost), so keystream bytes are
produced by one ``update_into`` of zeros into a reused buffer and viewed as uint32 without a copy.
:func:`accumulate_masks` adds and subtracts many masks in cache-sized chunks, so the additions run
on data that is still in cache rather than making one pass over main memory per mask.

The keystream itself comes mostly out of OpenSSL's AES-GCM code path (:class:`MaskStream`),
which runs on VAES/AVX-512 lanes where its CTR mode runs on AES-NI only: the bytes are exactly
the AES-CTR keystream above (tests compare them with plain CTR), produced 1.6-2.3x faster
on the project's CPU (bench/RESULTS_masking.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from ..errors import ProtocolError
from .keys import SymmetricKey

__all__ = ["RING_DTYPE", "BulkKeystream", "Keystream", "MaskStream", "expand", "accumulate_masks",
           "keystream_into"]

RING_DTYPE = np.dtype("<u4")
_ZERO_IV = bytes(16)
_BLOCK = 16
# 64 Ki uint32 = 256 KiB per chunk: keystream + accumulator chunk stay in L2.
_CHUNK = 1 << 16


def _encryptor(key: bytes, iv: bytes = _ZERO_IV):
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def keystream_into(key: bytes, out: bytearray | memoryview, *, iv: bytes = _ZERO_IV,
                   zeros: bytes | None = None) -> None:
    """hazmat: fill ``out`` with raw AES-CTR keystream for a raw 32-byte key (tests, benchmarks).

    ``out`` must have ``block_size - 1`` spare bytes at the end (``update_into``'s contract); the
    first ``len(out) - 15`` bytes are keystream. ``zeros`` (``len(out) - 15`` zero bytes) may be
    passed to reuse the input buffer across calls, as the keystream floor benchmark does.
    """
    n = len(out) - (_BLOCK - 1)
    if n <= 0:
        raise ProtocolError("output buffer too small")
    if zeros is None:
        zeros = bytes(n)
    elif len(zeros) != n or any(zeros[:16]):
        raise ProtocolError("zeros must be len(out) - 15 zero bytes")
    _encryptor(key, iv).update_into(zeros, out)


class MaskStream:
    """The mask PRG's keystream: AES-256-CTR under ``key``, 128-bit big-endian counter from
    zero, read in consecutive pieces with :meth:`fill` (at most ``total`` bytes in all).

    Produced through OpenSSL's GCM code path, 1.6-2.3x faster than its CTR mode on CPUs with
    VAES (see :class:`BulkKeystream`), without changing a bit: GCM under the all-zero 96-bit
    nonce encrypts with counter blocks ``0^96 || be32(j + 2)``, which are CTR's blocks ``j + 2``
    while the counter stays below 2^32. So CTR blocks 0 and 1 (32 bytes) come from CTR mode
    and the rest is the GCM encryption of zeros, whose authentication tag is never computed.
    Streams too long for that (over 2^36 bytes: GCM's limit per nonce) use CTR mode alone.
    """

    __slots__ = ("_enc", "_head")

    _LEAD = 2 * _BLOCK
    _GCM_MAX = (1 << 36) - 32    # GCM's limit per nonce, which cryptography enforces

    def __init__(self, key: bytes, total: int) -> None:
        ctr = _encryptor(key)
        if total - self._LEAD > self._GCM_MAX or total <= self._LEAD:
            self._enc, self._head = ctr, memoryview(b"")
        else:
            self._head = memoryview(ctr.update(bytes(self._LEAD)))
            self._enc = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()

    def fill(self, zeros: bytes | memoryview, out: bytearray | memoryview) -> None:
        """Write the next ``len(zeros)`` keystream bytes to the start of ``out``. ``zeros`` is
        that many zero bytes; ``out`` needs ``block_size - 1`` spare bytes (``update_into``)."""
        n = len(zeros)
        k = min(len(self._head), n)
        if k:
            out[:k] = self._head[:k]
            self._head = self._head[k:]
            if k == n:
                return
            zeros, out = memoryview(zeros)[k:], memoryview(out)[k:]
        # Both modes are streams: partial blocks carry over between calls.
        self._enc.update_into(zeros, out)


def _check_length(length: int) -> None:
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ProtocolError(f"mask length must be a positive int, got {length!r}")


def expand(key: SymmetricKey, length: int) -> np.ndarray:
    """``length`` pseudorandom uint32 values (a fresh array) from ``key``."""
    if not isinstance(key, SymmetricKey):
        raise ProtocolError("key must be a SymmetricKey")
    _check_length(length)
    nbytes = 4 * int(length)
    out = bytearray(nbytes + _BLOCK - 1)
    MaskStream(key._hazmat_bytes(), nbytes).fill(bytes(nbytes), out)
    return np.frombuffer(out, dtype=RING_DTYPE, count=int(length))


def accumulate_masks(acc: np.ndarray, *, add: Sequence[SymmetricKey],
                     subtract: Sequence[SymmetricKey],
                     finish_chunk: Callable[[np.ndarray], None] | None = None) -> None:
    """In place: ``acc += sum(expand(k) for k in add) - sum(expand(k) for k in subtract)`` mod 2^32.

    Identical to the naive sum of :func:`expand` outputs (tests check this), computed chunk by
    chunk with one live AES-CTR context per key. ``finish_chunk`` is called on each finished
    chunk (a writeable view of ``acc``, in order) while it is still in cache: reducing it mod 2^k
    and hashing it there costs a fraction of a second pass over main memory.
    """
    if not isinstance(acc, np.ndarray) or acc.dtype != RING_DTYPE or acc.ndim != 1 \
            or not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ProtocolError("accumulator must be a writeable contiguous 1-D uint32 array")
    keys = [(k, np.add) for k in add] + [(k, np.subtract) for k in subtract]
    for k, _ in keys:
        if not isinstance(k, SymmetricKey):
            raise ProtocolError("mask keys must be SymmetricKey objects")
    length = acc.shape[0]
    chunk = min(_CHUNK, length)
    zeros = bytes(4 * chunk)
    buf = bytearray(4 * chunk + _BLOCK - 1)
    view = np.frombuffer(buf, dtype=RING_DTYPE, count=chunk)
    ctxs = [(MaskStream(k._hazmat_bytes(), 4 * length), op) for k, op in keys]
    zmv = memoryview(zeros)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        m = stop - start
        part = acc[start:stop]
        src = zmv if m == chunk else zmv[:4 * m]
        for stream, op in ctxs:
            # Stream state carries over between calls, so chunked output equals one long stream.
            stream.fill(src, buf)
            op(part, view[:m], out=part)
        if finish_chunk is not None:
            finish_chunk(part)


class Keystream:
    """One long AES-256-CTR keystream of ``key``, read piece by piece; no byte is read twice.

    The source of unpredictable randomness for the privacy layer (DP noise, Poisson sampling):
    what it yields is determined by the key alone, and the key never leaves this object. Reads
    reuse one buffer, so a returned view is valid only until the next :meth:`read`.
    """

    __slots__ = ("_enc", "_zeros", "_out")

    def __init__(self, key: SymmetricKey) -> None:
        if not isinstance(key, SymmetricKey):
            raise ProtocolError("key must be a SymmetricKey")
        self._enc = _encryptor(key._hazmat_bytes())
        self._zeros = b""
        self._out = bytearray(_BLOCK - 1)

    def read(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` bytes of keystream (a view into a reused buffer)."""
        _check_length(nbytes)
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._out = bytearray(nbytes + _BLOCK - 1)
        # CTR state carries over between calls: consecutive reads continue one stream.
        self._enc.update_into(memoryview(self._zeros)[:nbytes], self._out)
        return memoryview(self._out)[:nbytes]


class BulkKeystream:
    """One long AES-256 counter-mode keystream of ``key``, at about twice :class:`Keystream`'s speed.

    Block ``i`` under nonce ``n`` is ``AES_K(n || be32(i + 2))``: a 96-bit nonce and a 32-bit
    block counter, GCM's counter layout (NIST SP 800-38D). It is produced as the GCM encryption
    of zeros, because OpenSSL runs that code path on VAES/AVX-512 lanes and its plain CTR mode
    on AES-NI only (0.065 vs 0.13 ns per byte on this project's CPU). The GHASH computed on the
    side is never finalised: no tag exists, and the output is exactly the counter-mode
    keystream. Each nonce (0, 1, 2, ... as 12 big-endian bytes) serves at most
    :attr:`PER_NONCE` bytes, then the next one continues the stream, so no counter block
    repeats under the key. Not interchangeable with :class:`Keystream` (different counter
    blocks): it is the source of the privacy layer's randomness, never of masks, which peers
    must expand identically.
    """

    __slots__ = ("_key", "_nonce", "_enc", "_used", "_zeros", "_out")

    # Below GCM's limit of 2^36 - 32 bytes per nonce (which cryptography enforces).
    PER_NONCE = 1 << 35

    def __init__(self, key: SymmetricKey) -> None:
        if not isinstance(key, SymmetricKey):
            raise ProtocolError("key must be a SymmetricKey")
        self._key = key._hazmat_bytes()
        self._nonce = -1
        self._enc: CipherContext | None = None
        self._used = 0
        self._zeros = b""
        self._out = bytearray(_BLOCK - 1)
        self._next_nonce()

    def _next_nonce(self) -> None:
        self._nonce += 1
        nonce = self._nonce.to_bytes(12, "big")
        self._enc = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        self._used = 0

    def read(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` bytes of keystream (a view into a reused buffer)."""
        _check_length(nbytes)
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._out = bytearray(nbytes + _BLOCK - 1)
        zeros, out = memoryview(self._zeros), memoryview(self._out)
        done = 0
        while done < nbytes:
            if self._used == self.PER_NONCE:
                self._next_nonce()
            take = min(nbytes - done, self.PER_NONCE - self._used)
            assert self._enc is not None
            # GCM is a stream mode: partial blocks carry over between calls.
            self._enc.update_into(zeros[:take], out[done:done + take + _BLOCK - 1])
            self._used += take
            done += take
        return out[:nbytes]
