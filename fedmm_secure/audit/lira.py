"""Likelihood-ratio attack, LiRA (Carlini et al., "Membership Inference Attacks From First
Principles", S&P 2022).

For every candidate record, shadow models trained with and without it give two empirical
distributions of its logit-scaled confidence phi. Each is modelled as a Gaussian; a target
model's phi is then scored by

* online:  log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)   (needs IN and OUT shadows)
* offline: (phi - mu_out) / s_out, a one-sided test against OUT only (shadows never need the
  target's candidates, so they can be trained once, ahead of time).

With few shadows the per-record variance is noisy; ``global_variance=True`` replaces it by the
pooled within-record variance (one s_in and one s_out for all records), which the paper
recommends below about 64 shadows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from .target import TrainFn

__all__ = ["LiraFit", "fit_lira", "lira_online_scores", "lira_offline_scores",
           "balanced_membership", "train_shadows"]

_STD_FLOOR = 1e-4  # deterministic training can give identical phi in every shadow


@dataclass(frozen=True)
class LiraFit:
    mean_in: np.ndarray
    std_in: np.ndarray
    mean_out: np.ndarray
    std_out: np.ndarray
    global_variance: bool


def balanced_membership(n_models: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n_models, n) inclusion matrix where each record is in exactly half of the models
    (rounded down), as in the LiRA reference code; records are assigned independently."""
    if n_models < 1 or n < 1:
        raise ConfigError("n_models", "need at least one model and one record")
    order = rng.random((n_models, n)).argsort(axis=0)
    return order < n_models // 2


def _moments(phi: np.ndarray, mask: np.ndarray):
    count = mask.sum(axis=0)
    s = np.where(mask, phi, 0.0).sum(axis=0)
    mean = np.divide(s, count, out=np.full(phi.shape[1], np.nan), where=count > 0)
    dev2 = np.where(mask, (phi - np.where(count > 0, mean, 0.0)) ** 2, 0.0).sum(axis=0)
    return count, mean, dev2


def fit_lira(shadow_phi: np.ndarray, shadow_in: np.ndarray, *, global_variance: bool) -> LiraFit:
    """Per-record Gaussian fits of phi from shadow models.

    ``shadow_phi`` and ``shadow_in`` are (K, n): phi of every record under every shadow model
    and whether the record was in that shadow's training set.
    """
    phi = np.asarray(shadow_phi, dtype=float)
    inc = np.asarray(shadow_in, dtype=bool)
    if phi.ndim != 2 or phi.shape != inc.shape:
        raise DataError(f"shadow phi {phi.shape} and inclusion {inc.shape} must both be (K, n)")
    if not np.all(np.isfinite(phi)):
        raise DataError("shadow phi contains NaN or infinity")
    stats = []
    for mask in (inc, ~inc):
        count, mean, dev2 = _moments(phi, mask)
        has = count > 0
        if not has.any():
            stats.append(None)
            continue
        multi = count > 1
        dof = (count[multi] - 1).sum()
        pooled = np.sqrt(dev2[multi].sum() / dof) if dof > 0 else np.nan
        if global_variance or not multi.all():
            # Records with a single observation have no variance of their own; the pooled
            # within-record estimate is the honest substitute.
            if not np.isfinite(pooled):
                raise ConfigError("n_shadows", "too few shadow models to estimate any variance",
                                  allowed="at least 2 observations of some record in each group")
            std = np.full(phi.shape[1], pooled)
            if not global_variance:
                std[multi] = np.sqrt(dev2[multi] / (count[multi] - 1))
        else:
            std = np.sqrt(dev2 / (count - 1))
        stats.append((count, mean, np.maximum(std, _STD_FLOOR)))
    if stats[1] is None:
        raise ConfigError("n_shadows", "no shadow model left any record out")
    _, mean_out, std_out = stats[1]
    if stats[0] is None:  # offline-only use: no IN shadows at all
        mean_in, std_in = np.full_like(mean_out, np.nan), np.full_like(std_out, np.nan)
    else:
        count_in, mean_in, std_in = stats[0]
        count_out = stats[1][0]
        # A record never seen IN (or OUT) borrows the average IN-OUT shift of the others.
        both = (count_in > 0) & (count_out > 0)
        shift = float(np.mean(mean_in[both] - mean_out[both])) if both.any() else 0.0
        mean_in = np.where(count_in > 0, mean_in, mean_out + shift)
        mean_out = np.where(count_out > 0, mean_out, mean_in - shift)
    return LiraFit(mean_in=mean_in, std_in=std_in, mean_out=mean_out, std_out=std_out,
                   global_variance=global_variance)


def _check_target(fit: LiraFit, phi) -> np.ndarray:
    x = np.asarray(phi, dtype=float).reshape(-1)
    if x.shape != fit.mean_out.shape:
        raise DataError(f"{x.size} target scores for {fit.mean_out.size} fitted records")
    if not np.all(np.isfinite(x)):
        raise DataError("target phi contains NaN or infinity")
    return x


def lira_online_scores(fit: LiraFit, target_phi) -> np.ndarray:
    """Log likelihood ratio IN vs OUT; higher = more likely a member."""
    x = _check_target(fit, target_phi)
    if np.any(np.isnan(fit.mean_in)):
        raise ConfigError("variant", "online LiRA needs IN shadows", allowed="use offline")
    z_in = (x - fit.mean_in) / fit.std_in
    z_out = (x - fit.mean_out) / fit.std_out
    return (-0.5 * z_in**2 - np.log(fit.std_in)) - (-0.5 * z_out**2 - np.log(fit.std_out))


def lira_offline_scores(fit: LiraFit, target_phi) -> np.ndarray:
    """One-sided z-score against the OUT distribution; higher = more likely a member.

    (The paper's p-value 1 - Phi(z) is a monotone function of z, so the ROC is the same.)
    """
    x = _check_target(fit, target_phi)
    return (x - fit.mean_out) / fit.std_out


def train_shadows(train_fn: TrainFn, *, pool_size: int, n_shadows: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train ``n_shadows`` models on balanced random halves of the pool; return (phi, inclusion)."""
    if n_shadows < 2:
        raise ConfigError("n_shadows", f"need at least 2 shadow models, got {n_shadows}")
    keep = balanced_membership(n_shadows, pool_size, rng)
    seeds = rng.integers(0, 2**63 - 1, size=n_shadows)
    everyone = np.arange(pool_size)
    phi = np.empty((n_shadows, pool_size))
    for k in range(n_shadows):
        score = train_fn(keep[k].copy(), int(seeds[k]))
        out = np.asarray(score(everyone), dtype=float).reshape(-1)
        if out.size != pool_size:
            raise DataError(f"score_fn returned {out.size} scores for {pool_size} records")
        phi[k] = out
    return phi, keep
