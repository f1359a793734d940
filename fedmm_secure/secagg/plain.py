"""``plain``: markets send their vectors in the clear and the aggregator adds them.

NOT SECURE. It exists only as the baseline that secure backends are measured against; the
registry refuses it unless it is requested by name with ``allow_insecure=True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import AbortError, ProtocolError
from .base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                   SecureAggregator, ServerRound)
from .codec import Envelope, decode_envelope, encode_envelope, expect
from .policy import MarketPolicy

__all__ = ["PlainAggregator"]

_UPLOAD, _RESULT = 0, 1


def _env(ctx: RoundContext, stage: int, sender: str, payload: bytes) -> bytes:
    return encode_envelope(Envelope("plain", stage, ctx.round_id, ctx.run_id, ctx.label, sender, payload))


def _vector(ctx: RoundContext, payload: bytes) -> np.ndarray:
    if len(payload) != 8 * ctx.length:
        raise ProtocolError(f"payload of {len(payload)} bytes, expected {8 * ctx.length}")
    v = np.frombuffer(payload, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ProtocolError("payload holds non-finite values")
    return v


class _PlainClient(ClientRound):
    def __init__(self, market: str, ctx: RoundContext, vector: np.ndarray) -> None:
        if vector.shape != (ctx.length,):
            raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
        if not np.all(np.isfinite(vector)):  # as the secure backends: NaN would poison the sum
            raise ProtocolError("input holds non-finite values")
        bounds = ctx.bounds()
        self._clipped = int(np.count_nonzero(np.abs(vector) > bounds))
        self._vector = np.clip(vector, -bounds, bounds)
        self._market, self._ctx = market, ctx
        self._stage = _UPLOAD
        self._result: np.ndarray | None = None

    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        expect(env, backend="plain", stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender="aggregator")
        if self._stage == _UPLOAD:
            self._stage = _RESULT
            return _env(self._ctx, _UPLOAD, self._market, self._vector.astype("<f8").tobytes())
        self._result = _vector(self._ctx, env.payload)
        self._stage = -1
        return None

    def report(self) -> dict:
        return {"clipped_coordinates": self._clipped, "max_abs_error_bound": 0.0}


class _PlainServer(ServerRound):
    def __init__(self, ctx: RoundContext, roster: Roster) -> None:
        self._ctx, self._roster = ctx, roster
        self._done = False
        self._sum: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()

    def start(self) -> dict[str, bytes]:
        return {m: _env(self._ctx, _UPLOAD, "aggregator", b"") for m in self._ctx.participants}

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        if self._done:
            raise ProtocolError("round already finished")
        total = np.zeros(self._ctx.length)
        got = []
        for m in sorted(replies):
            if m not in self._ctx.participants:
                raise ProtocolError(f"reply from non-participant {m!r}")
            env = decode_envelope(replies[m])
            expect(env, backend="plain", stage=_UPLOAD, round_id=self._ctx.round_id,
                   run_id=self._ctx.run_id, label=self._ctx.label, sender=m)
            total += _vector(self._ctx, env.payload)
            got.append(m)
        if not got:
            raise AbortError("no market submitted an input")
        self._sum, self._survivors, self._done = total, tuple(got), True
        payload = total.astype("<f8").tobytes()
        return {m: _env(self._ctx, _RESULT, "aggregator", payload) for m in got}

    @property
    def done(self) -> bool:
        return self._done

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._survivors

    def result(self) -> np.ndarray:
        if self._sum is None:
            raise ProtocolError("round not finished")
        return self._sum.copy()


class _PlainMarket(MarketEndpoint):
    def __init__(self, market_id: str) -> None:
        self.market_id = market_id
        self._policy: MarketPolicy | None = None

    def public_bundle(self) -> bytes:
        return b""

    def install_roster(self, roster: Roster, *, policy: MarketPolicy) -> None:
        # A market whose own policy does not name ``plain`` never sends a vector in the clear.
        policy.check_backend("plain")
        policy.check_roster(roster)
        roster.bundle(self.market_id)
        self._policy = policy

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        if self._policy is None:
            raise ProtocolError("install the roster before starting a round")
        return _PlainClient(self.market_id, ctx, np.asarray(vector, dtype=np.float64))


class _PlainAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self) -> None:
        self._roster = Roster({})

    def public_bundle(self) -> bytes:
        return b""

    def install_roster(self, roster: Roster) -> None:
        self._roster = roster

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        return _PlainServer(ctx, self._roster)


class PlainAggregator(SecureAggregator):
    name = "plain"
    secure = False

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _PlainMarket(market_id)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _PlainAggregatorEndpoint()
