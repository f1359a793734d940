"""Codebook math for the RQ-VAE, as pure functions on numpy arrays.

Codebooks are not trained by gradient: each level is updated k-means style from *sufficient
statistics* (per-code counts and per-code vector sums). Statistics are additive, so the update
computed from the sum of every market's statistics equals the update computed on the pooled
vectors: that is what lets the global (level-1) codebook be updated from a secure sum alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CodeStats",
    "assign_codes",
    "code_statistics",
    "update_codebook",
    "utilization",
    "perplexity",
    "flatten_stats",
    "unflatten_stats",
]


@dataclass(frozen=True)
class CodeStats:
    counts: np.ndarray  # float64 (K,)
    sums: np.ndarray    # float64 (K, D)

    def __add__(self, other: "CodeStats") -> "CodeStats":
        return CodeStats(self.counts + other.counts, self.sums + other.sums)


def assign_codes(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest code (squared Euclidean) for every row of ``z``; ties go to the
    lowest index so the result is deterministic."""
    d2 = (z * z).sum(1, keepdims=True) - 2.0 * z @ codebook.T + (codebook * codebook).sum(1)[None, :]
    return np.argmin(d2, axis=1)


def code_statistics(z: np.ndarray, codes: np.ndarray, n_codes: int) -> CodeStats:
    counts = np.bincount(codes, minlength=n_codes).astype(np.float64)
    sums = np.zeros((n_codes, z.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, z.astype(np.float64))
    return CodeStats(counts, sums)


def update_codebook(codebook: np.ndarray, stats: CodeStats, *, decay: float,
                    dead_threshold: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One statistics-based update; returns the new codebook and the mask of revived codes.

    ``decay`` blends the old code with the new centroid (0 = plain k-means step). Codes whose
    count is below ``dead_threshold`` are dead: they are revived next to the most used codes
    (a split of a popular code plus small noise). Revival needs only the codebook and the
    counts, never any market's vectors, so every market computes the same revival from the
    same sum and the same ``rng`` seed.
    """
    new = codebook.copy()
    live = stats.counts >= max(dead_threshold, 1e-12)
    centroids = stats.sums[live] / stats.counts[live, None]
    new[live] = decay * codebook[live] + (1.0 - decay) * centroids
    dead = ~live
    if dead.any() and live.any():
        order = np.argsort(-stats.counts, kind="stable")
        donors = order[: int(dead.sum())] if live.sum() >= dead.sum() else rng.choice(
            np.flatnonzero(live), size=int(dead.sum()))
        scale = 0.05 * (np.abs(new[live]).mean() + 1e-6)
        new[dead] = new[donors] + rng.normal(scale=scale, size=(int(dead.sum()), codebook.shape[1]))
    return new, dead


def utilization(codes: np.ndarray, n_codes: int) -> float:
    """Fraction of codes used at least once."""
    if len(codes) == 0:
        return 0.0
    return float(np.unique(codes).size / n_codes)


def perplexity(codes: np.ndarray, n_codes: int) -> float:
    """exp(entropy) of the code distribution: n_codes for uniform use, 1 for total collapse."""
    if len(codes) == 0:
        return 0.0
    p = np.bincount(codes, minlength=n_codes) / len(codes)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def flatten_stats(stats: CodeStats) -> np.ndarray:
    return np.concatenate([stats.counts, stats.sums.ravel()])


def unflatten_stats(vec: np.ndarray, n_codes: int, dim: int) -> CodeStats:
    if vec.shape != (n_codes * (1 + dim),):
        raise ValueError(f"statistics vector of shape {vec.shape}, expected ({n_codes * (1 + dim)},)")
    return CodeStats(vec[:n_codes].copy(), vec[n_codes:].reshape(n_codes, dim).copy())
