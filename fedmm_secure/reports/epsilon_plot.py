"""The epsilon-per-round plot of a privacy report, drawn from :func:`.report_data.gather_privacy_report`.

One line per market over ledger rounds (integer ticks), the rounds of each stage shaded and
labelled (CF, CTR, ...), an x where the budget refused a market's round, and the budget line.
"""

from __future__ import annotations

import io
from itertools import groupby
from pathlib import Path

__all__ = ["plot_epsilon_per_round", "epsilon_plot_png"]

_STAGE_COLOURS = ("#e8eef7", "#f7efe3", "#e9f5ea", "#f3e8f5")


def _stage_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """Contiguous runs of ledger rounds with the same stage: (stage, first round, last round)."""
    stage_of = {r["round"]: r["stage"] for r in rows}
    spans = []
    for stage, grp in groupby(sorted(stage_of), key=lambda rid: stage_of[rid]):
        ids = list(grp)
        spans.append((stage, ids[0], ids[-1]))
    return spans


def epsilon_plot_png(data: dict, *, dpi: int = 110) -> bytes:
    """The plot as PNG bytes (embedded in the HTML report, written next to the Markdown one)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # The deployed method's rounds: baselines' ledgers number their rounds on their own.
    rows = [r for r in data["rounds"] if r.get("method") in (None, data.get("deployed_method"))]
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
    spans = _stage_spans(rows)
    colour_of = {s: _STAGE_COLOURS[i % len(_STAGE_COLOURS)] for i, s in enumerate(dict.fromkeys(s for s, _, _ in spans))}
    for stage, lo, hi in spans:
        ax.axvspan(lo - 0.5, hi + 0.5, color=colour_of[stage], zorder=0)
        # Stage names sit just inside the top of the axes, whatever the y range.
        ax.text((lo + hi) / 2, 0.97, stage.upper(), transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, color="#444444")
    refused_label = False
    for market in data["markets"]:
        pts = [(r["round"], r["epsilon_after"]) for r in rows if r["market"] == market and r["epsilon_after"] is not None]
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=market, zorder=3)
        refused = [(r["round"], r["epsilon_after"]) for r in rows
                   if r["market"] == market and r["refused"] and r["epsilon_after"] is not None]
        if refused:
            ax.scatter([p[0] for p in refused], [p[1] for p in refused], marker="x", s=70, linewidths=2,
                       color=line.get_color(), zorder=4)
            refused_label = True
    if refused_label:  # one neutral legend entry for the marks of every market
        ax.scatter([], [], marker="x", s=70, linewidths=2, color="#333333", label="round refused by the budget")
    budget = data.get("budget")
    if budget is not None:
        ax.axhline(budget, color="red", ls="--", lw=1.2, label=f"budget {budget:g}", zorder=2)
    top = max([budget or 0.0] + [r["epsilon_after"] or 0.0 for r in rows])
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)   # headroom for the stage labels
    if rows:
        ax.set_xlim(min(r["round"] for r in rows) - 0.5, max(r["round"] for r in rows) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ledger round")
    ax.set_ylabel(f"epsilon (delta={data['delta']})" if not isinstance(data["delta"], list) else "epsilon")
    ax.set_title("Epsilon after each round, per market")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def plot_epsilon_per_round(data: dict, path: Path) -> bytes:
    """Write the plot to ``path``; returns the PNG bytes written."""
    png = epsilon_plot_png(data)
    path.write_bytes(png)
    return png
