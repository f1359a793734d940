"""Privacy events as frozen data (dp-accounting style).

An accountant composes events; the ledger stores them. Every optimisation step that reads raw
interactions must be represented by an event before its result leaves the market.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError

__all__ = ["NoiseSplit", "PrivacyUnit", "SubsampledGaussianEvent", "event_from_dict"]

PrivacyUnit = str  # "record", "interaction", "user" or "market"
# "interaction": every row derived from one implicit-feedback interaction (positive + its negatives)
_UNITS = ("record", "interaction", "user", "market")  # "market": a whole market's upload (distributed DP on sums)


def _positive_finite(name: str, v: object) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ConfigError(name, f"must be finite and > 0, got {v!r}")


@dataclass(frozen=True)
class NoiseSplit:
    """How one step's Gaussian noise was split between row selection and the gradient
    (sparsity-preserving DP-SGD, :mod:`fedmm_secure.privacy.sparse_selection`).

    Both releases read the same Poisson sample, so together they are one subsampled Gaussian
    mechanism with ``noise_multiplier = (sigma1^-2 + sigma2^-2)^-1/2``; the event carries that
    effective multiplier, and this record says what was actually done.
    """

    selection_noise_multiplier: float   # sigma1: std of each row's count noise / C1
    gradient_noise_multiplier: float    # sigma2: std of the noise on selected rows and dense params / C2
    threshold: float                    # a row is selected when its noisy count >= threshold * C1
    contribution_clip: float            # C1: L2 bound of one unit's contribution map

    def __post_init__(self) -> None:
        for f in ("selection_noise_multiplier", "gradient_noise_multiplier", "threshold", "contribution_clip"):
            _positive_finite(f"noise_split.{f}", getattr(self, f))

    @property
    def effective_noise_multiplier(self) -> float:
        return (self.selection_noise_multiplier ** -2 + self.gradient_noise_multiplier ** -2) ** -0.5


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    ``sample_rate`` is the Poisson inclusion probability of one privacy unit per step,
    ``noise_multiplier`` the Gaussian std divided by the clipping norm; ``split``, when the
    noise was split between row selection and the gradient, records both parts (their
    composition must equal ``noise_multiplier``).
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    unit: PrivacyUnit = "record"
    split: NoiseSplit | None = None

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
        if self.split is not None:
            if not isinstance(self.split, NoiseSplit):
                raise ConfigError("split", f"must be a NoiseSplit, got {type(self.split).__name__}")
            # The accountant sees only noise_multiplier: a split that composes to anything
            # else would be accounted as a different mechanism than the one run.
            if not math.isclose(self.split.effective_noise_multiplier, self.noise_multiplier, rel_tol=1e-9):
                raise ConfigError("split", f"sigma1 and sigma2 compose to {self.split.effective_noise_multiplier!r}, "
                                  f"not the event's noise multiplier {self.noise_multiplier!r}")

    def to_dict(self) -> dict:
        """JSON-able form (the ledger stores events this way; no ``split`` key for dense noise,
        so ledgers written before the split existed hash and read the same)."""
        d = {"kind": "subsampled_gaussian", **asdict(self)}
        if self.split is None:
            del d["split"]
        return d


def event_from_dict(d: dict) -> SubsampledGaussianEvent:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind != "subsampled_gaussian":
        raise ConfigError("event.kind", f"unknown event kind {kind!r}", allowed="subsampled_gaussian")
    split = d.pop("split", None)
    return SubsampledGaussianEvent(**d, split=None if split is None else NoiseSplit(**split))
