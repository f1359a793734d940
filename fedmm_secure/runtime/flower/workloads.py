"""Benchmark workloads a distributed deployment can run instead of a FedMM method."""

from __future__ import annotations

import numpy as np

from ...federation.fedmm.protocol import Pipeline, PublicMeta, SumRequest

__all__ = ["secure_sum_pipeline", "workload_vector"]


def workload_vector(*, seed: int, index: int, round_id: int, length: int) -> np.ndarray:
    """Market ``index``'s input to round ``round_id`` of the secure-sum workload (public seed)."""
    return np.random.default_rng([seed, index, round_id]).uniform(-1.0, 1.0, length)


def secure_sum_pipeline(*, length: int, rounds: int, seed: int, meta: PublicMeta, n_markets: int) -> Pipeline:
    """``rounds`` secure sums of ``length`` values in [-1, 1], nothing else.

    Inputs come from a public seed, so each market can check the sum it receives against the
    sum of every market's input (valid when no market drops out).
    """
    worst = 0.0
    for rnd in range(rounds):
        s = yield SumRequest("secure-sum", rnd, workload_vector(seed=seed, index=meta.index, round_id=rnd,
                                                                  length=length), 1.0)
        expected = sum(workload_vector(seed=seed, index=i, round_id=rnd, length=length) for i in range(n_markets))
        worst = max(worst, float(np.max(np.abs(np.asarray(s) - expected))))
    return {"metrics": {"rounds": rounds, "length": length, "max_abs_error": worst}}
