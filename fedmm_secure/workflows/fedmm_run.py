"""One FedMM run: every requested method on the same markets, results as JSON plus a report.

This module does no argument parsing and reads no environment; the CLI builds a
:class:`~fedmm_secure.config.RunConfig` and hands over an output directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from ..config import REFERENCE_METHODS, SHARING_METHODS, RunConfig
from ..data.loaders import load_data
from ..federation.fedmm.driver import check_reference, run_method
from ..federation.fedmm.privacy import privacy_session
from ..privacy.run_ledgers import RunLedgers
from ..reports.run_report import write_json_atomic, write_run_report
from ..runtime.embedded import EmbeddedSecureSum

__all__ = ["run_experiment"]

log = logging.getLogger(__name__)


def run_experiment(cfg: RunConfig, *, out_dir: Path, progress: Callable[[str, float], None] | None = None,
                   resume: bool = False) -> dict:
    """Run every method of ``cfg``; write ``results.json`` and ``report.md`` into ``out_dir``.

    With privacy on, every DP method's events go to its ledger (``fedmm``'s: ``out_dir/ledger.sqlite``;
    each baseline's: ``out_dir/baselines/<method>/``) before any round's result leaves the markets.
    ``resume=True`` reopens those ledgers (the config must match): every event already recorded, including those of a round cut short by a crash,
    stays spent, and new rounds are numbered after it. Models restart from their initial state.
    """
    cfg = cfg.resolved()
    markets = load_data(cfg)   # a bad data path fails before anything is written
    for method in cfg.methods:   # so does a reference these markets or this model cannot run
        if method in REFERENCE_METHODS:
            check_reference(method, markets, cfg.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every DP method gets its own ledger (baselines read the same raw rows as the deployed method).
    ledgers = RunLedgers(out_dir, cfg.to_dict(), cfg.methods, resume=resume) if cfg.privacy.enabled else None
    write_json_atomic(out_dir / "config.json", cfg.to_dict())
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
        from ..privacy.randomness import describe
        results["randomness"] = describe(cfg.privacy.randomness)
    steps_total = len(cfg.methods)
    secagg_summary = None
    for i, method in enumerate(cfg.methods):
        t0 = time.perf_counter()
        secure_sum = None
        if method in SHARING_METHODS:
            secure_sum = EmbeddedSecureSum(backend=cfg.secagg, markets=names, run_id=f"run-{cfg.seed}",
                                           allow_insecure=cfg.secagg == "plain")

        def tick(msg: str, i=i, method=method) -> None:
            if progress is not None:
                progress(f"{method}: {msg}", i / steps_total)

        session = None
        kwargs: dict[str, Any] = {}
        if ledgers is not None and method != "centralized":   # ledgers exist iff the run is private
            slot = ledgers.begin(method)
            session = privacy_session(cfg, markets, method=method, ledger=slot.ledger, resume_offset=slot.resume_offset,
                                      prior_events=slot.prior_events, method_index=i)
            kwargs = {"trainers": session, "hooks": session}
        out = run_method(method, markets, cfg.model, rounds=cfg.rounds, seed=cfg.seed, secure_sum=secure_sum,
                         progress=tick, **kwargs)
        if session is not None:
            summary = session.summary()
            if ledgers is not None:
                ledgers.end(method, summary)
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
        log.info("%s done in %.1f s", method, results["timing_s"][method])
        if progress is not None:
            progress(f"{method}: done", (i + 1) / steps_total)
    if secagg_summary is not None:
        results["secagg"] = secagg_summary
    bayes = {m.name: float(roc_auc_score(m.test.click, m.meta["test_p_click"])) for m in markets
             if "test_p_click" in m.meta and 0 < m.test.click.sum() < len(m.test)}
    if bayes:
        # Evaluation only: the true click probabilities' AUC on the same test rows (the ceiling).
        results["reference"] = {"bayes": bayes}
    sparse = [m for m in names if m != names[0]] if cfg.data == "synthetic" else names
    results["summary"] = {
        meth: {"mean_auc": float(np.nanmean([results["markets"][m][meth]["auc"] for m in names])),
               "mean_auc_sparse": float(np.nanmean([results["markets"][m][meth]["auc"] for m in sparse]))}
        for meth in cfg.methods
    }
    if ledgers is not None:
        # The ledgers' heads travel with the results (without this copy, removing a ledger's
        # last rows could not be detected), with each market's total over every method.
        ledgers.finish(results, markets=names, accountant=cfg.privacy.accountant, delta=cfg.privacy.delta)
    write_json_atomic(out_dir / "results.json", results)
    write_run_report(results, out_dir)
    return results
