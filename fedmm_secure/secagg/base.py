"""The secure-aggregation interface the federation code talks to.

A backend is a factory for two kinds of endpoint: one :class:`MarketEndpoint` per market (holding
that market's long-term secrets) and one :class:`AggregatorEndpoint` (holding public material
only). For every summation both sides open a *round*: a small state machine that exchanges opaque
byte messages. The federation code never looks inside the bytes and never learns which backend
runs; :func:`fedmm_secure.secagg.driver.run_round` moves the bytes around in the embedded runtime,
and a network runtime moves exactly the same bytes.

Rounds are multi-stage: the aggregator's round emits one message per market, markets answer, and
so on until the aggregator's round reports ``done``; the last messages it emits carry the result
(the sum itself for masking and plain, the encrypted sum for CKKS) and markets answer them with
``None``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, ProtocolError
from .policy import MarketPolicy

__all__ = [
    "RoundContext",
    "Roster",
    "ClientRound",
    "ServerRound",
    "MarketEndpoint",
    "AggregatorEndpoint",
    "SecureAggregator",
    "check_id",
]

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(kind: str, value: str) -> None:
    """:class:`ConfigError` unless ``value`` is a market / run / label identifier."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigError(kind, f"invalid identifier {value!r}", allowed="1-64 chars of [A-Za-z0-9_.-]")


@dataclass(frozen=True)
class RoundContext:
    """What both sides agree on before a round starts.

    ``max_abs`` bounds every coordinate of every market's input (a scalar, or one bound per
    coordinate). Backends that quantize derive their clip range and ring size from it and the
    number of participants so that the sum can never wrap; inputs outside the bound are clipped
    and the clipping is reported by the market's round.
    """

    run_id: str
    round_id: int
    participants: tuple[str, ...]
    length: int
    max_abs: float | np.ndarray
    label: str = "update"  # what is summed ("codebook-stats", "code-embeddings", ...), bound into transcripts

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        check_id("label", self.label)
        if not isinstance(self.round_id, int) or self.round_id < 0:
            raise ConfigError("round_id", f"must be a non-negative int, got {self.round_id!r}")
        if len(self.participants) < 1:
            raise ConfigError("participants", "at least one participant is required")
        if len(set(self.participants)) != len(self.participants):
            raise ConfigError("participants", "duplicate market ids")
        for p in self.participants:
            check_id("participants", p)
        if tuple(sorted(self.participants)) != tuple(self.participants):
            object.__setattr__(self, "participants", tuple(sorted(self.participants)))
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError("length", f"must be a positive int, got {self.length!r}")
        bound = np.asarray(self.max_abs, dtype=np.float64)
        if bound.ndim not in (0, 1) or (bound.ndim == 1 and bound.shape[0] != self.length):
            raise ConfigError("max_abs", "must be a scalar or one bound per coordinate")
        if not np.all(np.isfinite(bound)) or np.any(bound <= 0):
            raise ConfigError("max_abs", "bounds must be finite and > 0")

    def bounds(self) -> np.ndarray:
        """Per-coordinate bound as a float64 vector of ``length``."""
        return np.broadcast_to(np.asarray(self.max_abs, dtype=np.float64), (self.length,)).copy()


@dataclass(frozen=True)
class Roster:
    """The PKI: each market's long-term public bundle and the aggregator's, distributed out of band.

    Bundles are backend-specific public bytes (for masking an Ed25519 verification key); the
    aggregator's entry is its Ed25519 verification key, with which it signs every message it
    sends. The roster is public and may be shown to anyone; markets pin its :meth:`digest`.
    """

    entries: Mapping[str, bytes] = field(default_factory=dict)
    aggregator: bytes = b""

    def __post_init__(self) -> None:
        for m, b in self.entries.items():
            check_id("roster", m)
            if not isinstance(b, (bytes, bytearray)):
                raise ConfigError("roster", f"bundle of {m!r} must be bytes")
        object.__setattr__(self, "entries", dict(sorted(self.entries.items())))
        if not isinstance(self.aggregator, (bytes, bytearray)):
            raise ConfigError("roster", "the aggregator's bundle must be bytes")
        object.__setattr__(self, "aggregator", bytes(self.aggregator))

    def digest(self) -> bytes:
        """SHA-256 over every entry and the aggregator's key, length-prefixed (what markets pin)."""
        h = hashlib.sha256(b"fedmm-secure/roster/v1")
        for m, b in self.entries.items():
            for part in (m.encode("ascii"), bytes(b)):
                h.update(struct.pack(">I", len(part)) + part)
        h.update(b"aggregator" + struct.pack(">I", len(self.aggregator)) + self.aggregator)
        return h.digest()

    @property
    def markets(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def bundle(self, market: str) -> bytes:
        try:
            return bytes(self.entries[market])
        except KeyError:
            raise ProtocolError(f"market {market!r} is not on the roster") from None


class ClientRound(ABC):
    """A market's side of one round."""

    @abstractmethod
    def handle(self, message: bytes) -> bytes | None:
        """Process one message from the aggregator; return the reply, or ``None`` after the
        final (result) message. Invalid messages raise :class:`ProtocolError` (or its
        :class:`IntegrityError`) and leave the round's state unchanged."""

    # Backends store the decoded sum here when the result message arrives.
    _result: np.ndarray | None = None

    @property
    def done(self) -> bool:
        """True once the result has been received."""
        return self._result is not None

    def result(self) -> np.ndarray:
        """The float64 sum over the round's survivors (valid once ``done``)."""
        if self._result is None:
            raise ProtocolError("round not finished")
        return self._result.copy()

    def report(self) -> dict:
        """Backend facts for results.json (clipping, quantization error bound, ...)."""
        return {}


class ServerRound(ABC):
    """The aggregator's side of one round."""

    @abstractmethod
    def start(self) -> dict[str, bytes]:
        """First messages, one per participant."""

    @abstractmethod
    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        """Replies from the markets that answered this stage (absent markets have dropped out);
        returns the next messages. Raises :class:`AbortError` when the round cannot finish."""

    def receive(self, market: str, reply: bytes) -> None:
        """Take one reply of the current stage as it arrives; :meth:`end_stage` closes the stage.

        The default keeps the replies for :meth:`handle`; a backend that can consume a reply
        at once (the ``masking`` aggregator adds each upload into a running sum) overrides both,
        so a caller that drops each reply after passing it holds one at a time, not n."""
        pending: dict[str, bytes] = self.__dict__.setdefault("_stage_replies", {})
        if market in pending:
            raise ProtocolError(f"a second reply from {market!r} at this stage")
        pending[market] = reply

    def end_stage(self) -> dict[str, bytes]:
        """Close the current stage over the replies :meth:`receive` took; the next messages."""
        pending: dict[str, bytes] = self.__dict__.pop("_stage_replies", {})
        return self.handle(pending)

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once the messages last returned carried the result."""

    @property
    @abstractmethod
    def survivors(self) -> tuple[str, ...]:
        """Markets whose inputs are in the sum (valid once ``done``)."""

    def result(self) -> np.ndarray:
        """The plaintext sum, for backends where the aggregator learns it (masking, plain)."""
        raise ProtocolError(f"{type(self).__name__}: the aggregator does not learn the sum")


class MarketEndpoint(ABC):
    """One market's long-lived state for a backend (its long-term keys)."""

    market_id: str

    @abstractmethod
    def public_bundle(self) -> bytes:
        """Long-term public material that goes on the roster."""

    @abstractmethod
    def install_roster(self, roster: Roster, *, policy: MarketPolicy) -> None:
        """Accept the roster only if ``policy`` (the market's own) pins it and allows this
        backend; every later round is checked against ``policy``."""

    @abstractmethod
    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound: ...


class AggregatorEndpoint(ABC):
    """The aggregator's long-lived state for a backend: public material and its signing key."""

    @abstractmethod
    def public_bundle(self) -> bytes:
        """The aggregator's verification key, for the roster's ``aggregator`` entry."""

    @abstractmethod
    def install_roster(self, roster: Roster) -> None: ...

    @abstractmethod
    def begin_round(self, ctx: RoundContext) -> ServerRound: ...


class SecureAggregator(ABC):
    """A secure-aggregation backend: a factory of endpoints.

    ``secure`` is False only for ``plain``, which exists for baselines and must be asked for by
    name; everything that writes results labels such runs as not secure.
    """

    name: ClassVar[str]
    secure: ClassVar[bool]

    @abstractmethod
    def create_market(self, market_id: str) -> MarketEndpoint: ...

    @abstractmethod
    def create_aggregator(self) -> AggregatorEndpoint: ...
