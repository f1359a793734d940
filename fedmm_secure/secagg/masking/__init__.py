"""``masking``: pairwise-mask secure summation (Bonawitz et al., CCS'17) with dropout recovery,
hardened against an active aggregator.

One round, driven by the aggregator (stage numbers are the envelope's ``stage`` field and the
driver's ``drop_at`` indices):

0. NONCE         market u checks the round against its own policy (pinned roster, minimum cohort,
                 threshold rule 2t > n + c) and sends a fresh 32-byte nonce.
1. ADVERTISE     u checks that its own nonce came back unchanged; from here on every message is
                 bound to the session *and every nonce*, so nothing from another execution of an
                 identical round verifies (a forged peer nonce makes that peer's advertisement
                 fail at SHARE_KEYS, so the nonce signatures need no check of their own). u draws fresh X25519 keys c_u (share
                 encryption) and s_u (mask seeds) and signs both public keys.
2. SHARE_KEYS    u checks every advertisement's signature, draws a self-mask seed b_u, Shamir-
                 shares b_u and the private scalar of s_u t-of-n, and sends peer v its two
                 shares AES-GCM-sealed under HKDF(X25519(c_u, c_v)); the aggregator only relays.
                 u commits to b_u and to every share it dealt (SHA-256, in its signed message),
                 so the aggregator can skip a corrupt revealed share instead of aborting.
3. MASKED_INPUT  u opens the shares addressed to it and uploads
                 y_u = q(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
                 in Z_2^k, 4 bytes per coordinate; s_uv = HKDF(X25519(s_u, s_v)) with a context
                 naming the session and the pair, PRG = AES-256-CTR.
4. CONSISTENCY   the aggregator announces U3 (who uploaded); each u signs U3.
5. UNMASK        the aggregator forwards the U3 signatures and asks, explicitly, for b-shares of
                 U3 and s-shares of U2 \\ U3. u checks that at least max(t, min cohort) markets
                 signed the same U3 and that the request is exactly that split; it never reveals
                 both shares of one peer (that would unmask the peer's input).
6. RESULT        the aggregator rebuilds the missing seeds from any t committed shares, removes
                 every mask, and sends U3, the recipients R and the ring sum; each u decodes the
                 sum but keeps it, and confirms the digest of the RESULT message: signed, to the
                 aggregator, and with an HMAC tag under a pair key to every other market in R.
7. AGREE         the aggregator forwards every confirmation; u releases the sum only if every
                 market in R tagged the very same RESULT message to u.

Every message, the aggregator's included, is an envelope (:mod:`..codec`) whose payload is
``session | body | signature``: Ed25519 (the sender's roster key) over the domain tag and the
BLAKE3 digest of every envelope byte before it (hash-then-sign: one fast pass over a megabyte
upload instead of Ed25519's two SHA-512 passes). The session digest covers run, round, label,
participants, length, bounds, threshold, ring, the pinned roster and, after NONCE, every nonce.
Fewer than t markets at any stage aborts the round (:class:`AbortError`), fewer than a market's
minimum cohort makes that market refuse (:class:`PolicyError`), and nothing is released.
Invalid messages raise :class:`ProtocolError` / :class:`IntegrityError` before any state changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ...errors import ConfigError, PolicyError, ProtocolError
from ...primitives.keys import IdentityPrivateKey, IdentityPublicKey
from ...primitives.quantization import ROUNDING_MODES, Quantizer, make_quantizer
from ..base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                    SecureAggregator, ServerRound)
from ..policy import DEFAULT_COLLUDERS, MarketPolicy
from ..registry import register_backend
from .client import MaskingClient
from .server import MaskingServer
from .wire import (ADVERTISE, AGREE, BACKEND, CONSISTENCY, MASKED_INPUT, NONCE, RESULT, SHARE_KEYS,
                   UNMASK, Entropy, default_threshold)

__all__ = ["MaskingAggregator", "default_threshold", "NONCE", "ADVERTISE", "SHARE_KEYS",
           "MASKED_INPUT", "CONSISTENCY", "UNMASK", "RESULT", "AGREE"]


class _Options:
    def __init__(self, threshold: int | None, ring_bits: int, rounding: str, entropy: Entropy,
                 max_error: float | None, colluders: int) -> None:
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
        if not isinstance(colluders, int) or isinstance(colluders, bool) or colluders < 0:
            raise ConfigError("colluders", f"got {colluders!r}", allowed="an int >= 0")
        self.colluders = colluders

    def for_round(self, ctx: RoundContext) -> tuple[int, Quantizer]:
        n = len(ctx.participants)
        t = (default_threshold(n, colluders=self.colluders) if self.threshold is None
             else self.threshold)
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
        self._aggregator: IdentityPublicKey | None = None
        self._policy: MarketPolicy | None = None

    def public_bundle(self) -> bytes:
        return self._identity.public_key().to_bytes()

    def install_roster(self, roster: Roster, *, policy: MarketPolicy) -> None:
        policy.check_backend(BACKEND)
        policy.check_roster(roster)
        keys = _roster_keys(roster)
        if keys.get(self.market_id) != self._identity.public_key():
            raise ProtocolError(f"the roster does not hold {self.market_id!r}'s identity key")
        if not roster.aggregator:
            raise PolicyError("the roster names no aggregator key; its messages cannot be checked")
        self._keys, self._policy = keys, policy
        self._aggregator = IdentityPublicKey.from_bytes(roster.aggregator)

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        _check_round(ctx, self._keys)
        self._policy.check_cohort(ctx.participants, "round")  # before any option is looked at
        t, q = self._options.for_round(ctx)
        # float32 stays float32: the quantizer reads it without a float64 copy of the input.
        v = np.asarray(vector)
        if v.dtype != np.float32:
            v = np.asarray(v, dtype=np.float64)
        return MaskingClient(self.market_id, ctx, v,
                             identity=self._identity, keys=self._keys,
                             aggregator_key=self._aggregator, policy=self._policy, threshold=t,
                             quantizer=q, entropy=self._options.entropy)


class _MaskingAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, options: _Options) -> None:
        self._options = options
        self._identity = IdentityPrivateKey.generate(entropy=options.entropy)
        self._keys: dict[str, IdentityPublicKey] = {}
        self._roster_digest = b""

    def public_bundle(self) -> bytes:
        return self._identity.public_key().to_bytes()

    def install_roster(self, roster: Roster) -> None:
        keys = _roster_keys(roster)
        if roster.aggregator != self.public_bundle():
            raise ProtocolError("the roster holds another aggregator key")
        self._keys, self._roster_digest = keys, roster.digest()

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        _check_round(ctx, self._keys)
        t, q = self._options.for_round(ctx)
        return MaskingServer(ctx, self._keys, identity=self._identity,
                             roster_digest=self._roster_digest, threshold=t, quantizer=q)


class MaskingAggregator(SecureAggregator):
    """Pairwise-mask secure summation with t-of-n dropout recovery.

    ``threshold``: shares needed to rebuild a seed (default :func:`default_threshold`; must
    satisfy n/2 < t <= n, and every market checks 2t > n + c against its own policy).
    ``colluders``: the c the default threshold is sized for. ``ring_bits``: the ring Z_2^k the
    sum lives in (8..32; uploads are 4 bytes per coordinate). ``rounding``: ``"nearest"`` or
    ``"stochastic"``. ``entropy``: randomness source for every key, seed, share and nonce
    (default ``os.urandom``). ``max_error``: optional ceiling on the decoded sum's quantization
    error, checked when a round starts.
    """

    name = "masking"
    secure = True

    def __init__(self, *, threshold: int | None = None, ring_bits: int = 32,
                 rounding: str = "nearest", entropy: Entropy = os.urandom,
                 max_error: float | None = None, colluders: int = DEFAULT_COLLUDERS) -> None:
        self._options = _Options(threshold, ring_bits, rounding, entropy, max_error, colluders)

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _MaskingMarket(market_id, self._options)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _MaskingAggregatorEndpoint(self._options)


register_backend("masking", MaskingAggregator)
