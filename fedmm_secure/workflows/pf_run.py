"""One PF-MSMTrec run: every requested method on the same scenarios, results as JSON + report.

Like :mod:`.fedmm_run`, this module parses no arguments and reads no environment;
the CLI (``fedmm-secure run --model pf-msmtrec``) builds a :class:`RunConfig` and an output
directory. PF-MSMTrec settings live in ``cfg.pf``: the fields of
:class:`~fedmm_secure.federation.pf_msmtrec.PFSettings` plus ``methods`` (a list of
:data:`~fedmm_secure.federation.pf_msmtrec.METHODS`) and ``data`` (overrides of
:class:`~fedmm_secure.data.synthetic_scenarios.ScenarioConfig`, for ``cfg.data == "synthetic"``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import METHODS as FEDMM_METHODS
from ..config import RunConfig, dataclass_from_overrides
from ..data.loaders import load_data
from ..data.market import MarketData
from ..data.synthetic_scenarios import ScenarioConfig, ScenarioSpec, generate_scenarios
from ..errors import ConfigError
from ..federation.pf_msmtrec.client import make_client
from ..federation.pf_msmtrec.driver import run_pf_method, validation_releases
from ..federation.pf_msmtrec.settings import METHODS, STAGE, PFSettings
from ..privacy.run_ledgers import RunLedgers
from ..reports.run_report import write_json_atomic
from ..runtime.embedded import EmbeddedSecureSum

__all__ = ["DEFAULT_METHODS", "pf_settings", "load_scenarios", "run_pf_experiment"]

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("local", "fedavg", "pf_msmtrec", "pf_no_template", "pf_no_fednorm", "pf_no_conflict",
                   "pf_no_personal", "pf_no_tower_personal")
_EXTRA_KEYS = ("methods", "data")
_LEDGER_METHOD = "pf_msmtrec"


def pf_settings(raw: dict) -> tuple[PFSettings, tuple[str, ...] | None, dict]:
    """Validate ``cfg.pf``: returns (settings, methods or None, data overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError("pf", f"must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(PFSettings)}
    kwargs: dict[str, Any] = {}   # values are checked by PFSettings itself
    for k, v in raw.items():
        if k in _EXTRA_KEYS:
            continue
        if k not in known:
            raise ConfigError(f"pf.{k}", "unknown setting", allowed=", ".join(sorted(known | set(_EXTRA_KEYS))))
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
        settings = PFSettings(**kwargs)
    except TypeError as e:
        raise ConfigError("pf", str(e)) from None
    methods = raw.get("methods")
    if methods is not None:
        if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods:
            raise ConfigError("pf.methods", "must be a non-empty list", allowed=", ".join(METHODS))
        for m in methods:
            if m not in METHODS:
                raise ConfigError("pf.methods", f"unknown method {m!r}", allowed=", ".join(METHODS))
        methods = tuple(methods)
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ConfigError("pf.data", "must be a mapping of ScenarioConfig overrides")
    return settings, methods, data


def _scenario_config(overrides: dict) -> ScenarioConfig:
    return dataclass_from_overrides(ScenarioConfig, overrides, prefix="pf.data", nested={"scenarios": ScenarioSpec})


def load_scenarios(cfg: RunConfig, data_overrides: dict) -> list[MarketData]:
    if data_overrides and cfg.data != "synthetic":
        raise ConfigError("pf.data", "scenario generator overrides apply to synthetic data only",
                          allowed="data: synthetic, or no pf.data")
    return load_data(cfg, synthetic=lambda: generate_scenarios(_scenario_config(data_overrides), seed=cfg.seed))


def _methods(cfg: RunConfig, from_pf: tuple[str, ...] | None) -> tuple[str, ...]:
    if from_pf is not None:
        return from_pf
    if tuple(cfg.methods) == tuple(FEDMM_METHODS):  # the RunConfig default: not a PF choice
        return DEFAULT_METHODS
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError("methods", f"unknown method {m!r}", allowed=", ".join(METHODS))
    return tuple(cfg.methods)


def _privacy_session(cfg: RunConfig, settings: PFSettings, markets: list[MarketData], *, ledger, method_index: int,
                     method: str, resume_offset: int = 0, prior_events=None):
    import torch

    from ..privacy.budget import BudgetPolicy
    from ..privacy.session import PrivacySession, plan_markets
    from ..privacy.sparse_noise import sparse_noise_config

    p = cfg.privacy
    plans = plan_markets(unit=cfg.privacy_unit(), batch_size=settings.batch_size, epochs={STAGE: settings.epochs},
                         rounds=cfg.rounds, n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets},
                         n_interactions={m.name: m.train.n_interactions for m in markets},
                         max_steps_per_epoch=settings.max_steps_per_epoch)
    policy = (BudgetPolicy(epsilon_budget=p.epsilon_budget, delta=p.delta, on_exceed=p.on_exceed)  # type: ignore[arg-type]  # validated by PrivacyConfig
              if p.epsilon_budget is not None else None)
    return PrivacySession(unit=cfg.privacy_unit(), delta=p.delta, max_grad_norm=cfg.max_grad_norm(), plans=plans,
                          noise_multiplier=p.noise_multiplier,
                          target_epsilon=p.target_epsilon,
                          accountant=p.accountant, policy=policy, ledger=ledger, ledger_round_offset=resume_offset,
                          prior_events=prior_events, randomness=p.randomness,
                          interactions={m.name: m.train.interaction_ids() for m in markets},
                          noise_seed=cfg.seed * 7_919 + 1_000 + method_index,
                          # Alpha choices and Platt fits on validation rows: planned with training,
                          # the target covers both. A throwaway client gives the block layout.
                          sparse=sparse_noise_config(p),
                          validation_releases={m.name: validation_releases(
                              method, settings, cfg.rounds,
                              make_client(markets[0], settings, METHODS[method], weight=1.0,
                                          generator=torch.Generator().manual_seed(0))) for m in markets})


def run_pf_experiment(cfg: RunConfig, *, out_dir: Path,
                      progress: Callable[[str, float], None] | None = None, resume: bool = False) -> dict:
    """Run every PF-MSMTrec method of ``cfg``; write ``results.json`` and ``report.md``.

    With privacy on, every method trains with DP-SGD under the same settings and each one's events
    go to its ledger (``pf_msmtrec``'s: ``out_dir/ledger.sqlite``; every other method's:
    ``out_dir/baselines/<method>/``) before any round's update leaves the scenarios; results carry
    each scenario's total over all methods. ``resume=True`` reopens those ledgers (the config must match): every
    event already recorded stays spent and new rounds are numbered after it; every method runs
    again from its initial state, as ``fedmm-secure run --resume`` does for FedMM.
    """
    cfg = cfg.resolved()
    settings, pf_methods, data_overrides = pf_settings(cfg.pf)
    methods = _methods(cfg, pf_methods)
    out_dir = Path(out_dir)
    markets = load_scenarios(cfg, data_overrides)   # a bad data path fails before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    ledgers = None
    if cfg.privacy.enabled:
        # Every method trains with DP on the same scenarios: each one's spend goes to its own ledger.
        ledgers = RunLedgers(out_dir, cfg.to_dict(), methods, resume=resume, deployed=_LEDGER_METHOD)
    if resume and not cfg.privacy.enabled:
        raise ConfigError("--resume", "only private runs have a ledger to resume from")
    write_json_atomic(out_dir / "config.json", cfg.to_dict())
    names = [m.name for m in markets]
    results: dict = {
        "config": cfg.to_dict(),
        "model_family": "pf-msmtrec",
        "pf_settings": dataclasses.asdict(settings),
        "methods": list(methods),
        "markets": {m: {} for m in names},
        "market_sizes": {m.name: {"users": m.n_users, "items": m.n_items, "train_rows": len(m.train),
                                  "test_rows": len(m.test), "click_rate": float(m.train.click.mean()),
                                  "ctcvr_rate": float((m.train.click * m.train.conversion).mean())}
                         for m in markets},
        "personalization": {},
        "timing_s": {},
    }
    if cfg.privacy.enabled:
        from ..privacy.randomness import describe
        results["randomness"] = describe(cfg.privacy.randomness)
    secagg: dict = {}
    try:
        for i, method in enumerate(methods):
            t0 = time.perf_counter()
            secure_sum = None
            if METHODS[method].federated:
                secure_sum = EmbeddedSecureSum(backend=cfg.secagg, markets=names, run_id=f"pf-{cfg.seed}-{method}",
                                               allow_insecure=cfg.secagg == "plain")

            def tick(msg: str, i=i, method=method) -> None:
                if progress is not None:
                    progress(f"{method}: {msg}", i / len(methods))

            kwargs = {}
            session = None
            if ledgers is not None:   # ledgers exist iff the run is private
                slot = ledgers.begin(method)
                session = _privacy_session(cfg, settings, markets, ledger=slot.ledger, method_index=i, method=method,
                                           resume_offset=slot.resume_offset, prior_events=slot.prior_events)
                kwargs = {"trainers": session, "hooks": session}
            out = run_pf_method(method, markets, settings, rounds=cfg.rounds, seed=cfg.seed, secure_sum=secure_sum,
                                progress=tick, **kwargs)
            for m, metrics in out["markets"].items():
                results["markets"][m][method] = metrics
            results["personalization"][method] = {
                m: {"alpha_expert": c.history["alpha_expert"], "alpha_tower": c.history["alpha_tower"],
                    "conflicting_blocks": c.history["conflicts"]}
                for m, c in out["clients"].items()}
            if session is not None:
                summary = session.summary()
                if ledgers is not None:
                    ledgers.end(method, summary)
                results.setdefault("privacy_by_method", {})[method] = {m: v["epsilon"] for m, v in summary.items()}
                if method == _LEDGER_METHOD or "privacy" not in results:
                    results["privacy"] = summary
            if secure_sum is not None:
                secagg[method] = secure_sum.summary()
            results["timing_s"][method] = round(time.perf_counter() - t0, 2)
            log.info("%s done in %.1f s", method, results["timing_s"][method])
            if progress is not None:
                progress(f"{method}: done", (i + 1) / len(methods))
        if ledgers is not None:  # the heads and totals travel with the results (see fedmm_run.py)
            ledgers.finish(results, markets=names, accountant=cfg.privacy.accountant, delta=cfg.privacy.delta)
    finally:
        if ledgers is not None:
            ledgers.close()
    results["secagg"] = secagg.get(_LEDGER_METHOD, next(iter(secagg.values()), None))
    results["secagg_by_method"] = secagg
    results.setdefault("privacy", None)
    results["summary"] = {
        meth: {"mean_ctcvr_auc": float(np.nanmean([results["markets"][m][meth]["ctcvr"]["auc"] for m in names])),
               "mean_ctr_auc": float(np.nanmean([results["markets"][m][meth]["ctr"]["auc"] for m in names])),
               "mean_ctcvr_logloss": float(np.mean([results["markets"][m][meth]["ctcvr"]["logloss"] for m in names])),
               "mean_ctr_logloss": float(np.mean([results["markets"][m][meth]["ctr"]["logloss"] for m in names]))}
        for meth in methods
    }
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(render_report(results), encoding="utf-8")
    return results


def render_report(results: dict) -> str:
    methods = results["methods"]
    lines = ["# PF-MSMTrec run", ""]
    priv = results.get("privacy")
    if priv:
        first = next(iter(priv.values()))
        lines.append(f"Privacy: DP-SGD, {first['unit']}-level, delta={first['delta']:g}, accountant "
                     f"{first['accountant']}; epsilon per scenario: "
                     + ", ".join(f"{m} {v['epsilon']:.3f}" for m, v in priv.items()))
        acct = results.get("accounting")
        if acct:   # every method read the same rows: what each scenario's data lost in total
            lines.append(f"Total over every method of the run ({', '.join(methods)}) per scenario: " + ", ".join(
                f"{m} {'inf' if t['infinite'] else format(t['epsilon'], '.3f')}" for m, t in acct["total"].items())
                + f" (the epsilon above is the deployed {acct['deployed_method']} only)")
    else:
        lines.append("Privacy: no DP (epsilon = inf)")
    rnd = results.get("randomness")
    if rnd and not rnd["private"]:
        lines.append(f"DP noise: **{rnd['note']}**")
    sec = results.get("secagg")
    lines.append(f"Secure aggregation: {sec['backend'] if sec else 'none (no federated method)'}")
    if results.get("pf_settings", {}).get("calibrate"):
        lines.append("LogLoss: of the served model, its logits Platt-scaled on the scenario's own validation "
                     "rows (AUC unchanged; `logloss_uncalibrated` in results.json)")
    lines.append("")
    for task in ("ctr", "ctcvr"):
        lines += [f"## {task.upper()} (test AUC / logloss)", "",
                  "| scenario | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for m, per in results["markets"].items():
            lines.append(f"| {m} | " + " | ".join(f"{per[k][task]['auc']:.4f} / {per[k][task]['logloss']:.4f}"
                                                   for k in methods) + " |")
        lines.append("")
    lines += ["## Summary and ablations (mean over scenarios)", "",
              "| method | mean CTCVR AUC | mean CTR AUC | vs pf_msmtrec (CTCVR) |", "|---|---|---|---|"]
    ref = results["summary"].get("pf_msmtrec", {}).get("mean_ctcvr_auc")
    for k in methods:
        s = results["summary"][k]
        diff = f"{s['mean_ctcvr_auc'] - ref:+.4f}" if ref is not None else "n/a"
        lines.append(f"| {k} | {s['mean_ctcvr_auc']:.4f} | {s['mean_ctr_auc']:.4f} | {diff} |")
    lines.append("")
    return "\n".join(lines)
