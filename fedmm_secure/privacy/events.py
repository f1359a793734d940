"""Privacy events as frozen data (dp-accounting style).

An accountant composes events; the ledger stores them. Every optimisation step that reads raw
interactions must be represented by an event before its result leaves the market.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError

__all__ = ["PrivacyUnit", "SubsampledGaussianEvent", "event_from_dict"]

PrivacyUnit = str  # "record", "interaction", "user" or "market"
# "interaction": every row derived from one implicit-feedback interaction (positive + its negatives)
_UNITS = ("record", "interaction", "user", "market")  # "market": a whole market's upload (distributed DP on sums)


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    ``sample_rate`` is the Poisson inclusion probability of one privacy unit per step,
    ``noise_multiplier`` the Gaussian std divided by the clipping norm.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    unit: PrivacyUnit = "record"

    def __post_init__(self) -> None:
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise ConfigError("sample_rate", f"must be in (0, 1], got {self.sample_rate!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ConfigError("noise_multiplier", f"must be finite and > 0, got {self.noise_multiplier!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ConfigError("steps", f"must be a non-negative int, got {self.steps!r}")
        if self.unit not in _UNITS:
            raise ConfigError("unit", f"unknown privacy unit {self.unit!r}", allowed=", ".join(_UNITS))

    def to_dict(self) -> dict:
        """JSON-able form (the ledger stores events this way)."""
        return {"kind": "subsampled_gaussian", **asdict(self)}


def event_from_dict(d: dict) -> SubsampledGaussianEvent:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind != "subsampled_gaussian":
        raise ConfigError("event.kind", f"unknown event kind {kind!r}", allowed="subsampled_gaussian")
    return SubsampledGaussianEvent(**d)
