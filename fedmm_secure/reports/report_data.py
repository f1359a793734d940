"""Everything a privacy report shows, gathered once from a verified run directory as plain data.

:func:`gather_privacy_report` is the single source for ``privacy_report.json``, the HTML report
and the epsilon plot, so the three can not disagree. Per-round rows come from the ledger (the
source of truth); results.json only adds labels the ledger does not hold (the stage of each
round, per-method epsilons, the secure-aggregation backend). Audit files found in the run
directory are summarised as they are: they are not covered by the hash chain, and the report
says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..privacy.ledger import Ledger
from ..errors import LedgerError
from .run_totals import read_run_ledgers
from .run_verification import RunVerification, ledger_dirs

__all__ = ["REPORT_KIND", "gather_privacy_report", "find_audits", "reproducible_noise", "NOT_PRIVATE_NOTE",
           "NOT_SECURE_NOTE"]

REPORT_KIND = "fedmm_secure.privacy_report"
NOT_PRIVATE_NOTE = ("NOT PRIVATE: DP noise reproducible from the seed (privacy.randomness: reproducible); "
                    "the epsilon above is not a guarantee")
NOT_SECURE_NOTE = "NOT SECURE: plain aggregation, the aggregator saw every market's upload"
# Audit JSON larger than this is not an audit summary (those are a few hundred KB at most).
_MAX_AUDIT_BYTES = 8 * 1024 * 1024
_OWN_FILES = {"results.json", "config.json", "privacy_report.json"}


def reproducible_noise(run_dir: Path, ledger_configs: list[Any]) -> bool:
    """True when the run drew its DP noise from seeded generators (``privacy.randomness``), by
    config.json or by the configuration a ledger's first entry commits to (config.json is not
    covered by the hash chain; editing it must not turn a NOT PRIVATE run into a PASS)."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}  # runs without a config.json predate the setting, whose only value was seeded
    return any(isinstance(c, dict) and isinstance(c.get("privacy"), dict)
               and c["privacy"].get("randomness") == "reproducible" for c in [cfg, *ledger_configs])


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _stage_of(round_id: int, market: str, privacy: Mapping, run_config: Mapping) -> str:
    """The stage label of a ledger round: as results.json records it, else inferred from the
    configuration the ledger commits to (FedMM's joint design runs CTR rounds only, the staged
    design CF rounds then CTR rounds; valid only for a
    run that was never resumed, which the caller checks), else unknown."""
    stages = privacy.get(market, {}).get("round_stages") if isinstance(privacy.get(market), Mapping) else None
    if isinstance(stages, Mapping) and isinstance(stages.get(str(round_id)), str):
        return stages[str(round_id)]
    rounds = run_config.get("rounds") if isinstance(run_config, Mapping) else None
    if isinstance(rounds, int) and rounds > 0 and run_config.get("model_family", "fedmm") == "fedmm":
        model = run_config.get("model") if isinstance(run_config.get("model"), Mapping) else {}
        # Joint design: CTR rounds only. Configs written before the design setting existed
        # were staged runs: CF rounds, then CTR rounds.
        if model.get("design", "staged") == "joint":
            return "ctr" if round_id < rounds else "unknown"
        return "cf" if round_id < rounds else "ctr" if round_id < 2 * rounds else "unknown"
    return "unknown"


def _ledger_rows(led: Ledger, rel: str, privacy: Mapping, method: str) -> list[dict]:
    """One row per (round, market) the ledger holds: stage, status, DP event parameters,
    epsilon after the round and the budget decision, tagged with the ledger's method."""
    rounds = {r.round: r for r in led.rounds()}
    events: dict[tuple[int, str], list] = {}
    for e in led.event_records():
        events.setdefault((e.round, e.market), []).append(e.event)
    eps = {(r.round, r.market): r for r in led.epsilons()}
    decisions = {(d.round, d.market): d for d in led.decisions()}
    skips = {(r, m): why for r, m, why in led.skips()}
    # Inference from the configuration only holds when round ids start at 0 with no gaps.
    cfg = led.run_config if sorted(rounds) == list(range(len(rounds))) else {}
    rows = []
    for rid in sorted(rounds):
        rec = rounds[rid]
        markets = sorted(set(rec.participants) | {m for r, m in [*events, *eps, *decisions] if r == rid})
        for m in markets:
            evs = events.get((rid, m), [])
            dec = decisions.get((rid, m))
            e = eps.get((rid, m))
            refused = (dec is not None and not dec.allowed) or (rid, m) in skips
            rows.append({
                "method": method, "ledger": rel, "round": rid, "stage": _stage_of(rid, m, privacy, cfg), "market": m,
                "round_status": rec.status,
                "sample_rate": sorted({ev.sample_rate for ev in evs}),
                "noise_multiplier": sorted({ev.noise_multiplier for ev in evs}),
                "steps": sum(ev.steps for ev in evs),
                "unit": sorted({ev.unit for ev in evs}),
                "epsilon_after": None if e is None else e.epsilon,
                "decision": None if dec is None else {
                    "allowed": dec.allowed, "epsilon_if_run": _finite(dec.epsilon_if_run),
                    "epsilon_budget": _finite(dec.epsilon_budget), "reason": dec.reason},
                "refused": refused,
                "refusal_reason": skips.get((rid, m)) or (dec.reason if refused and dec is not None else None),
            })
    return rows


def _ledger_status(run_dir: Path, verified: RunVerification) -> list[dict]:
    return [{"path": c.path, "ok": c.verification.ok, "entries": c.verification.entries,
             "head_hash": c.verification.head_hash, "run_id": c.verification.run_id,
             "signed": c.verification.signed, "signatures_checked": c.verification.signatures_checked,
             "anchored": c.verification.anchored, "summary": c.verification.describe()}
            for c in verified.ledgers]


def _audit_summary(path: Path, run_dir: Path, payload: Mapping) -> dict:
    audited = payload.get("audited") if isinstance(payload.get("audited"), Mapping) else {}
    ctx = audited.get("markets") if isinstance(audited.get("markets"), Mapping) else {}
    results = []
    for r in payload.get("results", []):
        if not isinstance(r, Mapping):
            continue
        bound = r.get("epsilon_lower_bound")
        lower = bound.get("epsilon_lower_bound") if isinstance(bound, Mapping) else bound
        market_ctx = ctx.get(r.get("market")) if isinstance(ctx.get(r.get("market")), Mapping) else {}
        results.append({"market": str(r.get("market")), "attack": str(r.get("attack")),
                        "auc": _finite(r.get("auc")), "epsilon_lower_bound": _finite(lower),
                        "accountant_epsilon": _finite(r.get("accountant_epsilon")),
                        "run_epsilon_whole_run": _finite(market_ctx.get("run_epsilon_whole_run")),
                        "violation": bool(r.get("violation")), "verdict": str(r.get("verdict", ""))})
    return {"file": path.relative_to(run_dir).as_posix(), "attack": str(payload.get("attack", "")),
            "delta": _finite(payload.get("delta")), "confidence": _finite(payload.get("confidence")),
            "quick": payload.get("quick"), "any_violation": bool(payload.get("any_violation")),
            "results": results}


def find_audits(run_dir: Path) -> list[dict]:
    """Audit reports in the run directory (what ``fedmm-secure audit DIR`` writes, wherever its
    ``--out`` put it inside DIR, or any ``audit*.json``), summarised: per market and attack the
    empirical epsilon lower bound and the accountant epsilon it is held against (its ceiling)."""
    found = []
    for path in sorted(run_dir.rglob("*.json")):
        if path.name in _OWN_FILES and path.parent == run_dir:
            continue
        try:
            if path.stat().st_size > _MAX_AUDIT_BYTES:
                continue
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict):
            continue
        if payload.get("kind") == "fedmm_secure.audit_report" or (
                path.name.startswith("audit") and isinstance(payload.get("results"), list)):
            found.append(_audit_summary(path, run_dir, payload))
    return found


def gather_privacy_report(run_dir: Path, verified: RunVerification) -> dict:
    """All of a run's privacy report as JSON-ready data. ``verified`` is the passed
    :func:`~.run_verification.verify_run` of ``run_dir``: nothing is gathered from a ledger
    that failed it."""
    if not verified.ok:
        raise ValueError("gather_privacy_report needs a verified run")
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    privacy = results.get("privacy") if isinstance(results.get("privacy"), Mapping) else {}
    accounting = results.get("accounting") if isinstance(results.get("accounting"), Mapping) else {}
    per_method = accounting.get("methods") if isinstance(accounting.get("methods"), Mapping) else {}
    total = accounting.get("total") if isinstance(accounting.get("total"), Mapping) else {}
    lset = read_run_ledgers(run_dir, ledger_dirs(run_dir))
    # Every DP method's ledger, the deployed method's first: each row says whose round it is.
    files = [(lset.deployed, f) for f in lset.deployed_files] + list(lset.baseline_files.items())
    rows: list[dict] = []
    spent: dict[str, dict] = {}                       # the deployed method's spend per market
    by_method: dict[str, dict[str, dict]] = {}        # market -> method -> that ledger's spend
    configs: list[Any] = []
    for method, f in files:
        rel = f.relative_to(run_dir).as_posix()
        entry = per_method.get(method) if isinstance(per_method.get(method), Mapping) else {}
        labels = privacy if method == lset.deployed else \
            (entry.get("privacy") if isinstance(entry.get("privacy"), Mapping) else {})
        with Ledger.open(f) as led:
            rows += _ledger_rows(led, rel, labels, method)
            for m, rep in led.spent(composed=verified.composed).items():
                if method == lset.deployed:
                    # Flower: one deployed ledger per market; two holding one market is not a run.
                    if m in spent:
                        raise LedgerError(f"market {m!r} appears in more than one of {lset.deployed}'s ledgers")
                    spent[m] = rep.to_dict()
                by_method.setdefault(m, {})[method] = {"epsilon": rep.epsilon, "steps": rep.steps, "ledger": rel}
            configs.append(led.run_config)
    order = {meth: i for i, meth in enumerate(dict.fromkeys(meth for meth, _ in files))}
    # Grouped for a reader: per method (deployed first), then market, then round.
    rows.sort(key=lambda r: (order[r["method"]], r["market"], r["round"]))
    budget = next((_finite(v.get("budget")) for v in privacy.values()
                   if isinstance(v, Mapping) and _finite(v.get("budget")) is not None), None)
    markets = {}
    for m, rep in spent.items():
        p = privacy.get(m) if isinstance(privacy.get(m), Mapping) else {}
        mine = [r for r in rows if r["market"] == m and r["method"] == lset.deployed]
        t = total.get(m) if isinstance(total.get(m), Mapping) else {}
        markets[m] = {**rep, "method": lset.deployed, "unit": p.get("unit", "record"),
                      "noise_multiplier": _finite(p.get("noise_multiplier")),
                      "max_grad_norm": _finite(p.get("max_grad_norm")), "sample_rate": _finite(p.get("sample_rate")),
                      "budget": budget,
                      "budget_status": "none set" if budget is None else
                      ("within" if rep["epsilon"] <= budget else "OVER BUDGET"),
                      "rounds": len(mine), "refused_rounds": [r["round"] for r in mine if r["refused"]],
                      # Over every method trained on this market's data (results.json's accounting,
                      # checked against the ledgers by verify_run); absent for a one-method run.
                      "total_epsilon": _finite(t.get("epsilon")) if t else rep["epsilon"],
                      "total_infinite": bool(t.get("infinite")) if t else False,
                      "by_method": by_method.get(m, {})}
    units = sorted({v["unit"] for v in markets.values()}) or ["record"]
    deltas = sorted({v["delta"] for v in markets.values()})
    not_private = reproducible_noise(run_dir, configs)
    sec = results.get("secagg") if isinstance(results.get("secagg"), Mapping) else {}
    backend = str(sec.get("backend", "n/a"))
    secure = bool(sec.get("secure", backend not in ("plain", "n/a"))) and backend != "plain"
    by_method = results.get("privacy_by_method") if isinstance(results.get("privacy_by_method"), Mapping) else {}
    totals = {k: v for k, v in results.items() if k.startswith("privacy_total")}
    return {
        "kind": REPORT_KIND, "version": 1, "run_dir": run_dir.resolve().name,
        "verification": {"ok": verified.ok, "ledgers": _ledger_status(run_dir, verified)},
        "unit": units[0] if len(units) == 1 else units, "delta": deltas[0] if len(deltas) == 1 else deltas,
        "accountant": {"name": ", ".join(sorted({v["accountant"] for v in markets.values()})) or "n/a",
                       "certified": all(v["certified"] for v in markets.values()) if markets else False,
                       "bound": ", ".join(sorted({v["bound"] for v in markets.values()})) or "n/a"},
        "budget": budget,
        "deployed_method": lset.deployed,
        "methods": list(order),
        "randomness": {"private": not not_private,
                       "source": "reproducible" if not_private else "secure",
                       "note": NOT_PRIVATE_NOTE if not_private else "secure (OS-keyed AES-256-CTR)"},
        "secure_aggregation": {"backend": backend, "secure": secure,
                               "note": NOT_SECURE_NOTE if backend == "plain" else
                               "secure sum: no party sees another market's upload" if secure else "n/a"},
        "markets": markets,
        "rounds": rows,
        "privacy_by_method": json.loads(json.dumps(by_method)),
        "privacy_totals": json.loads(json.dumps(totals)),
        # Each market's spend over every method trained on its data (results.json's accounting
        # section, when the run wrote one), next to the deployed method's.
        "total_across_methods": {
            "deployed_method": accounting.get("deployed_method"),
            "markets": {str(m): dict(v) for m, v in total.items() if isinstance(v, Mapping)}},
        "audits": find_audits(run_dir),
    }
