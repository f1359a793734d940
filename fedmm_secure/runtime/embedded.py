"""Embedded runtime: every market and the aggregator in one process.

Messages still go through each backend's codec, so the bytes the aggregator receives are exactly
the bytes that would cross a network. The runtime also keeps the numbers users benchmark:
bytes uploaded per market per round and, as an in-process diagnostic only, the largest
difference between the securely obtained sum and the plain sum.

Every party runs here, so this runtime is also the deployment that hands out keys: it builds the
roster (every market's bundle and the aggregator's key) and gives each market a policy pinning
it. The minimum cohort defaults to the policy default capped at the number of markets, so a
two-market configuration still runs; such a sum is not private between its two markets (each can
subtract its own input), see threat_model/masking.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..federation.transport import SumResult
from ..secagg import (DEFAULT_COLLUDERS, MarketPolicy, Roster, RoundContext, create_backend,
                      default_min_cohort, run_round)

__all__ = ["EmbeddedSecureSum"]


class EmbeddedSecureSum:
    def __init__(self, *, backend: str, markets: Sequence[str], run_id: str, allow_insecure: bool,
                 backend_options: Mapping | None = None, min_cohort: int | None = None,
                 colluders: int = DEFAULT_COLLUDERS, privacy: Mapping | None = None) -> None:
        options = dict(backend_options or {})
        if backend == "masking":
            options.setdefault("colluders", colluders)  # the threshold the policies accept
        self._backend = create_backend(backend, allow_insecure=allow_insecure, **options)
        self.backend_name = self._backend.name
        self.secure = self._backend.secure
        self.run_id = re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)[:64] or "run"
        self._markets = {m: self._backend.create_market(m) for m in markets}
        self._aggregator = self._backend.create_aggregator()
        roster = Roster({m: ep.public_bundle() for m, ep in self._markets.items()},
                        aggregator=self._aggregator.public_bundle())
        if min_cohort is None:
            min_cohort = min(default_min_cohort(len(markets)), len(markets))
        policy = MarketPolicy.pin(roster, backends={self._backend.name}, privacy=dict(privacy or {}),
                                  min_cohort=min_cohort, colluders=colluders)
        for ep in self._markets.values():
            ep.install_roster(roster, policy=policy)
        self._aggregator.install_roster(roster)
        self.bytes_up: dict[str, list[int]] = defaultdict(list)
        self.max_abs_error = 0.0
        self.rounds = 0
        self.drop_plan: dict[tuple[str, int], dict[str, int]] = {}

    def secure_sum(self, *, label: str, round_id: int, vectors: Mapping[str, np.ndarray],
                   max_abs: float | np.ndarray) -> SumResult:
        if not vectors:
            raise ConfigError("participants", "a secure sum needs at least one market")
        unknown = set(vectors) - set(self._markets)
        if unknown:
            raise ConfigError("participants", f"markets not in this federation: {sorted(unknown)}")
        vecs = {m: np.asarray(v, dtype=np.float64).ravel() for m, v in vectors.items()}
        length = len(next(iter(vecs.values())))
        ctx = RoundContext(run_id=self.run_id, round_id=round_id, participants=tuple(sorted(vecs)),
                           length=length, max_abs=max_abs, label=label)
        outcome = run_round(self._aggregator, self._markets, ctx, vecs,
                            drop_at=self.drop_plan.get((label, round_id)))
        for m, b in outcome.bytes_up.items():
            self.bytes_up[m].append(b)
        bounds = ctx.bounds()
        plain = sum(np.clip(vecs[m], -bounds, bounds) for m in outcome.survivors)
        for s in outcome.results.values():
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(s - plain))))
        self.rounds += 1
        return SumResult(dict(outcome.results), tuple(outcome.survivors))

    def summary(self) -> dict:
        per_market = {m: (float(np.mean(b)) if b else 0.0) for m, b in self.bytes_up.items()}
        return {
            "backend": self.backend_name,
            "secure": self.secure,
            "bytes_up_per_market_per_round": per_market,
            "max_abs_error_vs_plain": self.max_abs_error,
            "aggregations": self.rounds,
        }
