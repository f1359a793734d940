"""Compliance outputs from a run directory: the budget gate and the privacy report (Markdown,
plus the same content as self-contained HTML and as JSON: :mod:`.html_report`, :mod:`.report_data`).

The ledger is the source of truth: epsilon is recomputed from the DP events it holds (rounds cut
short by a crash included), never copied from results.json, so a report can not under-state
what was spent. Neither output is produced from a ledger that fails verification
(:mod:`.run_verification`: hash chain, head against results.json, epsilons against the events).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError, LedgerError
from ..primitives.keys import IdentityPublicKey
from ..privacy.totals import MarketTotal
from .epsilon_plot import plot_epsilon_per_round
from .html_report import write_html_report
from .report_data import NOT_PRIVATE_NOTE as _NOT_PRIVATE
from .report_data import gather_privacy_report
from .report_data import reproducible_noise as _reproducible_noise
from .run_report import write_json_atomic
from .run_totals import RunLedgerSet, describe_total, read_run_ledgers, run_totals
from .run_verification import RunVerification, ledger_dirs, require_verified_run

__all__ = ["SCOPES", "budget_table", "write_privacy_report", "POST_PROCESSING_STEPS", "ACCOUNTED_STEPS"]

ACCOUNTED_STEPS = (
    ("CTR model (joint design: the only raw-data stage; staged design: stage 3)",
     "reads raw clicks: DP-SGD, one event per market per round"),
    ("CF embeddings (staged design only, stage 1)", "reads raw clicks: DP-SGD, one event per market per round"),
    ("CTR model selection on validation rows (stage CTR-SELECT; off with model.select_by_validation: false)",
     "reads validation rows: one Gaussian release of a Brier-score difference per comparison (q = 1), "
     "one ledger round per market and comparison"),
    ("per-product weights of the shared-key average (stage KEY-COUNTS; fedavg and fedmm with model.key_weights: counts)",
     "reads training rows: one Gaussian release of each shared product's interaction count (q = 1), "
     "one ledger round per market"),
    ("Platt calibration of the served CTR logits on validation rows (stage CALIBRATE; off with model.calibrate: false)",
     "reads validation rows: noisy Newton steps, one Gaussian release each (q = 1), one ledger round per market"),
    ("PF-MSMTrec alpha choice and checkpoint selection on validation rows (stages PF-ALPHA, PF-SELECT; "
     "calibration: CALIBRATE-CTR, CALIBRATE-CTCVR)",
     "reads validation rows: one Gaussian release of a Brier score per grid value (q = 1), one for "
     "the final round's checkpoint comparison"),
)
POST_PROCESSING_STEPS = (
    ("RQ-VAE training on item embeddings (stage 2)", "inputs are the DP-trained CF embeddings"),
    ("level-1 codebook statistics and their secure sum", "computed from DP-trained embeddings"),
    ("averaging of shared parameters through the secure sum", "function of DP-trained parameters"),
    ("joint design: row-wise averaging of shared-key rows, codes from the CTR model's embeddings",
     "function of DP-trained parameters and the public catalogue"),
    ("item codes fed to the CTR model", "function of the DP-trained RQ-VAE and embeddings"),
)


def _read_ledgers(run_dir: Path, verified: RunVerification, *, delta: float | None = None) -> dict:
    """Ledger directories, spend, epsilon history, rounds, skips and decisions over all of the
    run's ledgers (the spend from the accountants ``verified`` already composed)."""
    from ..privacy.ledger import Ledger

    dirs = ledger_dirs(run_dir)
    out: dict = {"dirs": dirs, "spent": {}, "records": [], "rounds": [], "skips": [], "decisions": [],
                 "configs": []}
    for d in dirs:
        with Ledger.open(d) as ledger:
            spent = ledger.spent(delta=delta, composed=verified.composed)
            clash = set(spent) & set(out["spent"])
            if clash:
                raise LedgerError(f"market(s) {sorted(clash)} appear in more than one ledger under {run_dir}")
            out["spent"].update(spent)
            out["records"] += ledger.epsilons()
            out["rounds"] += ledger.rounds()
            out["skips"] += ledger.skips()
            out["decisions"] += ledger.decisions()
            out["configs"].append(ledger.run_config)
    return out


SCOPES = ("total", "deployed")


def _totals(run_dir: Path, read: dict, verified: RunVerification, *,
            delta: float | None) -> tuple[RunLedgerSet, dict[str, MarketTotal]]:
    lset = read_run_ledgers(run_dir, read["dirs"])
    return lset, run_totals(lset, delta=delta, composed=verified.composed)


def budget_table(run_dir: Path, *, max_epsilon: float, delta: float | None,
                 scope: str = "total", public_keys: Mapping[str, IdentityPublicKey] | None = None
                 ) -> tuple[str, bool]:
    """Gate on ``scope``: ``total`` (default) -- each market's spend over every method the run
    trained on its data, infinite when a non-private method ran; ``deployed`` -- the deployed
    method's own spend only (what the model that leaves the run cost, not what the data lost).
    ``public_keys``: ledger path (relative to ``run_dir``) -> the market's identity key, whose
    signatures on that ledger's heads must then verify (:func:`.run_verification.verify_run`)."""
    if not (isinstance(max_epsilon, (int, float)) and max_epsilon > 0 and math.isfinite(max_epsilon)):
        raise ConfigError("--max-epsilon", f"must be a finite number > 0, got {max_epsilon!r}")
    if scope not in SCOPES:
        raise ConfigError("--scope", f"unknown scope {scope!r}", allowed=", ".join(SCOPES))
    verified = require_verified_run(run_dir, public_keys=public_keys)
    read = _read_ledgers(run_dir, verified, delta=delta)
    spent = read["spent"]
    if not spent:
        raise LedgerError(f"the ledger(s) of {run_dir} record no DP event")
    lset, totals = _totals(run_dir, read, verified, delta=delta)
    lines = ["| market | deployed epsilon | total epsilon | unit | delta | accountant | certified | max | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    ok = True
    checked: dict[str, float] = {}
    for m in sorted(set(spent) | set(totals)):
        rep, tot = spent.get(m), totals.get(m)
        eps = (tot.epsilon if tot is not None else rep.epsilon) if scope == "total" else \
            (rep.epsilon if rep is not None else 0.0)
        checked[m] = eps
        within = eps <= max_epsilon
        ok &= within
        ref = rep or tot
        lines.append(f"| {m} | {'-' if rep is None else f'{rep.epsilon:.4f}'} | "
                     f"{'-' if tot is None else describe_total(tot)} | {tot.unit if tot else '-'} | "
                     f"{ref.delta:g} | {ref.accountant} | {ref.certified} | {max_epsilon:g} | "
                     f"{'OK' if within else 'OVER BUDGET'} |")
    worst = max(checked.values())
    lines.append("")
    if scope == "total":
        lines.append(f"checked: the TOTAL spent on each market's data by every method of the run "
                     f"({', '.join(lset.methods)}; deployed: {lset.deployed}), composed with the run's accountant")
        if lset.non_private:
            lines.append(f"{', '.join(lset.non_private)} read every market's raw rows without DP: total epsilon = inf")
    else:
        lines.append(f"checked: the DEPLOYED method's own spend only ({lset.deployed}); the run's total over "
                     f"{', '.join(lset.methods)} is in the 'total epsilon' column and is NOT gated")
    if _reproducible_noise(run_dir, read["configs"]):
        ok = False
        lines.append(_NOT_PRIVATE)
    lines += verified.lines()
    lines.append(f"maximum {scope} epsilon over markets: {'inf' if math.isinf(worst) else f'{worst:.4f}'} -> "
                 f"{'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


_UNIT_MEANING = {
    "record": "one training row",
    "interaction": "one interaction: its positive row and every negative sampled for it",
    "user": "all rows of one user",
}


def _total_section(run_dir: Path, read: dict, verified: RunVerification) -> list[str]:
    """Deployed epsilon next to the total over every method the run trained on the same data."""
    lset, totals = _totals(run_dir, read, verified, delta=None)
    spent = read["spent"]
    out = ["", "## Total spent on each market's data", "",
           f"The run trained {', '.join(lset.methods)} on the same markets; the deployed model is "
           f"**{lset.deployed}**. Every DP method's events are on a ledger; the total composes all of them "
           "with the run's accountant (what the market's data has lost, whatever the model shipped).", ""]
    if lset.non_private:
        out += [f"**{', '.join(lset.non_private)} read every market's raw rows without DP: the total epsilon is "
                "infinite on every market.** Drop it from `methods` for a run whose data stays private.", ""]
    out += ["| market | deployed epsilon | total epsilon | DP steps per method |", "|---|---|---|---|"]
    for m, t in totals.items():
        rep = spent.get(m)
        steps = ", ".join(f"{k}: {v}" for k, v in t.by_method) or "-"
        out.append(f"| {m} | {'-' if rep is None else f'{rep.epsilon:.4f}'} | {describe_total(t)} | {steps} |")
    return out


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _round_table(rows: list[dict]) -> list[str]:
    """Every ledger's rounds (each DP method's), grouped by method, then market, then round."""
    out = ["Every DP method's ledger, round by round (grouped by method, then market):", "",
           "| method | ledger | market | round | stage | status | q | sigma | steps | unit | epsilon after | "
           "decision | refusal |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["decision"]
        decision = "-" if d is None else ("allowed" if d["allowed"] else "REFUSED") + \
            f" (would reach {_fmt(d['epsilon_if_run'])} / budget {_fmt(d['epsilon_budget'], 'g')})"
        cells = [r["method"], f"`{r['ledger']}`", r["market"], str(r["round"]), r["stage"].upper(),
                 r["round_status"], ", ".join(f"{x:.4g}" for x in r["sample_rate"]) or "-",
                 ", ".join(f"{x:.4g}" for x in r["noise_multiplier"]) or "-", str(r["steps"]),
                 ", ".join(r["unit"]) or "-", _fmt(r["epsilon_after"]), decision,
                 (r["refusal_reason"] or "").replace("|", "\\|")]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def write_privacy_report(run_dir: Path, *,
                         public_keys: Mapping[str, IdentityPublicKey] | None = None) -> Path:
    verified = require_verified_run(run_dir, public_keys=public_keys)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    priv = results.get("privacy", {})
    read = _read_ledgers(run_dir, verified)
    not_private = _reproducible_noise(run_dir, read["configs"])
    spent, rounds = read["spent"], read["rounds"]
    skips, decisions = read["skips"], read["decisions"]
    budget = next((v.get("budget") for v in priv.values() if v.get("budget") is not None), None)
    plot = run_dir / "epsilon_per_round.png"
    data = _report_data(run_dir, verified)
    png = plot_epsilon_per_round(data, plot)
    anyp = next(iter(priv.values()), {})
    lines = [
        "# Privacy report",
        "",
        f"Run directory: `{run_dir}`. Source of truth: "
        + ", ".join(f"`{(d / 'ledger.sqlite').relative_to(run_dir)}`" for d in read["dirs"])
        + " (append-only, hash-chained; epsilon below is recomputed from the DP events, including any round cut "
        "short by a crash).",
        "",
        *[f"- {line}" for line in verified.lines()],
        f"- unit of privacy: **{anyp.get('unit', 'record')}**-level ({_UNIT_MEANING.get(anyp.get('unit', 'record'), '')})",
        f"- delta: {next(iter(spent.values())).delta:g}" if spent else "- delta: n/a",
        f"- accountant: {anyp.get('accountant', 'pld')} ({anyp.get('bound', 'certified upper bound')})",
        f"- budget per market: {budget if budget is not None else 'none set'}",
        f"- secure aggregation: {results.get('secagg', {}).get('backend', 'n/a')}",
        f"- DP randomness: {'**' + _NOT_PRIVATE + '**' if not_private else 'secure (OS-keyed AES-256-CTR)'}",
        "",
        "## Epsilon per market",
        "",
        f"Epsilon, noise, rate, steps and status: the deployed method (**{data['deployed_method']}**); "
        "total: over every method the run trained on the market's data; per method: each method's own ledger.",
        "",
        f"| market | epsilon ({data['deployed_method']}) | total epsilon (all methods) | epsilon per method | "
        "noise multiplier | clip norm | sample rate | DP steps | budget status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, rep in spent.items():
        p = priv.get(m, {})
        row = data["markets"].get(m, {})
        status = "n/a" if budget is None else ("within" if rep.epsilon <= budget else "OVER")
        total = "inf" if row.get("total_infinite") else _fmt(row.get("total_epsilon"))
        per = ", ".join(f"{k}: {_fmt(v.get('epsilon'))}" for k, v in (row.get("by_method") or {}).items()) or "-"
        lines.append(f"| {m} | {rep.epsilon:.4f} | {total} | {per} | {p.get('noise_multiplier', float('nan')):.4g} | "
                     f"{p.get('max_grad_norm', float('nan')):g} | {p.get('sample_rate', float('nan')):.4g} | "
                     f"{rep.steps} | {status} |")
    lines += _total_section(run_dir, read, verified)
    lines += ["", f"![epsilon per round]({plot.name})", "", "## Rounds", "",
              f"{data['deployed_method']}: {len(rounds)} ledger rounds"
              + (f" (summed over {len(read['dirs'])} ledgers); " if len(read["dirs"]) > 1 else "; ")
              + f"{sum(r.status == 'committed' for r in rounds)} committed, "
              f"{sum(r.status == 'started' for r in rounds)} started but not committed (counted as spent), "
              f"{sum(r.status == 'skipped' for r in rounds)} skipped.", ""]
    if skips:
        lines += ["Markets that skipped a round because of the budget:", ""]
        lines += [f"- round {r}, {m}: {why}" for r, m, why in skips]
        lines.append("")
    if decisions:
        refused = [d for d in decisions if not d.allowed]
        lines.append(f"Budget decisions recorded: {len(decisions)} ({len(refused)} refused).")
        lines.append("")
    lines += _round_table(data["rounds"])
    lines += ["## Which steps cost epsilon", "", "| step | accounting |", "|---|---|"]
    lines += [f"| {s} | {why} |" for s, why in ACCOUNTED_STEPS]
    lines += [f"| {s} | post-processing (no epsilon): {why} |" for s, why in POST_PROCESSING_STEPS]
    lines += ["", "Test-set metrics in results.json are computed on held-out data and are not covered by DP.", ""]
    lines += ["Also written: `privacy_report.html` (self-contained, for review and sign-off) and "
              "`privacy_report.json` (every table above, per round and per market, machine-readable).", ""]
    path = run_dir / "privacy_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    lset, totals = _totals(run_dir, read, verified, delta=None)
    # Strict JSON: an infinite total is null with "infinite": true.
    data["total_per_market"] = {
        "deployed_method": lset.deployed, "methods": list(lset.methods), "non_private_methods": list(lset.non_private),
        "markets": {k: {"epsilon": None if t.infinite else t.epsilon, "infinite": t.infinite,
                        "deployed_epsilon": spent[k].epsilon if k in spent else None,
                        "dp_steps_by_method": dict(t.by_method)} for k, t in totals.items()}}
    write_json_atomic(run_dir / "privacy_report.json", data)
    write_html_report(data, png, run_dir / "privacy_report.html", generated_by=f"fedmm-secure {_version()}")
    return path


def _report_data(run_dir: Path, verified: RunVerification) -> dict:
    """What the HTML and JSON reports show: the gathered run data plus this module's list of which
    steps cost epsilon, with non-finite numbers as null (strict JSON has no NaN or Infinity)."""
    data = gather_privacy_report(run_dir, verified)
    data["accounting_steps"] = {"accounted": [list(s) for s in ACCOUNTED_STEPS],
                                "post_processing": [list(s) for s in POST_PROCESSING_STEPS]}
    return json.loads(json.dumps(data, default=str), parse_constant=lambda _: None)


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("fedmm-secure")
    except metadata.PackageNotFoundError:
        return "0+unknown"
