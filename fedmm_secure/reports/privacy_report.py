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
from pathlib import Path

from ..errors import ConfigError, LedgerError
from .epsilon_plot import plot_epsilon_per_round
from .html_report import write_html_report
from .report_data import NOT_PRIVATE_NOTE as _NOT_PRIVATE
from .report_data import gather_privacy_report
from .report_data import reproducible_noise as _reproducible_noise
from .run_report import write_json_atomic
from .run_verification import RunVerification, ledger_dirs, require_verified_run

__all__ = ["budget_table", "write_privacy_report", "POST_PROCESSING_STEPS", "ACCOUNTED_STEPS"]

ACCOUNTED_STEPS = (
    ("CF embeddings (stage 1)", "reads raw clicks: DP-SGD, one event per market per round"),
    ("CTR model (stage 3)", "reads raw clicks: DP-SGD, one event per market per round"),
)
POST_PROCESSING_STEPS = (
    ("RQ-VAE training on item embeddings (stage 2)", "inputs are the DP-trained CF embeddings"),
    ("level-1 codebook statistics and their secure sum", "computed from DP-trained embeddings"),
    ("averaging of shared parameters through the secure sum", "function of DP-trained parameters"),
    ("item codes fed to the CTR model", "function of the DP-trained RQ-VAE and embeddings"),
)


def _read_ledgers(run_dir: Path, *, delta: float | None = None) -> dict:
    """Ledger directories, spend, epsilon history, rounds, skips and decisions over all of the
    run's ledgers."""
    from ..privacy.ledger import Ledger

    dirs = ledger_dirs(run_dir)
    out: dict = {"dirs": dirs, "spent": {}, "records": [], "rounds": [], "skips": [], "decisions": [],
                 "configs": []}
    for d in dirs:
        with Ledger.open(d) as ledger:
            spent = ledger.spent(delta=delta)
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


def budget_table(run_dir: Path, *, max_epsilon: float, delta: float | None) -> tuple[str, bool]:
    if not (isinstance(max_epsilon, (int, float)) and max_epsilon > 0 and math.isfinite(max_epsilon)):
        raise ConfigError("--max-epsilon", f"must be a finite number > 0, got {max_epsilon!r}")
    verified = require_verified_run(run_dir)
    read = _read_ledgers(run_dir, delta=delta)
    spent = read["spent"]
    if not spent:
        raise LedgerError(f"the ledger(s) of {run_dir} record no DP event")
    lines = ["| market | epsilon | delta | accountant | certified | max | status |", "|---|---|---|---|---|---|---|"]
    ok = True
    for m, rep in spent.items():
        within = rep.epsilon <= max_epsilon
        ok &= within
        lines.append(f"| {m} | {rep.epsilon:.4f} | {rep.delta:g} | {rep.accountant} | {rep.certified} | "
                     f"{max_epsilon:g} | {'OK' if within else 'OVER BUDGET'} |")
    worst = max(r.epsilon for r in spent.values())
    lines.append("")
    if _reproducible_noise(run_dir, read["configs"]):
        ok = False
        lines.append(_NOT_PRIVATE)
    lines += verified.lines()
    lines.append(f"maximum epsilon over markets: {worst:.4f} -> {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


def write_privacy_report(run_dir: Path) -> Path:
    verified = require_verified_run(run_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    priv = results.get("privacy", {})
    read = _read_ledgers(run_dir)
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
        f"- unit of privacy: **{anyp.get('unit', 'record')}**-level",
        f"- delta: {next(iter(spent.values())).delta:g}" if spent else "- delta: n/a",
        f"- accountant: {anyp.get('accountant', 'pld')} ({anyp.get('bound', 'certified upper bound')})",
        f"- budget per market: {budget if budget is not None else 'none set'}",
        f"- secure aggregation: {results.get('secagg', {}).get('backend', 'n/a')}",
        f"- DP randomness: {'**' + _NOT_PRIVATE + '**' if not_private else 'secure (OS-keyed AES-256-CTR)'}",
        "",
        "## Epsilon per market",
        "",
        "| market | epsilon | noise multiplier | clip norm | sample rate | DP steps | budget status |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, rep in spent.items():
        p = priv.get(m, {})
        status = "n/a" if budget is None else ("within" if rep.epsilon <= budget else "OVER")
        lines.append(f"| {m} | {rep.epsilon:.4f} | {p.get('noise_multiplier', float('nan')):.4g} | "
                     f"{p.get('max_grad_norm', float('nan')):g} | {p.get('sample_rate', float('nan')):.4g} | "
                     f"{rep.steps} | {status} |")
    lines += ["", f"![epsilon per round]({plot.name})", "", "## Rounds", "",
              f"{len(rounds)} ledger rounds"
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
    lines += ["## Which steps cost epsilon", "", "| step | accounting |", "|---|---|"]
    lines += [f"| {s} | {why} |" for s, why in ACCOUNTED_STEPS]
    lines += [f"| {s} | post-processing (no epsilon): {why} |" for s, why in POST_PROCESSING_STEPS]
    lines += ["", "Test-set metrics in results.json are computed on held-out data and are not covered by DP.", ""]
    lines += ["Also written: `privacy_report.html` (self-contained, for review and sign-off) and "
              "`privacy_report.json` (every table above, per round and per market, machine-readable).", ""]
    path = run_dir / "privacy_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
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
