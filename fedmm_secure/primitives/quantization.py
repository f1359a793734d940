"""Fixed-point encoding of bounded reals into the ring Z_2^k (k <= 32), overflow-free by design.

Every coordinate i has a known bound B_i (the DP clip norm, a count bound, an embedding-norm
bound). With n participants the largest quantized magnitude is ``qmax = floor((2^(k-1) - 1) / n)``
and the scale is ``qmax / B_i``, so a sum of any n encoded values lies in
``[-(2^(k-1) - 1), 2^(k-1) - 1]`` and decodes exactly from its centred representative: the sum
cannot wrap, whatever the inputs. Inputs outside the bound are clipped (and counted) first.

Rounding is to nearest (deterministic, error <= 0.5 / scale per value) or stochastic (unbiased,
error < 1 / scale per value; its uniforms come from a caller-supplied ``numpy.random.Generator``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError, ProtocolError

__all__ = ["Quantizer", "make_quantizer", "ROUNDING_MODES"]

ROUNDING_MODES = ("nearest", "stochastic")
_CHUNK = 1 << 15  # float64 chunk of 256 KiB stays in L2


@dataclass(frozen=True, eq=False)
class Quantizer:
    """Encoding parameters both sides derive from the round's public context."""

    ring_bits: int
    n_participants: int
    qmax: int
    scale: np.ndarray          # per-coordinate, float64
    bounds: np.ndarray         # per-coordinate clip bound, float64
    rounding: str

    @property
    def length(self) -> int:
        return int(self.scale.shape[0])

    @property
    def modulus(self) -> int:
        return 1 << self.ring_bits

    @property
    def min_scale(self) -> float:
        """The coarsest grid (largest step is 1 / min_scale) over all coordinates."""
        return float(self.scale[0] if self.scale.strides == (0,) else np.min(self.scale))

    def _unit_error(self) -> float:
        # Rounding error in grid steps, plus slack for float64 error in x * scale (relative
        # 2^-53 of at most qmax < 2^31 steps, i.e. < 2^-22 steps) and in the final division.
        return (0.5 if self.rounding == "nearest" else 1.0) + 2.0 ** -20

    def per_value_error(self) -> np.ndarray:
        """Max |x_clipped - dequantize(quantize(x))| per coordinate for one value."""
        return self._unit_error() / self.scale

    def max_abs_error_bound(self, n_summed: int | None = None) -> float:
        """Bound on |sum of clipped inputs - decoded sum| over all coordinates, for a sum of
        ``n_summed`` (default: all participants) values."""
        m = self.n_participants if n_summed is None else int(n_summed)
        return m * self._unit_error() / self.min_scale

    def quantize(self, x: np.ndarray, *, rng: np.random.Generator | None = None,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Encode ``x`` into ring elements (uint32); returns ``(encoded, clipped_count)``.

        Runs in cache-sized chunks (one pass over main memory instead of one per operation);
        ``out`` may be a preallocated uint32 vector to write into. A float32 ``x`` is read as
        it is (each value widened to float64 inside the arithmetic, exactly as converting it
        first would), so it costs no float64 copy of the input.
        """
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.length,):
            raise ProtocolError(f"input of shape {x.shape}, expected ({self.length},)")
        if self.rounding == "stochastic" and not isinstance(rng, np.random.Generator):
            raise ConfigError("rng", "stochastic rounding needs a numpy Generator passed in")
        if out is None:
            out = np.empty(self.length, dtype=np.uint32)
        elif out.shape != (self.length,) or out.dtype != np.uint32:
            raise ProtocolError("out must be a uint32 vector of the quantizer's length")
        uniform = self.scale.strides == (0,)
        nearest = self.rounding == "nearest"
        limit = float(self.qmax)
        n = self.length
        chunk = min(_CHUNK, n)
        buf = np.empty(chunk)
        absbuf = np.empty(chunk)
        flags = np.empty(chunk, dtype=bool)
        signed = out.view(np.int32)  # |q| <= qmax < 2^31: int32 two's complement == value mod 2^32
        clipped = 0
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            m = stop - start
            xs, b, a, f = x[start:stop], buf[:m], absbuf[:m], flags[:m]
            if uniform:
                # min and max propagate NaN and show +-inf: two read-only reductions prove the
                # chunk finite and, in the common case (nothing beyond the bound), that nothing
                # needs counting or clipping, which saves four passes over the chunk.
                lo, hi = np.minimum.reduce(xs), np.maximum.reduce(xs)
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    raise DataError("input holds non-finite values")
                bound = self.bounds[0]
                outside = bool(lo < -bound or hi > bound)
                if outside:
                    np.abs(xs, out=a)
                    np.greater(a, bound, out=f)
                np.multiply(xs, self.scale[0], out=b, dtype=np.float64)
            else:
                np.abs(xs, out=a)
                if not np.isfinite(np.maximum.reduce(a)):   # NaN propagates through max
                    raise DataError("input holds non-finite values")
                np.greater(a, self.bounds[start:stop], out=f)
                np.multiply(xs, self.scale[start:stop], out=b, dtype=np.float64)
                outside = True
            if outside:
                count = int(np.count_nonzero(f))
                clipped += count
                outside = count > 0
            dst = signed[start:stop]
            if nearest:
                # Clip only a chunk holding out-of-bound values. Within the bound, |x * scale| <=
                # fl(B * fl(qmax / B)) <= qmax (1 + 2^-53)^2 < qmax + 1/2, so rounding alone lands
                # in [-qmax, qmax]: what clipping first would give, bit for bit.
                if outside:
                    np.clip(b, -limit, limit, out=b)
                # Round and convert in one call (the rounded values are integers in int32 range).
                np.rint(b, out=dst, casting="unsafe")
            else:
                np.clip(b, -limit, limit, out=b)
                b += rng.random(m)
                np.floor(b, out=b)
                # floor(qmax + u) exceeds qmax only through float noise; keep the invariant
                # (clipped and converted in one call: the floored values are integers).
                np.clip(b, -limit, limit, out=dst, casting="unsafe")
        if self.ring_bits < 32:
            out &= np.uint32(self.modulus - 1)
        return out, clipped

    def dequantize_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """Decode a ring sum of at most ``n_participants`` encoded values to float64."""
        s = np.asarray(ring_sum)
        if s.shape != (self.length,) or s.dtype != np.uint32:
            raise ProtocolError("ring sum must be a uint32 vector of the quantizer's length")
        out = np.empty(self.length, dtype=np.float64)
        self.dequantize_into(s, out, start=0)
        return out

    def dequantize_into(self, ring_part: np.ndarray, out: np.ndarray, *, start: int) -> None:
        """Decode coordinates ``start .. start + len(ring_part)`` of a ring sum into ``out``.

        Bit-identical to :meth:`dequantize_sum` on the whole vector; lets a caller decode a
        megabyte sum chunk by chunk while each chunk is still in cache (the market hashes the
        RESULT message in the same pass).
        """
        stop = start + ring_part.shape[0]
        if ring_part.ndim != 1 or ring_part.dtype != np.uint32 or out.shape != ring_part.shape \
                or not 0 <= start <= stop <= self.length:
            raise ProtocolError("ring sum chunk does not fit the quantizer's length")
        scale = self.scale[0] if self.scale.strides == (0,) else self.scale[start:stop]
        if self.ring_bits == 32:
            # Centred representative: the int32 reinterpretation of the uint32 sum, converted
            # and divided in one pass (exact int -> float64, then one IEEE division).
            np.divide(ring_part.view(np.int32), scale, out=out)
        else:
            v = (ring_part & np.uint32(self.modulus - 1)).astype(np.int64)
            v[v >= self.modulus // 2] -= self.modulus
            np.divide(v, scale, out=out)


def make_quantizer(*, bounds: float | np.ndarray, length: int, n_participants: int,
                   ring_bits: int = 32, rounding: str = "nearest",
                   max_error: float | None = None) -> Quantizer:
    """Parameters such that ``n_participants`` values of magnitude <= ``bounds`` sum without
    wrapping in Z_2^ring_bits. ``max_error`` (optional) is the largest acceptable error of the
    decoded *sum*; if the ring cannot give that precision a :class:`ConfigError` says so."""
    if not isinstance(ring_bits, int) or not 2 <= ring_bits <= 32:
        raise ConfigError("ring_bits", f"got {ring_bits!r}", allowed="an int in [2, 32]")
    if not isinstance(n_participants, int) or n_participants < 1:
        raise ConfigError("n_participants", f"must be a positive int, got {n_participants!r}")
    if rounding not in ROUNDING_MODES:
        raise ConfigError("rounding", f"got {rounding!r}", allowed=", ".join(ROUNDING_MODES))
    if not isinstance(length, int) or length < 1:
        raise ConfigError("length", f"must be a positive int, got {length!r}")
    b = np.asarray(bounds, dtype=np.float64)
    if b.ndim not in (0, 1) or (b.ndim == 1 and b.shape[0] != length):
        raise ConfigError("bounds", "must be a scalar or one bound per coordinate")
    if not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise ConfigError("bounds", "must be finite and > 0")
    qmax = ((1 << (ring_bits - 1)) - 1) // n_participants
    if qmax < 1:
        raise ConfigError("ring_bits", f"a {ring_bits}-bit ring cannot hold a sum of "
                          f"{n_participants} values", allowed="more ring bits or fewer participants")
    # A scalar bound stays a stride-0 view: no per-round allocation of `length` floats.
    scale = np.broadcast_to(np.asarray(qmax / b, dtype=np.float64), (length,))
    full = np.broadcast_to(b, (length,))
    if b.ndim == 1:
        scale, full = scale.copy(), full.copy()
        scale.setflags(write=False)
        full.setflags(write=False)
    q = Quantizer(ring_bits, n_participants, qmax, scale, full, rounding)
    if max_error is not None and q.max_abs_error_bound() > max_error:
        raise ConfigError("max_error", f"a {ring_bits}-bit ring with {n_participants} participants "
                          f"gives at best {q.max_abs_error_bound():.3g} for bound(s) up to "
                          f"{float(np.max(b)):.3g}", allowed="a larger error, smaller bounds or "
                          "more ring bits")
    return q
