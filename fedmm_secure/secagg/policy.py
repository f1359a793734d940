"""What a market accepts: its own policy, never the aggregator's say.

Each market builds a :class:`MarketPolicy` from its own configuration (the roster it obtained
out of band, or that roster's pinned hash; the smallest cohort it will be summed in; how many
markets it assumes may collude with the aggregator; the backends and privacy settings it runs
with). Backends check every round and every stage against it and refuse, with
:class:`~fedmm_secure.errors.PolicyError` and before anything secret leaves the market, a round
that departs from it: an aggregator that picks the cohort, adds a market to the roster, lowers
the threshold or switches the backend gets nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError, PolicyError

__all__ = ["DEFAULT_COLLUDERS", "MarketPolicy", "default_min_cohort", "min_threshold",
           "canonical_privacy", "PinnableRoster"]

# One market colluding with the aggregator: the case that already breaks single-key CKKS and
# that masking is chosen to survive (threat_model/masking.md, "Choice of c").
DEFAULT_COLLUDERS = 1


class PinnableRoster(Protocol):
    """What a policy needs of a roster (:class:`~fedmm_secure.secagg.base.Roster`)."""

    @property
    def markets(self) -> Sequence[str]: ...

    def digest(self) -> bytes: ...


def default_min_cohort(roster_size: int) -> int:
    """At least 3 markets (a sum of two reveals each input to the other) and 2/3 of the roster."""
    return max(3, math.ceil(2 * roster_size / 3))


def min_threshold(n: int, colluders: int) -> int:
    """Smallest t with 2t > n + c: two sets of t markets then share more than c markets, so an
    aggregator that shows two groups different survivor sets cannot collect t signatures for both
    views with only c colluders (Bonawitz et al. CCS'17, active model)."""
    return (n + colluders) // 2 + 1


def canonical_privacy(settings: Mapping[str, object]) -> str:
    """One string per set of privacy settings, so two configurations compare byte for byte."""
    try:
        return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError("privacy", "privacy settings must be JSON values") from None


@dataclass(frozen=True)
class MarketPolicy:
    """A market's own rules for taking part in a secure sum.

    ``roster_digest`` pins the whole roster (every market's bundle and the aggregator's key);
    ``roster_size`` is its number of markets. ``min_cohort`` is the fewest markets a round may
    start with and the fewest that may remain at any stage (default :func:`default_min_cohort`).
    ``colluders`` is the number c of markets assumed to collude with the aggregator; rounds must
    use a threshold t with 2t > n + c. ``backends`` are the backends the market runs,
    ``privacy`` its own privacy settings (:func:`canonical_privacy`).
    """

    roster_digest: bytes
    roster_size: int
    backends: frozenset[str]
    privacy: str
    min_cohort: int
    colluders: int = DEFAULT_COLLUDERS

    def __post_init__(self) -> None:
        if not isinstance(self.roster_digest, bytes) or len(self.roster_digest) != 32:
            raise ConfigError("policy.roster_digest", "must be a 32-byte SHA-256 digest")
        if not isinstance(self.roster_size, int) or self.roster_size < 1:
            raise ConfigError("policy.roster_size", f"got {self.roster_size!r}")
        if not self.backends or not all(isinstance(b, str) for b in self.backends):
            raise ConfigError("policy.backends", "name at least one backend")
        object.__setattr__(self, "backends", frozenset(self.backends))
        if not isinstance(self.colluders, int) or isinstance(self.colluders, bool) or self.colluders < 0:
            raise ConfigError("policy.colluders", f"got {self.colluders!r}", allowed="an int >= 0")
        if (not isinstance(self.min_cohort, int) or isinstance(self.min_cohort, bool)
                or not 1 <= self.min_cohort <= self.roster_size):
            raise ConfigError("policy.min_cohort", f"got {self.min_cohort!r}",
                              allowed=f"an int in 1..{self.roster_size}")
        if not isinstance(self.privacy, str):
            raise ConfigError("policy.privacy", "use canonical_privacy(settings)")

    @classmethod
    def pin(cls, roster: PinnableRoster, *, backends: Iterable[str], privacy: Mapping[str, object],
            min_cohort: int | None = None, colluders: int = DEFAULT_COLLUDERS) -> MarketPolicy:
        """A policy pinning ``roster`` as the market obtained it out of band."""
        n = len(roster.markets)
        return cls(roster_digest=roster.digest(), roster_size=n, backends=frozenset(backends),
                   privacy=canonical_privacy(privacy),
                   min_cohort=default_min_cohort(n) if min_cohort is None else min_cohort,
                   colluders=colluders)

    # -- checks: each raises PolicyError, which names the rule and never a secret
    def check_roster(self, roster: PinnableRoster) -> None:
        if roster.digest() != self.roster_digest:
            raise PolicyError("the roster differs from the one this market pinned")

    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise PolicyError(f"backend {backend!r} is not allowed by this market's policy "
                              f"(allowed: {', '.join(sorted(self.backends))})")

    def check_privacy(self, settings: Mapping[str, object]) -> None:
        if canonical_privacy(settings) != self.privacy:
            raise PolicyError("privacy settings differ from this market's own")

    def check_cohort(self, cohort: Iterable[str], what: str) -> None:
        size = len(tuple(cohort))
        if size < self.min_cohort:
            raise PolicyError(f"{what}: {size} markets, this market's minimum cohort is "
                              f"{self.min_cohort}")

    def check_threshold(self, threshold: int, n: int) -> None:
        if not min_threshold(n, self.colluders) <= threshold <= n:
            raise PolicyError(f"threshold {threshold} of {n} markets: this market requires "
                              f"2t > n + c with c = {self.colluders}")
