"""``run_audit``: train what the attack needs through each target's callback, attack, report."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .lira import fit_lira, lira_offline_scores, lira_online_scores, train_shadows
from .metrics import membership_metrics
from .one_run import one_run_audit, one_run_ceiling
from .plot import save_roc_plot
from .report import AttackResult, AuditReport
from .target import MarketAuditTarget, TrainFn

__all__ = ["ATTACKS", "run_audit"]

ATTACKS = ("loss", "lira", "canary")
_QUICK_SHADOWS = 4
_FULL_SHADOWS = 16


def _market_rng(seed: int, name: str) -> np.random.Generator:
    # Keyed by market name, so a market's randomness does not depend on which others are audited.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _train_target(train_fn: TrainFn, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One run with each record included by an independent fair coin (what the one-run bound
    requires); returns (inclusion, phi of every record)."""
    included = rng.random(n) < 0.5
    if included.all() or not included.any():
        raise DataError("pool too small: the coin flips left no member or no non-member")
    score = train_fn(included.copy(), int(rng.integers(0, 2**63 - 1)))
    phi = np.asarray(score(np.arange(n)), dtype=float).reshape(-1)
    if phi.size != n:
        raise DataError(f"score_fn returned {phi.size} scores for {n} records")
    if not np.all(np.isfinite(phi)):
        raise DataError("score_fn returned NaN or infinity")
    return included, phi


def _result(market, attack, scores, included, *, delta, alpha, k_grid, acc_eps, n_models):
    metrics, roc = membership_metrics(scores[included], scores[~included])
    bound = one_run_audit(scores, included, delta=delta, alpha=alpha, k_grid=k_grid)
    return AttackResult(market=market, attack=attack, metrics=metrics, bound=bound,
                        accountant_epsilon=acc_eps, roc=roc, n_models_trained=n_models,
                        ceiling=one_run_ceiling(scores.size, delta=delta, alpha=alpha, k_grid=k_grid))


def run_audit(*, attack: str, markets: dict[str, MarketAuditTarget], out_dir: Path | str,
              quick: bool, seed: int, accountant_epsilon: dict[str, float] | None, delta: float,
              alpha: float = 0.05, n_shadows: int | None = None,
              k_grid: tuple[tuple[int, int], ...] | None = None) -> AuditReport:
    """Audit every market with one attack; save the log-log ROC plot into ``out_dir``.

    * ``loss``: one target model trained on a random half of the pool; threshold on phi.
    * ``lira``: ``n_shadows`` shadow models (4 quick / 16 full) on balanced random halves plus
      one target model; reports online and offline LiRA (global variance below 64 shadows).
    * ``canary``: the one-run canary audit on the target's canary pool (its main pool when it
      has none), scored by phi.

    In every case the target run includes each record by an independent fair coin, and the
    shadows' coins are independent of it, so each result carries a valid one-run epsilon lower
    bound at confidence ``1 - alpha``. ``accountant_epsilon`` (by market name) overrides the
    targets' own ``accountant_epsilon``; both must be at this ``delta``.
    """
    if attack not in ATTACKS:
        raise ConfigError("attack", f"unknown attack {attack!r}", allowed=", ".join(ATTACKS))
    if not markets:
        raise ConfigError("markets", "nothing to audit")
    if not isinstance(seed, int):
        raise ConfigError("seed", f"must be an int, got {seed!r}")
    if accountant_epsilon is not None:
        unknown = set(accountant_epsilon) - set(markets)
        if unknown:
            raise ConfigError("accountant_epsilon", f"unknown markets {sorted(unknown)}")
    k_shadows = n_shadows if n_shadows is not None else (_QUICK_SHADOWS if quick else _FULL_SHADOWS)
    results: list[AttackResult] = []
    for name, target in markets.items():
        rng = _market_rng(seed, name)
        acc = target.accountant_epsilon
        if accountant_epsilon is not None and name in accountant_epsilon:
            acc = float(accountant_epsilon[name])
        common = dict(delta=delta, alpha=alpha, k_grid=k_grid, acc_eps=acc)
        if attack == "loss":
            included, phi = _train_target(target.train_fn, target.pool_size, rng)
            results.append(_result(name, "loss", phi, included, n_models=1, **common))
        elif attack == "canary":
            n, train_fn = target.canary_pool()
            included, phi = _train_target(train_fn, n, rng)
            results.append(_result(name, "canary", phi, included, n_models=1, **common))
        else:
            shadow_phi, shadow_in = train_shadows(target.train_fn, pool_size=target.pool_size,
                                                  n_shadows=k_shadows, rng=rng)
            included, phi = _train_target(target.train_fn, target.pool_size, rng)
            fit = fit_lira(shadow_phi, shadow_in, global_variance=k_shadows < 64)
            for variant, scores in (("lira-online", lira_online_scores(fit, phi)),
                                    ("lira-offline", lira_offline_scores(fit, phi))):
                results.append(_result(name, variant, scores, included, n_models=k_shadows + 1, **common))
    out = Path(out_dir)
    plot = save_roc_plot([(f"{r.market} {r.attack} (AUC {r.metrics.auc:.3f})", r.roc) for r in results],
                         out / f"roc_{attack}.png", title=f"membership inference: {attack}")
    return AuditReport(attack=attack, seed=seed, quick=quick, delta=float(delta),
                       confidence=1 - alpha, results=tuple(results), roc_plot=str(plot))
