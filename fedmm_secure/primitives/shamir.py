"""t-of-n Shamir secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297.

A prime just above 2^256 holds a whole 32-byte seed or X25519 scalar in one field element, so a
secret is one polynomial (not several chunks) and a share value is 33 bytes.

Speed (docs/performance.md: split <= 1 ms, recover <= 5 ms at n = 100): share x-coordinates are small
integers, so Horner's rule runs on exact integers with a single reduction mod p at the end
(multiplying a big integer by a small one is cheap; reducing after every step is not). Recovery
computes the Lagrange weights at zero once per set of x-coordinates, with one modular inversion
for the whole batch, and then costs t multiplications per secret.

Coefficients come from the ``entropy`` callable (``os.urandom`` or ``secrets.token_bytes``): 48
bytes per coefficient reduced mod p, statistically within 2^-128 of uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import IntegrityError, ProtocolError
from .keys import AgreementPrivateKey, SymmetricKey

__all__ = [
    "PRIME", "SECRET_SIZE", "SHARE_SIZE", "Share", "split_secret", "recover_secret",
    "recover_secrets", "lagrange_weights_at_zero", "split_key", "recover_symmetric_key",
    "recover_agreement_key",
]

PRIME = (1 << 256) + 297
SECRET_SIZE = 32
_Y_SIZE = 33
SHARE_SIZE = 2 + _Y_SIZE
_COEFF_BYTES = 48
_MAX_X = (1 << 16) - 1


@dataclass(frozen=True, repr=False)
class Share:
    """One share: the polynomial evaluated at ``x`` (1 <= x < 2^16)."""

    x: int
    y: int

    def __repr__(self) -> str:  # the value is secret-share material
        return f"Share(x={self.x}, y=<hidden>)"

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_SIZE, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if not isinstance(data, (bytes, bytearray)) or len(data) != SHARE_SIZE:
            raise IntegrityError()
        x = int.from_bytes(data[:2], "big")
        y = int.from_bytes(data[2:], "big")
        if x == 0 or y >= PRIME:
            raise IntegrityError()
        return cls(x, y)


def _check_xs(xs: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(x) for x in xs)
    if any(not 1 <= x <= _MAX_X for x in out):
        raise ProtocolError(f"share x-coordinates must lie in [1, {_MAX_X}]")
    if len(set(out)) != len(out):
        raise ProtocolError("share x-coordinates must be distinct")
    return out


def split_secret(secret: bytes, *, threshold: int, xs: Sequence[int],
                 entropy: Callable[[int], bytes]) -> list[Share]:
    """Shares of ``secret`` at each x in ``xs``; any ``threshold`` of them recover it and any
    fewer are independent of it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_SIZE:
        raise ProtocolError(f"secret must be {SECRET_SIZE} bytes")
    points = _check_xs(xs)
    if not isinstance(threshold, int) or not 1 <= threshold <= len(points):
        raise ProtocolError(f"threshold must be in [1, {len(points)}], got {threshold!r}")
    k = threshold - 1
    rnd = entropy(_COEFF_BYTES * k)
    if not isinstance(rnd, (bytes, bytearray)) or len(rnd) != _COEFF_BYTES * k:
        raise ProtocolError("entropy source returned the wrong number of bytes")
    # coeffs[0] is the highest-degree coefficient, for Horner's rule.
    coeffs = [int.from_bytes(rnd[i:i + _COEFF_BYTES], "big") % PRIME
              for i in range(0, len(rnd), _COEFF_BYTES)]
    coeffs.append(int.from_bytes(secret, "big"))
    # Horner over all x at once on an object array: one C-level loop per coefficient instead
    # of a Python-level loop per (x, coefficient) pair.
    xv = np.array(points, dtype=object)
    acc = np.zeros(len(points), dtype=object)
    for c in coeffs:
        acc = acc * xv + c
    return [Share(x, int(v) % PRIME) for x, v in zip(points, acc)]


def lagrange_weights_at_zero(xs: Sequence[int]) -> tuple[int, ...]:
    """Weights w_i with f(0) = sum w_i f(x_i) mod p for any polynomial of degree < len(xs)."""
    points = _check_xs(xs)
    dens = []
    num_all = 1
    for x in points:
        num_all *= x
    nums = [num_all // x for x in points]  # prod_{j != i} x_j (exact: x_i divides the product)
    for i, xi in enumerate(points):
        d = 1
        for j, xj in enumerate(points):
            if j != i:
                d *= xj - xi
        dens.append(d % PRIME)
    # Batch inversion (Montgomery's trick): one pow() for all denominators.
    prefix = [1] * (len(dens) + 1)
    for i, d in enumerate(dens):
        prefix[i + 1] = prefix[i] * d % PRIME
    inv = pow(prefix[-1], -1, PRIME)
    inv_dens = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        inv_dens[i] = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return tuple(n % PRIME * di % PRIME for n, di in zip(nums, inv_dens))


def _combine(shares: Sequence[Share], weights: Sequence[int]) -> bytes:
    acc = 0
    for s, w in zip(shares, weights):
        acc += s.y * w
    value = acc % PRIME
    # Range check only: p - 2^256 is tiny, so corrupted shares almost always still land below
    # 2^256. Callers that must detect corruption compare against a commitment (masking checks
    # recovered keys against their signed public keys / hashes).
    if value >> (8 * SECRET_SIZE):
        raise IntegrityError()
    return value.to_bytes(SECRET_SIZE, "big")


def _select(shares: Sequence[Share], threshold: int) -> list[Share]:
    if not isinstance(threshold, int) or threshold < 1:
        raise ProtocolError(f"threshold must be a positive int, got {threshold!r}")
    if any(not isinstance(s, Share) for s in shares):
        raise ProtocolError("shares must be Share objects")
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares, at least {threshold} needed")
    chosen = sorted(shares, key=lambda s: s.x)[:threshold]
    return chosen


def recover_secret(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the ``threshold`` lowest x are used)."""
    chosen = _select(shares, threshold)
    return _combine(chosen, lagrange_weights_at_zero([s.x for s in chosen]))


def recover_secrets(share_sets: Sequence[Sequence[Share]], *, threshold: int) -> list[bytes]:
    """Many secrets at once; Lagrange weights are computed once per distinct x-set."""
    cache: dict[tuple[int, ...], tuple[int, ...]] = {}
    out = []
    for shares in share_sets:
        chosen = _select(shares, threshold)
        key = tuple(s.x for s in chosen)
        if key not in cache:
            cache[key] = lagrange_weights_at_zero(key)
        out.append(_combine(chosen, cache[key]))
    return out


def split_key(key: SymmetricKey | AgreementPrivateKey, *, threshold: int, xs: Sequence[int],
              entropy: Callable[[int], bytes]) -> list[Share]:
    """Shamir-share a secret key object (for dropout recovery)."""
    if not isinstance(key, (SymmetricKey, AgreementPrivateKey)):
        raise ProtocolError("only SymmetricKey and AgreementPrivateKey can be shared")
    return split_secret(key._hazmat_bytes(), threshold=threshold, xs=xs, entropy=entropy)


def recover_symmetric_key(shares: Sequence[Share], *, threshold: int) -> SymmetricKey:
    return SymmetricKey(recover_secret(shares, threshold=threshold))


def recover_agreement_key(shares: Sequence[Share], *, threshold: int) -> AgreementPrivateKey:
    return AgreementPrivateKey._hazmat_from_bytes(recover_secret(shares, threshold=threshold))
