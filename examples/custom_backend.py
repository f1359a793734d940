"""A secure-aggregation backend of your own, registered and checked against the backend contract.

``toymask`` is textbook pairwise masking (Bonawitz et al., without dropout recovery): every pair
of markets agrees on a key by X25519 over the public roster, each market adds the masks it
shares with higher-numbered peers and subtracts those it shares with lower-numbered ones, so
masks cancel in the sum and the aggregator sees only uniformly random ring elements per market.
A market that drops out aborts the round (the built-in ``masking`` backend recovers instead).
It is an illustration of the interface, not a replacement for ``masking``.

    python examples/custom_backend.py            # contract suite + a sum of 5 markets
    python examples/custom_backend.py --small    # what the test suite runs
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

import fedmm_secure as fm
from fedmm_secure.errors import AbortError, ProtocolError
from fedmm_secure.secagg import (AggregatorEndpoint, ClientRound, MarketEndpoint, MarketPolicy, RoundContext,
                                 Roster, ServerRound, run_round)

_MAGIC = b"TMK1"
_START, _UPLOAD, _RESULT = 0, 1, 2


def _scale(ctx: RoundContext) -> float:
    # Fixed point in Z_2^64: the sum of n clipped inputs stays below 2^62 in magnitude, so it
    # never wraps; the scale is a power of two so encoding is exact up to rounding.
    top = len(ctx.participants) * float(np.max(ctx.bounds()))
    return float(2.0 ** min(40, int(np.floor(np.log2(2.0 ** 62 / top)))))


def _message(ctx: RoundContext, stage: int, sender: str, payload: bytes = b"") -> bytes:
    head = json.dumps([ctx.run_id, ctx.round_id, ctx.label, sender]).encode()
    return _MAGIC + struct.pack(">BI", stage, len(head)) + head + payload


def _parse(ctx: RoundContext, message: bytes, *, stage: int, sender: str) -> bytes:
    try:
        if message[:4] != _MAGIC:
            raise ValueError("bad magic")
        got, n = struct.unpack(">BI", message[4:9])
        head = json.loads(message[9:9 + n])
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed toymask message ({exc})") from None
    if got != stage or head != [ctx.run_id, ctx.round_id, ctx.label, sender]:
        raise ProtocolError(f"unexpected toymask message (stage {got}, {head})")
    return message[9 + n:]


def _ring(payload: bytes, length: int) -> np.ndarray:
    if len(payload) != 8 * length:
        raise ProtocolError(f"payload of {len(payload)} bytes, expected {8 * length}")
    return np.frombuffer(payload, dtype="<u8").copy()


def _decode(total: np.ndarray, scale: float) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / scale


class _Client(ClientRound):
    def __init__(self, me: str, key: X25519PrivateKey, peers: Mapping[str, X25519PublicKey],
                 ctx: RoundContext, vector: np.ndarray) -> None:
        if vector.shape != (ctx.length,):
            raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
        if not np.all(np.isfinite(vector)):
            raise ProtocolError("input holds non-finite values")
        bounds = ctx.bounds()
        self._clipped = int(np.count_nonzero(np.abs(vector) > bounds))
        fixed = np.rint(np.clip(vector, -bounds, bounds) * _scale(ctx)).astype(np.int64).view(np.uint64)
        for peer in ctx.participants:
            if peer == me:
                continue
            # Same mask on both sides of the pair: a PRG keyed by their X25519 secret and the round.
            secret = key.exchange(peers[peer])
            label = json.dumps([ctx.run_id, ctx.round_id, ctx.label, sorted([me, peer])]).encode()
            mask = np.frombuffer(hashlib.shake_256(secret + label).digest(8 * ctx.length), dtype="<u8")
            fixed = fixed + mask if me < peer else fixed - mask   # uint64 arithmetic wraps mod 2^64
        self._upload = fixed.astype("<u8").tobytes()
        self._me, self._ctx, self._stage = me, ctx, _START

    def handle(self, message: bytes) -> bytes | None:
        if self._stage == _START:
            _parse(self._ctx, message, stage=_START, sender="aggregator")
            self._stage = _RESULT
            return _message(self._ctx, _UPLOAD, self._me, self._upload)
        if self._stage == _RESULT:
            payload = _parse(self._ctx, message, stage=_RESULT, sender="aggregator")
            self._result = _decode(_ring(payload, self._ctx.length), _scale(self._ctx))
            self._stage = -1
            return None
        raise ProtocolError("round already finished")

    def report(self) -> dict:
        # Each input is rounded to the nearest multiple of 1/scale: n half-steps at most.
        return {"clipped_coordinates": self._clipped,
                "max_abs_error_bound": 0.5 * len(self._ctx.participants) / _scale(self._ctx)}


class _Server(ServerRound):
    def __init__(self, ctx: RoundContext) -> None:
        self._ctx, self._done, self._total = ctx, False, None

    def start(self) -> dict[str, bytes]:
        return {m: _message(self._ctx, _START, "aggregator") for m in self._ctx.participants}

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        if self._done:
            raise ProtocolError("round already finished")
        missing = set(self._ctx.participants) - set(replies)
        if missing:  # no dropout recovery: the missing markets' masks would not cancel
            raise AbortError(f"toymask cannot finish without {sorted(missing)}")
        total = np.zeros(self._ctx.length, dtype=np.uint64)
        for m in self._ctx.participants:
            total = total + _ring(_parse(self._ctx, replies[m], stage=_UPLOAD, sender=m), self._ctx.length)
        self._total, self._done = total, True
        payload = total.astype("<u8").tobytes()
        return {m: _message(self._ctx, _RESULT, "aggregator", payload) for m in self._ctx.participants}

    @property
    def done(self) -> bool:
        return self._done

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(self._ctx.participants)

    def result(self) -> np.ndarray:
        if self._total is None:
            raise ProtocolError("round not finished")
        return _decode(self._total, _scale(self._ctx))


class _Market(MarketEndpoint):
    def __init__(self, market_id: str) -> None:
        self.market_id = market_id
        self._key = X25519PrivateKey.generate()   # long-term secret: never leaves the market
        self._peers: dict[str, X25519PublicKey] = {}

    def public_bundle(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def install_roster(self, roster: Roster, *, policy: MarketPolicy) -> None:
        # The market's own policy pins the roster; a real backend also checks every round and
        # stage against it (minimum cohort, threshold), as the built-in ones do.
        policy.check_roster(roster)
        policy.check_backend(ToyMaskAggregator.name)
        self._policy = policy
        self._peers = {m: X25519PublicKey.from_public_bytes(roster.bundle(m)) for m in roster.markets}

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants or not set(ctx.participants) <= set(self._peers):
            raise ProtocolError("participants must be on the installed roster, this market among them")
        self._policy.check_cohort(ctx.participants, "round")
        return _Client(self.market_id, self._key, self._peers, ctx, np.asarray(vector, dtype=np.float64))


class _Aggregator(AggregatorEndpoint):
    def __init__(self) -> None:
        self._roster = Roster({})

    def public_bundle(self) -> bytes:
        return b""   # this toy aggregator signs nothing: the roster's aggregator entry stays empty

    def install_roster(self, roster: Roster) -> None:
        self._roster = roster

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        return _Server(ctx)


class ToyMaskAggregator(fm.SecureAggregator):
    """Pairwise masking without dropout recovery (the example's backend)."""

    name = "toymask"
    secure = True   # against an honest-but-curious aggregator, while every market stays online

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _Market(market_id)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _Aggregator()


fm.register_backend("toymask", ToyMaskAggregator)


def main(small: bool = False) -> dict:
    fm.check_backend("toymask")   # the contract every registered backend must pass
    ids = [f"market{i}" for i in range(3 if small else 5)]
    backend = fm.create_backend("toymask", allow_insecure=False)
    markets = {m: backend.create_market(m) for m in ids}
    aggregator = backend.create_aggregator()
    roster = Roster({m: e.public_bundle() for m, e in markets.items()}, aggregator=aggregator.public_bundle())
    policy = MarketPolicy.pin(roster, backends={"toymask"}, privacy={}, min_cohort=len(ids))
    for e in markets.values():
        e.install_roster(roster, policy=policy)
    aggregator.install_roster(roster)
    rng = np.random.default_rng(0)
    vectors = {m: rng.uniform(-1, 1, 1000) for m in ids}
    ctx = RoundContext(run_id="demo", round_id=0, participants=tuple(ids), length=1000, max_abs=1.0)
    seen: list[bytes] = []
    out = run_round(aggregator, markets, ctx, vectors, recorder=lambda m, stage, b: seen.append(b))
    error = float(np.max(np.abs(out.results[ids[0]] - sum(vectors.values()))))
    summary = {"backend": "toymask", "markets": len(ids), "max_abs_error": error,
               "stated_bound": out.reports[ids[0]]["max_abs_error_bound"],
               "bytes_up_per_market": out.bytes_up[ids[0]], "contract": "passed"}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(small="--small" in sys.argv)
