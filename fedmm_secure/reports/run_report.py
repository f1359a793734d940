"""Run results for machines (results.json) and people (report.md plus a PNG plot)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["write_json_atomic", "markdown_table", "write_run_report", "plot_auc"]


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}"


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    lines = ["| market | " + " | ".join(f"{m} AUC | {m} LogLoss" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    for market, per in results["markets"].items():
        cells = []
        for m in methods:
            r = per.get(m, {})
            cells += [_fmt(r.get("auc")), _fmt(r.get("logloss"))]
        lines.append(f"| {market} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_auc(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    markets = list(results["markets"])
    methods = results["methods"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(markets), 3.6))
    x = np.arange(len(markets))
    for i, meth in enumerate(methods):
        vals = [results["markets"][mk].get(meth, {}).get("auc", float("nan")) for mk in markets]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=meth)
    ax.set_xticks(x)
    ax.set_xticklabels(markets)
    ax.set_ylabel("test AUC")
    lo = min((v.get("auc", 1) for per in results["markets"].values() for v in per.values()
              if isinstance(v, dict) and v.get("auc") == v.get("auc")), default=0.5)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend(fontsize=8, ncol=len(methods))
    ax.set_title("AUC per market and method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_report(results: dict, out_dir: Path) -> Path:
    plot = out_dir / "auc_per_market.png"
    plot_auc(results, plot)
    sec = results.get("secagg", {})
    lines = [
        "# fedmm-secure run report",
        "",
        f"- data: `{results['config']['data']}`, seed {results['config']['seed']}, "
        f"{results['config']['rounds']} federated rounds per stage",
        f"- secure aggregation: **{sec.get('backend', 'n/a')}**"
        + ("" if sec.get("secure", True) else " (**NOT SECURE**: the aggregator saw every market's upload)"),
    ]
    if sec:
        lines.append(f"- max |secure sum - plain sum|: {sec.get('max_abs_error_vs_plain', 0):.3g}")
    priv = results.get("privacy")
    if priv:
        lines.append("- privacy: " + ", ".join(
            f"{m}: eps={v['epsilon']:.3g} ({v['unit']}-level, delta={v['delta']:g})" for m, v in priv.items())
            + (f" (deployed method {results['accounting']['deployed_method']} only)" if results.get("accounting") else ""))
    else:
        lines.append("- privacy: **no DP** (epsilon = infinity)")
    acct = results.get("accounting")
    if priv and acct:
        # The deployed model's epsilon is not what the data lost: every method read the same rows.
        def total(t: dict) -> str:
            return "**inf**" if t.get("infinite") else f"{t['epsilon']:.3g}"
        lines.append(f"- privacy, total over every method of the run ({', '.join(results.get('methods', []))}) "
                     f"per market: " + ", ".join(f"{m}: eps={total(t)}" for m, t in acct.get("total", {}).items()))
        if acct.get("total_is_infinite"):
            lines.append("- **the total epsilon is infinite**: the non-private `centralized` baseline read every "
                         "market's raw rows")
    rnd = results.get("randomness")
    if rnd and not rnd["private"]:
        lines.append(f"- DP noise: **{rnd['note']}**")
    if "centralized" in results.get("methods", []):
        lines.append("- `centralized` pools every market's raw data: a non-private upper bound, never a deployment")
    lines += ["", "## Test AUC and LogLoss", ""]
    if results.get("config", {}).get("model", {}).get("calibrate"):
        lines += ["LogLoss of the served model: its CTR logits Platt-scaled on the market's own validation rows "
                  "(AUC and ranking metrics unchanged; `logloss_uncalibrated` in results.json).", ""]
    lines += [markdown_table(results), "", f"![AUC per market]({plot.name})", ""]
    code_rows = []
    for market, per in results["markets"].items():
        for meth, r in per.items():
            cb = r.get("codebook") if isinstance(r, dict) else None
            if cb:
                code_rows.append(f"| {market} | {meth} | {cb['level1']['utilization']:.2f} | {cb['level1']['perplexity']:.1f} | "
                                 f"{cb['level2']['utilization']:.2f} | {cb['level2']['perplexity']:.1f} | {_fmt(r.get('nmi_level1'))} |")
    if code_rows:
        lines += ["## Codebooks", "",
                  "| market | method | L1 utilization | L1 perplexity | L2 utilization | L2 perplexity | NMI(L1, true cluster) |",
                  "|---|---|---|---|---|---|---|", *code_rows, ""]
        pooled = results.get("nmi_level1_pooled", {})
        if pooled:
            lines += ["Cross-market alignment, NMI of level-1 codes against the true shared clusters over all "
                      "markets' items together: " + ", ".join(f"{k} {v:.3f}" for k, v in pooled.items()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
