"""Where DP-SGD's randomness comes from: unpredictable by default, reproducible only by name.

DP-SGD's guarantee rests on the noise and the batch sampling being unknown to whoever sees the
trained model. A torch generator seeded from the run's seed is not: the seed is written in
``results.json`` (and, on Flower, chosen by the aggregator), so anyone who knows it can replay
the noise and subtract it. Two sources exist:

* :class:`SecureRandom` (the default, ``privacy.randomness: secure``): one AES-256-CTR keystream
  per trainer, keyed with 32 bytes from the operating system (:class:`primitives.prg.BulkKeystream`:
  GCM's counter layout, produced at VAES speed, twice OpenSSL's CTR mode on this CPU).
  Nothing in the run's outputs or config determines it, and two runs never share it.
* a ``torch.Generator`` (``privacy.randomness: reproducible``): the same stream Opacus draws,
  seeded from the config; for tests and experiments that must repeat bit for bit. Every output
  of such a run is marked not private.

The functions below take either source, so samplers and the trainer are written once.

Gaussian noise from :class:`SecureRandom` is Box-Muller, as torch's own ``normal_`` is, with the
radius from a 32-bit uniform in (0, 1] refined to 64 bits below 2^-25, so its tails reach 9.4
standard deviations (torch's float32 uniforms stop at 5.77: a truncation the accountant does not
model). Table-sized draws run chunk by chunk (32 Ki pairs), so each chunk's keystream and working
arrays stay in cache: 2.2-2.7 ns per value against 3.5-3.8 ns for one pass per operation over the
whole tensor and 3.3-4.5 ns for torch's seeded ``normal_`` (bench/RESULTS_dpsgd.md).
Opacus's ``secure_mode`` also sums four draws (Holohan & Braghin's defence against attacks on
the low-order bits of floating-point noise); that multiplies the cost of the largest part of a
DP step over embedding tables by four, and is not done here (the threat model says so).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from ..config import RANDOMNESS
from ..primitives.keys import SymmetricKey
from ..primitives.prg import BulkKeystream

__all__ = ["RANDOMNESS", "RandomSource", "SecureRandom", "bernoulli_indices", "describe", "gaussian_from_words",
           "indices_below", "normal_", "poisson_indices", "uniform", "GEOMETRIC_MAX_RATE", "GEOMETRIC_RATE_MARGIN"]

_TWO_PI = 2.0 * math.pi
_MASK53 = (1 << 53) - 1
# Box-Muller pairs per chunk of a large draw: 2 x 32 Ki values, so a chunk's keystream (256 KiB)
# and its float32 working arrays fit in L2 together. Measured on 6.4 M values: 2.5, 2.2, 2.3 and
# 2.4 ns per value at 2^14, 2^15, 2^16 and 2^17 pairs (per-call overhead below, cache above).
_CHUNK_PAIRS = 1 << 15
# Draws of at most this many values run as one chunk.
_ONE_PASS = 1 << 17


class SecureRandom:
    """Unpredictable randomness for one trainer: an AES-256-CTR keystream keyed from the OS.

    ``entropy`` (a ``callable(n) -> n bytes``) replaces ``os.urandom`` for known-answer tests
    only; a run never passes it.
    """

    __slots__ = ("_stream", "_pool", "_pool_at", "_scratch")

    # Small tensors (biases, MLP layers) are served from a pool of standard normals drawn in
    # bulk: a draw has a fixed cost of ~30 us that would otherwise dominate them. Every value
    # of the pool is handed out once.
    _POOL = 1 << 18
    _SMALL = 1 << 15

    def __init__(self, *, entropy: Callable[[int], bytes] | None = None) -> None:
        self._stream = BulkKeystream(SymmetricKey.generate(entropy=entropy or os.urandom))
        self._pool: torch.Tensor | None = None
        self._pool_at = 0
        self._scratch: dict[torch.dtype, np.ndarray] = {}

    def bernoulli_indices(self, n: int, p: float) -> torch.Tensor:
        """Indices in ``[0, n)`` each kept independently with probability ``p``, ascending.

        The threshold is ``floor(p * 2**32) / 2**32 <= p``: the rate used never exceeds the one
        the accountant is told.
        """
        if p >= 1.0:
            return torch.arange(n)
        return indices_below(np.frombuffer(self._stream.read(4 * n), dtype="<u4", count=n), p)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in [0, 1) with 53 random bits each."""
        words = torch.frombuffer(self._stream.read(8 * n), dtype=torch.int64, count=n)
        return words.bitwise_right_shift(11).bitwise_and_(_MASK53).to(torch.float64).mul_(2.0 ** -53)

    def normal_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Fill ``out`` (contiguous, floating) with N(0, std^2) draws; returns ``out``."""
        n = out.numel()
        if n == 0:
            return out
        if n <= self._SMALL and out.dtype == torch.float32:
            if self._pool is None or self._pool_at + n > self._POOL:
                self._pool = self._draw(torch.empty(self._POOL), 1.0)
                self._pool_at = 0
            part = self._pool[self._pool_at:self._pool_at + n]
            self._pool_at += n
            return torch.mul(part.view(out.shape), std, out=out)
        return self._draw(out, std)

    def _draw(self, out: torch.Tensor, std: float) -> torch.Tensor:
        # Chunk by chunk, so the keystream, the uniforms and the radii of a chunk are still in
        # cache when the next operation reads them: one pass over main memory (the write of
        # ``out``) instead of about ten. Whole chunks run the loop below, which is
        # gaussian_from_words on each chunk's words (a test checks they agree bit for bit) with
        # its per-call work (views, slices, checks: ~15 us, 0.2 ns per value) hoisted out.
        flat = out.view(-1)
        n = flat.numel()
        m = _CHUNK_PAIRS
        # Up to _ONE_PASS values, one pass per operation stays in L2 anyway and saves the
        # per-chunk calls (at 80 K values chunks cost 15% more).
        whole = 0 if n <= _ONE_PASS else n - n % (2 * m)
        scratch = self._scratch.get(out.dtype)
        if scratch is None:
            scratch = self._scratch[out.dtype] = np.empty(_ONE_PASS + 1, dtype=torch.empty(0, dtype=out.dtype).numpy().dtype)

        def more(k: int) -> np.ndarray:
            return np.frombuffer(self._stream.read(4 * k), dtype="<u4", count=k)
        if whole:
            u_np, angle_np = scratch[:m], scratch[m:2 * m]
            radius, angle = torch.from_numpy(u_np), torch.from_numpy(angle_np)
            k2 = 2.0 * std * std
            shift = _shift(32.0 * math.log(2.0) * k2, out.dtype)
            fdt = scratch.dtype  # the loops numpy runs (a float64 loop then a cast costs 2x)
            turn = _TWO_PI * 2.0 ** -32
            halves = flat[:whole].view(-1, m).unbind(0)
            for i in range(0, len(halves), 2):
                words = np.frombuffer(self._stream.read(8 * m), dtype="<u4", count=2 * m)
                np.add(words[:m], 1.0, out=u_np, dtype=fdt, casting="unsafe")
                np.multiply(words[m:].view(np.int32), turn, out=angle_np, dtype=fdt, casting="unsafe")
                torch.sub(shift, radius.log_(), alpha=k2, out=radius)
                if int(words[:m].min()) < _FINE:
                    _refine_radius_sq(words[:m], radius, k2, more)
                radius.clamp_(min=0.0).sqrt_()
                torch.cos(angle, out=halves[i]).mul_(radius)
                torch.mul(angle.sin_(), radius, out=halves[i + 1])
        if whole < n:
            rest = flat[whole:]
            h = (rest.numel() + 1) // 2
            words = np.frombuffer(self._stream.read(8 * h), dtype="<u4", count=2 * h)
            gaussian_from_words(words, rest, std, scratch=scratch, more=more)
        return out


def indices_below(words: np.ndarray, p: float) -> torch.Tensor:
    """hazmat: positions of the uint32 ``words`` below ``floor(p * 2**32)``: each kept with
    probability at most ``p`` (never above: the rate the accountant is told bounds the real one)."""
    return torch.from_numpy(np.flatnonzero(words < np.uint32(min(2 ** 32 - 1, math.floor(p * 2.0 ** 32)))))


_shift_cache: tuple[float, torch.dtype, torch.Tensor] | None = None
# Radius words below this get 32 more random bits (see gaussian_from_words).
_FINE = 1 << 7


def _refine_radius_sq(words: np.ndarray, sq: torch.Tensor, k2: float, more: Callable[[int], np.ndarray]) -> None:
    """Squared radii ``k2 * -ln u`` of the words below :data:`_FINE` recomputed from 64-bit
    uniforms u = (w * 2^32 + w' + 1) / 2^64, w' fresh from ``more``."""
    tiny = np.flatnonzero(words < _FINE)
    high = words[tiny].astype(np.float64) * 2.0 ** 32
    fine = high + more(tiny.size).astype(np.float64) + 1.0
    sq[torch.from_numpy(tiny)] = torch.from_numpy((np.log(fine) - 64.0 * math.log(2.0)) * -k2).to(sq.dtype)


def _shift(value: float, dtype: torch.dtype) -> torch.Tensor:
    # A 0-d tensor, so that one torch.sub computes value - k2 * log(...); building it costs
    # more than the subtraction on a chunk, and a run draws with one std.
    global _shift_cache
    cached = _shift_cache
    if cached is None or cached[0] != value or cached[1] != dtype:
        cached = _shift_cache = (value, dtype, torch.tensor(value, dtype=dtype))
    return cached[2]


def gaussian_from_words(words: np.ndarray, out: torch.Tensor, std: float, *,
                        more: Callable[[int], np.ndarray], scratch: np.ndarray | None = None) -> torch.Tensor:
    """hazmat: Box-Muller from ``2 * ceil(n / 2)`` random uint32 ``words`` into ``out`` (n values).

    ``more(k)`` supplies k fresh uint32 words for the rare small radius uniforms; ``scratch``
    (at least ``2 * ceil(n / 2)`` floats of ``out``'s dtype) is reused working memory.
    """
    flat = out.view(-1)
    n = flat.numel()
    h = (n + 1) // 2
    # Radius from the 32-bit uniform u = (w + 1) / 2^32 in (0, 1] (numpy converts uint32 to float
    # in one vectorised pass; torch has no fast unsigned path). Words below 2^7 (u <= 2^-25, once
    # in 2^25 draws) get 32 more random bits, so u resolves down to 2^-64 and the radius reaches
    # 9.4 sigma where float32 uniforms would stop (torch's own normal_ at 5.77 sigma).
    fdt = np.float32 if out.dtype == torch.float32 else np.float64
    if scratch is None or scratch.dtype != fdt or scratch.size < 2 * h:
        scratch = np.empty(2 * h, dtype=fdt)
    u = np.add(words[:h], 1.0, out=scratch[:h], dtype=fdt, casting="unsafe")
    # Angle from the other words read as int32: a uniform on [-pi, pi). Taken before `more` is
    # called, which may reuse the memory `words` lives in.
    angle = torch.from_numpy(np.multiply(words[h:2 * h].view(np.int32), _TWO_PI * 2.0 ** -32,
                                         out=scratch[h:2 * h], dtype=fdt, casting="unsafe"))
    # -2 std^2 ln u = 2 std^2 (32 ln 2 - ln(w + 1)): one log and one fused subtract.
    k2 = 2.0 * std * std
    sq = torch.from_numpy(u)
    torch.sub(_shift(32.0 * math.log(2.0) * k2, out.dtype), sq.log_(), alpha=k2, out=sq)
    if int(words[:h].min()) < _FINE:  # once in 2^25 draws
        _refine_radius_sq(words[:h], sq, k2, more)
    # u within a few ulps of 1 can give a log a hair above 32 ln 2 after float rounding, hence a
    # tiny negative square (NaN radius, then a NaN model) for some std values; the true radius
    # there is ~0.
    radius = sq.clamp_(min=0.0).sqrt_()
    torch.cos(angle, out=flat[:h]).mul_(radius)
    torch.mul(angle.sin_()[:n - h], radius[:n - h], out=flat[h:])
    return out


RandomSource = SecureRandom | torch.Generator


def bernoulli_indices(source: RandomSource, n: int, p: float) -> torch.Tensor:
    """Poisson subsampling of ``n`` units at rate ``p``: the kept indices, ascending."""
    if isinstance(source, SecureRandom):
        return source.bernoulli_indices(n, p)
    return (torch.rand(n, generator=source) < p).nonzero().flatten()


# Geometric skips beat one Bernoulli word per unit when few units are kept: ~8 random bytes and
# a log per *kept* unit instead of 4 bytes and a compare per unit.
GEOMETRIC_MAX_RATE = 1.0 / 16
# The skip sampler runs at q * (1 - margin): float64 rounding moves each inclusion probability
# by at most ~2**-52, so the rate used stays below the rate the accountant is told (q >= 1e-6).
GEOMETRIC_RATE_MARGIN = 1e-9


def poisson_indices(source: RandomSource, n: int, p: float, *, chunk: int | None = None) -> torch.Tensor:
    """Poisson subsampling of ``n`` units at rate ``p`` in O(p n) work: the kept indices, ascending.

    Each unit is kept independently with probability ``p`` (at most; see
    :data:`GEOMETRIC_RATE_MARGIN`): the gap before the next kept unit is geometric,
    ``P(gap >= k) = (1 - p)^k``, drawn by inversion ``floor(log U / log(1 - p))`` from 53-bit
    uniforms ``U`` in (0, 1]; by memorylessness the kept set has exactly the law of independent
    Bernoulli(p) trials (in real arithmetic). Above :data:`GEOMETRIC_MAX_RATE` (or for tiny
    ``n``) it draws one Bernoulli per unit (:func:`bernoulli_indices`). ``chunk`` (tests only)
    caps the gaps drawn at once, to exercise the continuation that is otherwise rare.
    """
    if p >= 1.0:
        return torch.arange(n)
    if p > GEOMETRIC_MAX_RATE or n < 64 or p < 1e-6:
        return bernoulli_indices(source, n, p)
    rate = p * (1.0 - GEOMETRIC_RATE_MARGIN)
    inv_log = 1.0 / math.log1p(-rate)
    parts: list[torch.Tensor] = []
    start = 0  # first unit not yet decided
    while start < n:
        mean = rate * (n - start)
        m = int(mean + 6.0 * math.sqrt(mean) + 16)  # enough to pass n in one go but ~1e-9 of the time
        if chunk is not None:
            m = min(m, chunk)
        u = uniform(source, m)  # [0, 1) with 53 bits: 1 - u is in (0, 1]
        gaps = torch.log(torch.neg_(u).add_(1.0)).mul_(inv_log).floor_().clamp_(max=float(n))
        pos = torch.cumsum(gaps.to(torch.int64).add_(1), 0).add_(start - 1)
        if int(pos[-1]) < n:
            parts.append(pos)
            start = int(pos[-1]) + 1
        else:
            parts.append(pos[:int(torch.searchsorted(pos, n))])
            break
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def uniform(source: RandomSource, n: int) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1)."""
    if isinstance(source, SecureRandom):
        return source.uniform(n)
    return torch.rand(n, dtype=torch.float64, generator=source)


def normal_(source: RandomSource, out: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``out`` with N(0, std^2) noise from ``source``; returns ``out``."""
    if std == 0:
        return out.zero_()
    if isinstance(source, SecureRandom):
        return source.normal_(out, std)
    return out.normal_(0.0, std, generator=source)  # Opacus's stream, for the reproducible mode


def describe(randomness: str) -> dict:
    """What a run's outputs say about its randomness (results.json ``randomness``, reports)."""
    if randomness not in RANDOMNESS:
        raise ValueError(f"unknown randomness {randomness!r}")
    if randomness == "secure":
        return {"source": "secure", "private": True,
                "note": "DP noise and batch sampling from an OS-keyed AES-256-CTR stream per trainer"}
    return {"source": "reproducible", "private": False,
            "note": "reproducible from the seed (NOT PRIVATE: anyone who knows the seed can remove "
                    "the DP noise; the reported epsilon is not a guarantee)"}
