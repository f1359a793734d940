"""``masking``: pairwise-mask secure summation (Bonawitz et al., CCS'17) with dropout recovery.

One round, driven by the aggregator (stage numbers are the envelope's ``stage`` field and the
driver's ``drop_at`` indices):

0. ADVERTISE     market u draws fresh X25519 keys c_u (share encryption) and s_u (mask seeds)
                 and signs both public keys with its long-term Ed25519 identity (the roster).
1. SHARE_KEYS    u checks every advertisement's signature, draws a self-mask seed b_u, Shamir-
                 shares b_u and the private scalar of s_u t-of-n, and sends peer v its two
                 shares AES-GCM-sealed under HKDF(X25519(c_u, c_v)); the aggregator only relays.
                 u also commits to b_u (SHA-256) so a corrupted reconstruction is detected.
2. MASKED_INPUT  u opens the shares addressed to it and uploads
                 y_u = q(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
                 in Z_2^k, 4 bytes per coordinate; s_uv = HKDF(X25519(s_u, s_v)) with a context
                 naming the session and the pair, PRG = AES-256-CTR.
3. CONSISTENCY   the aggregator announces U3 (who uploaded); each u signs U3.
4. UNMASK        the aggregator forwards the U3 signatures and asks, explicitly, for b-shares of
                 U3 and s-shares of U2 \\ U3. u checks that at least t markets signed the same U3
                 and that the request is exactly that split; it never reveals both shares of
                 one peer (that would unmask the peer's input).
5. RESULT        the aggregator rebuilds the missing seeds, removes every mask, and sends the ring
                 sum and U3 to the markets that answered; each decodes the float64 sum.

Every market message is an envelope (:mod:`..codec`) whose payload ends with an Ed25519
signature over the domain tag and the SHA-256 digest of every envelope byte before it
(hash-then-sign: one fast pass over a megabyte upload instead of Ed25519's two SHA-512 passes,
the same layout as the ``ckks`` backend); every payload starts with a digest of the session (run,
round, label, participants, length, bounds, threshold, ring), so nothing can be replayed into
another round, stage or configuration. Fewer than t markets at any stage aborts the round
(:class:`AbortError`) and nothing is released. Invalid messages raise :class:`ProtocolError` /
:class:`IntegrityError` before any state changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ...errors import ConfigError, ProtocolError
from ...primitives.keys import IdentityPrivateKey, IdentityPublicKey
from ...primitives.quantization import ROUNDING_MODES, Quantizer, make_quantizer
from ..base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                    SecureAggregator, ServerRound)
from ..registry import register_backend
from .client import MaskingClient
from .server import MaskingServer
from .wire import (ADVERTISE, CONSISTENCY, MASKED_INPUT, RESULT, SHARE_KEYS, UNMASK, Entropy,
                   default_threshold)

__all__ = ["MaskingAggregator", "default_threshold", "ADVERTISE", "SHARE_KEYS", "MASKED_INPUT",
           "CONSISTENCY", "UNMASK", "RESULT"]


class _Options:
    def __init__(self, threshold: int | None, ring_bits: int, rounding: str, entropy: Entropy,
                 max_error: float | None) -> None:
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ConfigError("threshold", f"got {threshold!r}", allowed="a positive int or None")
        if not isinstance(ring_bits, int) or not 8 <= ring_bits <= 32:
            raise ConfigError("ring_bits", f"got {ring_bits!r}", allowed="an int in [8, 32]")
        if rounding not in ROUNDING_MODES:
            raise ConfigError("rounding", f"got {rounding!r}", allowed=", ".join(ROUNDING_MODES))
        if not callable(entropy):
            raise ConfigError("entropy", "must be a callable n -> n random bytes")
        self.threshold, self.ring_bits, self.rounding = threshold, ring_bits, rounding
        self.entropy, self.max_error = entropy, max_error

    def for_round(self, ctx: RoundContext) -> tuple[int, Quantizer]:
        n = len(ctx.participants)
        t = default_threshold(n) if self.threshold is None else self.threshold
        if not (n / 2 < t <= n):
            raise ConfigError("threshold", f"{t} with {n} participants",
                              allowed=f"n/2 < t <= n, i.e. {n // 2 + 1}..{n}")
        q = make_quantizer(bounds=ctx.max_abs, length=ctx.length, n_participants=n,
                           ring_bits=self.ring_bits, rounding=self.rounding,
                           max_error=self.max_error)
        return t, q


def _roster_keys(roster: Roster) -> dict[str, IdentityPublicKey]:
    if not isinstance(roster, Roster):
        raise ProtocolError("roster must be a Roster")
    return {m: IdentityPublicKey.from_bytes(roster.bundle(m)) for m in roster.markets}


def _check_round(ctx: RoundContext, keys: Mapping[str, IdentityPublicKey]) -> None:
    if not keys:
        raise ProtocolError("install the roster before starting a round")
    missing = [m for m in ctx.participants if m not in keys]
    if missing:
        raise ProtocolError(f"participants not on the roster: {missing}")


class _MaskingMarket(MarketEndpoint):
    def __init__(self, market_id: str, options: _Options) -> None:
        self.market_id = market_id
        self._options = options
        self._identity = IdentityPrivateKey.generate(entropy=options.entropy)
        self._keys: dict[str, IdentityPublicKey] = {}

    def public_bundle(self) -> bytes:
        return self._identity.public_key().to_bytes()

    def install_roster(self, roster: Roster) -> None:
        keys = _roster_keys(roster)
        if keys.get(self.market_id) != self._identity.public_key():
            raise ProtocolError(f"the roster does not hold {self.market_id!r}'s identity key")
        self._keys = keys

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        _check_round(ctx, self._keys)
        t, q = self._options.for_round(ctx)
        return MaskingClient(self.market_id, ctx, np.asarray(vector, dtype=np.float64),
                              identity=self._identity, keys=self._keys, threshold=t, quantizer=q,
                              entropy=self._options.entropy)


class _MaskingAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, options: _Options) -> None:
        self._options = options
        self._keys: dict[str, IdentityPublicKey] = {}

    def install_roster(self, roster: Roster) -> None:
        self._keys = _roster_keys(roster)

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        _check_round(ctx, self._keys)
        t, q = self._options.for_round(ctx)
        return MaskingServer(ctx, self._keys, threshold=t, quantizer=q)


class MaskingAggregator(SecureAggregator):
    """Pairwise-mask secure summation with t-of-n dropout recovery.

    ``threshold``: shares needed to rebuild a seed (default ``n - n // 3``; must satisfy
    n/2 < t <= n). ``ring_bits``: the ring Z_2^k the sum lives in (8..32; uploads are 4 bytes per
    coordinate). ``rounding``: ``"nearest"`` or ``"stochastic"``. ``entropy``: randomness source
    for every key, seed, share and nonce (default ``os.urandom``). ``max_error``: optional
    ceiling on the decoded sum's quantization error, checked when a round starts.
    """

    name = "masking"
    secure = True

    def __init__(self, *, threshold: int | None = None, ring_bits: int = 32,
                 rounding: str = "nearest", entropy: Entropy = os.urandom,
                 max_error: float | None = None) -> None:
        self._options = _Options(threshold, ring_bits, rounding, entropy, max_error)

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _MaskingMarket(market_id, self._options)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _MaskingAggregatorEndpoint(self._options)


register_backend("masking", MaskingAggregator)
