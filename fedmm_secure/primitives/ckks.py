"""Hazmat layer over TenSEAL CKKS for an add-only workload (secure summation).

What is summed never needs a multiplication, so the modulus chain carries no multiplicative
depth: one *data* prime, which is all a ciphertext holds, plus the *special* prime SEAL needs
because TenSEAL always creates relinearisation keys (with a single prime SEAL disables key
switching and TenSEAL refuses to build the context). The defaults, N = 4096 with a 45-bit data
prime and a 60-bit special prime (105 bits), are within the HE-standard 128-bit bound for
N = 4096 (109 bits).

Why these choices (measured in ``bench/RESULTS_ckks.md``):

* A ciphertext is 2 polynomials x N coefficients x (data primes) x 8 bytes for N/2 slots, i.e.
  32 bytes (8x float32) per float *per data prime*, independent of N. TenSEAL's default chain
  [60, 40, 40, 60] keeps three data primes (~20x after compression); one data prime gives 8x
  before compression, and SEAL's zstd compression strips the unused high bits of each 64-bit
  word, so a 45-bit prime lands at ~6.7x.
* Encryption is *symmetric* (secret-key): every market holds the secret key anyway (it must
  decrypt the sum), secret-key encryption skips the public-key multiply, is ~1.5x faster and
  its fresh noise gives ~8x less error.
* Inputs are normalised to [-1, 1] by the caller's per-coordinate bound, and the scale is
  chosen from the number of summands so that the sum can never wrap modulo the data prime
  (``summands * 2**scale_bits <= 2**(data_bits - 2) < q / 2``).
* A long vector is packed into ceil(length / slots) ciphertexts held by one ``CKKSTensor``
  in batch mode, which TenSEAL encrypts on its thread pool (``n_threads``).

Secret material (:class:`CkksSecretContext`) is neither printable nor picklable, like the key
objects in :mod:`.keys`; its byte form exists only for sealing it to another market.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, IntegrityError, ProtocolError

try:  # optional dependency: the ckks backend disappears from the registry without it
    import tenseal as ts
except ImportError as exc:  # pragma: no cover - exercised only without tenseal installed
    raise ImportError("the ckks backend needs TenSEAL: pip install 'fedmm-secure[ckks]'") from exc

__all__ = [
    "CkksParameters",
    "ADD_ONLY_PARAMETERS",
    "CkksSecretContext",
    "CkksPublicContext",
    "scale_bits_for",
    "error_bound",
    "chunk_count",
]

# Largest total coefficient-modulus bit count for 128-bit classical security (HE standard,
# the table SEAL enforces as sec_level_type::tc128).
_MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MIN_SCALE_BITS = 20       # below this the fresh noise is a visible fraction of the input
_NOISE_SIGMA = 3.2         # SEAL's error distribution standard deviation
_ERROR_SIGMAS = 8.0        # bound = 8 standard deviations of the slot noise (~1e-15 per slot)


@dataclass(frozen=True)
class CkksParameters:
    """Ring dimension and modulus chain (data prime + special prime) of an add-only context."""

    poly_modulus_degree: int
    data_bits: int
    special_bits: int

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in _MAX_BITS_128:
            raise ConfigError("poly_modulus_degree", f"unsupported {self.poly_modulus_degree!r}",
                              allowed=", ".join(map(str, _MAX_BITS_128)))
        if not isinstance(self.data_bits, int) or not 30 <= self.data_bits <= 60:
            raise ConfigError("data_bits", f"must be an int in [30, 60], got {self.data_bits!r}")
        if not isinstance(self.special_bits, int) or not self.data_bits <= self.special_bits <= 60:
            raise ConfigError("special_bits", "must be an int in [data_bits, 60] "
                              f"(key switching needs it >= data_bits), got {self.special_bits!r}")
        limit = _MAX_BITS_128[self.poly_modulus_degree]
        if self.data_bits + self.special_bits > limit:
            raise ConfigError("coeff_mod_bit_sizes",
                              f"{self.data_bits}+{self.special_bits} bits exceed the 128-bit "
                              f"security bound {limit} for N={self.poly_modulus_degree}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def coeff_mod_bit_sizes(self) -> tuple[int, int]:
        return (self.data_bits, self.special_bits)

    def to_dict(self) -> dict:
        return {"scheme": "CKKS", "poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "security_bits": 128,
                "encryption": "symmetric"}


ADD_ONLY_PARAMETERS = CkksParameters(poly_modulus_degree=4096, data_bits=45, special_bits=60)


def scale_bits_for(params: CkksParameters, *, summands: int) -> int:
    """Largest scale (log2) at which a sum of ``summands`` inputs in [-1, 1] cannot wrap."""
    if not isinstance(summands, int) or summands < 1:
        raise ConfigError("summands", f"must be a positive int, got {summands!r}")
    bits = params.data_bits - 2 - math.ceil(math.log2(summands))
    if bits < _MIN_SCALE_BITS:
        raise ConfigError("data_bits", f"{params.data_bits} bits leave only {bits} bits of scale "
                          f"for {summands} summands", allowed=f">= {_MIN_SCALE_BITS} scale bits")
    return bits


def error_bound(params: CkksParameters, *, summands: int, scale_bits: int) -> float:
    """High-probability bound on |decrypted sum - true sum| per slot, for inputs in [-1, 1].

    Each summand contributes encoding rounding (variance 1/12) plus fresh encryption noise
    (variance sigma^2) in each of N coefficients; a slot's real part sees variance N/2 times
    that. The bound is 8 standard deviations of the sum's slot noise (heuristic, the usual CKKS
    analysis; the benchmarks measure the actual error).
    """
    per_coeff = _NOISE_SIGMA ** 2 + 1.0 / 12.0
    sd = math.sqrt(summands * params.poly_modulus_degree / 2 * per_coeff)
    return _ERROR_SIGMAS * sd / 2.0 ** scale_bits


def chunk_count(params: CkksParameters, length: int) -> int:
    return -(-length // params.slots)


def _batch_shape(chunks: int) -> list[int]:
    # TenSEAL 0.3.18 mis-encodes a batch tensor of shape [slots, 1] (every slot decrypts to the
    # first value), so a single chunk is encrypted as a 1-D [slots] batch (shape []).
    return [] if chunks == 1 else [chunks]


def _new_tenseal_context(params: CkksParameters, n_threads: int) -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=n_threads)
    return ctx


def _check_params(ctx: ts.Context, params: CkksParameters) -> None:
    """A context received from a peer must have exactly the agreed ring and chain."""
    sc = ctx.seal_context().data
    key, first = sc.key_context_data(), sc.first_context_data()
    if (key.parms().poly_modulus_degree() != params.poly_modulus_degree
            or key.parms().scheme().name != "CKKS"
            or key.total_coeff_modulus_bit_count() != params.data_bits + params.special_bits
            or first.total_coeff_modulus_bit_count() != params.data_bits
            or first.chain_index() != 0):
        raise IntegrityError()


def _check_threads(n_threads: int) -> int:
    if not isinstance(n_threads, int) or n_threads < 1:
        raise ConfigError("n_threads", f"must be a positive int, got {n_threads!r}")
    return n_threads


def _load_ciphertext(ctx: ts.Context, params: CkksParameters, data: bytes, *, length: int,
                     scale_bits: int) -> ts.CKKSTensor:
    """Deserialize and check a batch ciphertext: shape, scale, level and size must be exactly
    what an honest encryption of ``length`` values produces."""
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise ProtocolError("ciphertext must be non-empty bytes")
    try:
        tensor = ts.ckks_tensor_from(ctx, bytes(data))
    except (ValueError, RuntimeError, TypeError):
        raise ProtocolError("malformed ciphertext") from None
    if list(tensor.shape) != _batch_shape(chunk_count(params, length)):
        raise ProtocolError(f"ciphertext of shape {tensor.shape}, expected "
                            f"{_batch_shape(chunk_count(params, length))}")
    scale = 2.0 ** scale_bits
    if tensor.scale() != scale:
        raise ProtocolError("ciphertext has the wrong scale")
    first = ctx.seal_context().data.first_parms_id()
    for ct in tensor.ciphertext():
        if ct.size() != 2 or ct.parms_id() != first or ct.scale != scale or not ct.is_ntt_form():
            raise ProtocolError("ciphertext is not a fresh add-only ciphertext")
    return tensor


class CkksSecretContext:
    """A CKKS context holding the secret key: encrypts and decrypts. Secret material."""

    __slots__ = ("_ctx", "_params", "_n_threads")

    def __init__(self, ctx: ts.Context, params: CkksParameters, n_threads: int) -> None:
        # Built only by generate() / _hazmat_from_bytes(), which check the context.
        self._ctx, self._params, self._n_threads = ctx, params, n_threads

    @classmethod
    def generate(cls, params: CkksParameters, *, n_threads: int) -> CkksSecretContext:
        """A fresh key (SEAL draws it from the OS CSPRNG)."""
        return cls(_new_tenseal_context(params, _check_threads(n_threads)), params, n_threads)

    @property
    def params(self) -> CkksParameters:
        return self._params

    def public_context(self) -> CkksPublicContext:
        return CkksPublicContext.from_bytes(self.public_bytes(), self._params,
                                            n_threads=self._n_threads)

    def public_bytes(self) -> bytes:
        """The evaluation context for the aggregator: parameters only. No secret key, and no
        relinearisation/Galois keys (additions need none)."""
        return self._ctx.serialize(save_public_key=False, save_secret_key=False,
                                   save_galois_keys=False, save_relin_keys=False)

    def encrypt(self, values: np.ndarray, *, scale_bits: int) -> bytes:
        """Encrypt a float vector with entries in [-1, 1] into one serialized batch ciphertext."""
        return self._encrypt_tensor(values, scale_bits=scale_bits).serialize()

    def _encrypt_tensor(self, values: np.ndarray, *, scale_bits: int) -> ts.CKKSTensor:
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ProtocolError("values must be a non-empty 1-D vector")
        if not np.all(np.isfinite(v)) or np.max(np.abs(v)) > 1.0:
            raise ProtocolError("values must be finite and within [-1, 1] (normalise first)")
        slots = self._params.slots
        m = chunk_count(self._params, v.size)
        padded = np.zeros(m * slots)
        padded[:v.size] = v
        # Batch layout [slots, m]: column j is chunk j, one ciphertext per column.
        layout = padded if m == 1 else np.ascontiguousarray(padded.reshape(m, slots).T)
        plain = ts.plain_tensor(layout)
        return ts.ckks_tensor(self._ctx, plain, scale=2.0 ** scale_bits, batch=True)

    def decrypt(self, ciphertext: bytes, *, length: int, scale_bits: int) -> np.ndarray:
        tensor = _load_ciphertext(self._ctx, self._params, ciphertext, length=length,
                                  scale_bits=scale_bits)
        m = chunk_count(self._params, length)
        raw = np.asarray(tensor.decrypt().raw, dtype=np.float64)
        if raw.size != m * self._params.slots:
            raise ProtocolError("ciphertext does not hold full batches")
        return raw.reshape(self._params.slots, m).T.ravel()[:length].copy()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (secret)>"

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(f"{type(self).__name__} holds secret material and cannot be pickled")

    # hazmat: the secret-key context as bytes, only to be sealed to another market.
    def _hazmat_bytes(self) -> bytes:
        return self._ctx.serialize(save_public_key=False, save_secret_key=True,
                                   save_galois_keys=False, save_relin_keys=False)

    @classmethod
    def _hazmat_from_bytes(cls, data: bytes, params: CkksParameters, *,
                           n_threads: int) -> CkksSecretContext:
        ctx = _context_from(data, _check_threads(n_threads))
        if not ctx.is_private():
            raise IntegrityError()
        _check_params(ctx, params)
        return cls(ctx, params, n_threads)


def _context_from(data: bytes, n_threads: int) -> ts.Context:
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise IntegrityError()
    try:
        return ts.context_from(bytes(data), n_threads=n_threads)
    except (ValueError, RuntimeError, TypeError):
        raise IntegrityError() from None


class CkksPublicContext:
    """The aggregator's context: no secret key. It can check and add ciphertexts, nothing else."""

    __slots__ = ("_ctx", "_params")

    def __init__(self, ctx: ts.Context, params: CkksParameters) -> None:
        self._ctx, self._params = ctx, params

    @classmethod
    def from_bytes(cls, data: bytes, params: CkksParameters, *, n_threads: int) -> CkksPublicContext:
        """Load a public context; one that carries a secret key is refused, so an aggregator
        can never end up holding the key by a key holder's mistake."""
        ctx = _context_from(data, _check_threads(n_threads))
        if ctx.is_private():
            raise IntegrityError()
        _check_params(ctx, params)
        return cls(ctx, params)

    @property
    def params(self) -> CkksParameters:
        return self._params

    def is_private(self) -> bool:
        return self._ctx.is_private()

    def add(self, ciphertexts: Sequence[bytes], *, length: int, scale_bits: int) -> bytes:
        """Homomorphic sum of serialized batch ciphertexts (each checked first)."""
        if len(ciphertexts) == 0:
            raise ProtocolError("nothing to add")
        tensors = [_load_ciphertext(self._ctx, self._params, c, length=length,
                                    scale_bits=scale_bits) for c in ciphertexts]
        total = tensors[0]
        for t in tensors[1:]:
            total.add_(t)
        return total.serialize()

    # hazmat: the raw TenSEAL context, for tests that show it cannot decrypt.
    def _hazmat_tenseal(self) -> ts.Context:
        return self._ctx
