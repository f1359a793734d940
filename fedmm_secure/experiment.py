"""One run: every requested method on the same markets, results as JSON plus a report.

This module does no argument parsing and reads no environment; the CLI builds a
:class:`~fedmm_secure.config.RunConfig` and hands over an output directory.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config import RunConfig, dataclass_from_overrides
from .data.market import MarketData
from .data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from .errors import ConfigError
from .federation.fedmm import run_method
from .reports.run_report import write_json_atomic, write_run_report
from .runtime.embedded import EmbeddedSecureSum

__all__ = ["load_data", "run_experiment"]


def _synthetic_config(overrides: dict) -> SyntheticConfig:
    return dataclass_from_overrides(SyntheticConfig, overrides, prefix="synthetic", nested={"markets": MarketSpec})


def load_data(cfg: RunConfig, *, synthetic: Callable[[], list[MarketData]] | None = None) -> list[MarketData]:
    """The run's markets: generated (``synthetic`` overrides the default generator) or loaded
    from ``cfg.data``, restricted to ``cfg.markets``."""
    if cfg.data == "synthetic":
        markets = (synthetic() if synthetic is not None
                   else generate_markets(_synthetic_config(cfg.synthetic), seed=cfg.seed))
    else:
        from .data.loaders import load_markets
        markets = load_markets(cfg.data, seed=cfg.seed, markets=list(cfg.markets) if cfg.markets else None)
    if cfg.markets and cfg.data == "synthetic":
        names = {m.name for m in markets}
        missing = [m for m in cfg.markets if m not in names]
        if missing:
            raise ConfigError("markets", f"unknown market(s) {missing}", allowed=", ".join(sorted(names)))
        markets = [m for m in markets if m.name in cfg.markets]
    return markets


def privacy_session(cfg: RunConfig, markets: list[MarketData], *, method: str, ledger, resume_offset: int = 0,
                    prior_events=None, method_index: int, federation_size: int | None = None):
    """The DP session (trainer factory + round hooks) for ``markets`` under ``cfg.privacy``.

    ``federation_size``: how many markets take part in the secure sums, when this process holds
    only some of them (a market worker on the Flower runtime); it sizes market-level noise.
    """
    from .privacy.budget import BudgetPolicy
    from .privacy.session import PrivacySession, plan_markets

    p, mc = cfg.privacy, cfg.model
    plans = plan_markets(unit=p.unit, batch_size=mc.batch_size,
                         # `local` has no CF stage: its whole budget goes to the CTR model.
                         epochs={"ctr": mc.ctr_epochs} if method == "local" else {"cf": mc.cf_epochs, "ctr": mc.ctr_epochs},
                         rounds=cfg.rounds,
                         n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets})
    policy = (BudgetPolicy(epsilon_budget=p.epsilon_budget, delta=p.delta, on_exceed=p.on_exceed)
              if p.epsilon_budget is not None else None)
    return PrivacySession(unit=p.unit, delta=p.delta, max_grad_norm=cfg.max_grad_norm(), plans=plans,
                          noise_multiplier=p.noise_multiplier, target_epsilon=p.epsilon if p.noise_multiplier is None else None,
                          accountant=p.accountant, policy=policy, ledger=ledger, ledger_round_offset=resume_offset,
                          prior_events=prior_events, randomness=p.randomness, noise_seed=cfg.seed * 7_919 + method_index,
                          market_noise_multiplier=p.market_noise_multiplier,
                          federation_size=federation_size,
                          # Upload noise must be unpredictable to the other parties: OS entropy.
                          upload_rng=np.random.default_rng(secrets.randbits(128)))


def run_experiment(cfg: RunConfig, *, out_dir: Path, progress: Callable[[str, float], None] | None = None,
                   resume: bool = False) -> dict:
    """Run every method of ``cfg``; write ``results.json`` and ``report.md`` into ``out_dir``.

    With privacy on, the ``fedmm`` method's DP events go to ``out_dir/ledger.sqlite`` before any
    round's result leaves the markets. ``resume=True`` reopens that ledger (the config must
    match): every event already recorded, including those of a round cut short by a crash,
    stays spent, and new rounds are numbered after it. Models restart from their initial state.
    """
    cfg = cfg.resolved()
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = None
    resume_offset, prior = 0, None
    if cfg.privacy.enabled:
        from .privacy.ledger import Ledger
        if resume:
            ledger = Ledger.open(out_dir, run_config=cfg.to_dict())
            state = ledger.resume_state()
            resume_offset = state.next_round
            prior = ledger.spent_events()
        else:
            if (out_dir / "ledger.sqlite").exists():
                raise ConfigError("--out", f"{out_dir} already holds a privacy ledger",
                                  allowed="a new directory, or --resume DIR to continue that run")
            ledger = Ledger.open(out_dir, run_config=cfg.to_dict(), create=True)
    write_json_atomic(out_dir / "config.json", cfg.to_dict())
    markets = load_data(cfg)
    names = [m.name for m in markets]
    results: dict = {
        "config": cfg.to_dict(),
        "methods": list(cfg.methods),
        "markets": {m: {} for m in names},
        "market_sizes": {m.name: {"users": m.n_users, "items": m.n_items, "train_rows": len(m.train),
                                  "test_rows": len(m.test)} for m in markets},
        "nmi_level1_pooled": {},
        "timing_s": {},
    }
    if cfg.privacy.enabled:
        from .privacy.randomness import describe
        results["randomness"] = describe(cfg.privacy.randomness)
    steps_total = len(cfg.methods)
    secagg_summary = None
    for i, method in enumerate(cfg.methods):
        t0 = time.perf_counter()
        secure_sum = None
        if method == "fedmm":
            secure_sum = EmbeddedSecureSum(backend=cfg.secagg, markets=names, run_id=f"run-{cfg.seed}",
                                           allow_insecure=cfg.secagg == "plain")

        def tick(msg: str, i=i, method=method) -> None:
            if progress is not None:
                progress(f"{method}: {msg}", i / steps_total)

        session = None
        kwargs = {}
        if cfg.privacy.enabled and method != "centralized":
            # The federated method's spend is the one on the ledger (its outputs cross the market
            # boundary); baselines are trained with the same DP settings for comparison.
            session = privacy_session(cfg, markets, method=method, ledger=ledger if method == "fedmm" else None,
                                       resume_offset=resume_offset if method == "fedmm" else 0,
                                       prior_events=prior if method == "fedmm" else None, method_index=i)
            kwargs = {"trainers": session, "hooks": session}
        out = run_method(method, markets, cfg.model, rounds=cfg.rounds, seed=cfg.seed, secure_sum=secure_sum,
                         progress=tick, **kwargs)
        if session is not None:
            summary = session.summary()
            results.setdefault("privacy_by_method", {})[method] = {m: v["epsilon"] for m, v in summary.items()}
            if method == "fedmm" or "privacy" not in results:
                results["privacy"] = summary
            if method == "fedmm" and session.market_level_summary() is not None:
                results["privacy_market_level"] = session.market_level_summary()
        for m, metrics in out["markets"].items():
            results["markets"][m][method] = metrics
        if "code_alignment" in out:
            results.setdefault("code_alignment", {})[method] = out["code_alignment"]
        if "nmi_level1_pooled" in out:
            results["nmi_level1_pooled"][method] = out["nmi_level1_pooled"]
        if secure_sum is not None:
            secagg_summary = secure_sum.summary()
        results["timing_s"][method] = round(time.perf_counter() - t0, 2)
        if progress is not None:
            progress(f"{method}: done", (i + 1) / steps_total)
    if secagg_summary is not None:
        results["secagg"] = secagg_summary
    sparse = [m for m in names if m != names[0]] if cfg.data == "synthetic" else names
    results["summary"] = {
        meth: {"mean_auc": float(np.nanmean([results["markets"][m][meth]["auc"] for m in names])),
               "mean_auc_sparse": float(np.nanmean([results["markets"][m][meth]["auc"] for m in sparse]))}
        for meth in cfg.methods
    }
    if ledger is not None:
        ledger.close()
    write_json_atomic(out_dir / "results.json", results)
    write_run_report(results, out_dir)
    return results
