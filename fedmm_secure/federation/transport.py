"""What the federation code needs from a runtime: a secure sum, and nothing else.

The federation code hands each market's vector and the public bound on its coordinates to a
:class:`SecureSum`; the runtime runs whichever secure-aggregation backend it was built with (in
process, or over Flower) and gives back, for every surviving market, the sum it obtained. The
federation code never imports a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["SumResult", "SecureSum"]


@dataclass(frozen=True)
class SumResult:
    sums: dict[str, np.ndarray]    # market -> the sum that market obtained
    survivors: tuple[str, ...]     # markets whose vectors are in the sum


class SecureSum(Protocol):
    backend_name: str
    secure: bool

    def secure_sum(self, *, label: str, round_id: int, vectors: Mapping[str, np.ndarray],
                   max_abs: float | np.ndarray) -> SumResult: ...
