"""Paired comparisons over seeds: the statistics every FedMM-vs-baseline claim is made with.

Two methods trained on the same seed share the data split and the initialisation, so the
per-seed difference removes most of the between-seed variance; the claim is about the mean of
those differences. The interval is Student's t over seeds (``n - 1`` degrees of freedom),
because the number of seeds is small (5-10) and a normal interval would be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedDiff", "paired_difference", "t_half_width", "parse_seeds"]


@dataclass(frozen=True)
class PairedDiff:
    n: int              # seeds with both values
    mean: float         # mean of a_s - b_s
    sd: float           # sample standard deviation of the differences (ddof=1); nan for n < 2
    ci_low: float       # t-interval over seeds; nan for n < 2
    ci_high: float
    wins: int           # seeds with a_s > b_s
    level: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> PairedDiff:
    """Mean of ``a - b`` over paired seeds with a two-sided ``level`` t-interval.

    Pairs where either value is NaN (an undefined AUC) are dropped, not imputed.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return PairedDiff(0, nan, nan, nan, nan, 0, level)
    mean = float(d.mean())
    if n < 2:
        nan = float("nan")
        return PairedDiff(n, mean, nan, nan, nan, int((d > 0).sum()), level)
    sd = float(d.std(ddof=1))
    half = t_half_width(sd, n, level)
    return PairedDiff(n, mean, sd, mean - half, mean + half, int((d > 0).sum()), level)


def t_half_width(sd: float, n: int, level: float) -> float:
    """Half-width of the two-sided ``level`` Student-t interval of a mean of ``n >= 2`` values
    with sample standard deviation ``sd``."""
    return float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sd / math.sqrt(n)


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"``, ``"5,7,9"`` or ``"0-2,10-11"`` -> sorted distinct seeds."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise ValueError(f"bad seed range {part!r}: use e.g. 0-4 or 5,7,9") from None
        if a < 0 or b < a:
            raise ValueError(f"bad seed range {part!r}: need 0 <= start <= end")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no seeds given")
    return sorted(out)
