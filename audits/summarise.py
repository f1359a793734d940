"""Print the summary table of audits/README.md from the recorded audit JSON files.

    .venv/bin/python audits/summarise.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["synthetic_eps1", "synthetic_eps4", "synthetic_eps8", "synthetic_nodp", "synthetic_nodp_memorise",
         "xmrec_eps4", "xmrec_nodp", "xmrec_nodp_memorise"]


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> None:
    rows = []
    files = sorted(ROOT.glob("*.json"))
    for setting in ORDER:
        for attack in ("loss", "canary", "lira"):
            path = ROOT / f"{setting}_{attack}.json"
            if path not in files:
                continue
            rep = json.loads(path.read_text())
            audited = rep["audited"]["markets"]
            for r in rep["results"]:
                a = audited[r["market"]]
                b = r["epsilon_lower_bound"]
                ok = ("VIOLATION" if r["violation"] else "ok") if r["accountant_epsilon"] is not None else "no DP"
                rows.append(f"| {setting} | {r['market']} | {r['attack']} | {_fmt(r['accountant_epsilon'])} | "
                            f"{_fmt(a['run_epsilon_whole_run'])} | {_fmt(b['epsilon_lower_bound'])} "
                            f"({b['correct']}/{b['guesses']}) | {r['auc']:.3f} | {r['tpr_at_0.1%_fpr']:.4f} | "
                            f"{r['tpr_at_1%_fpr']:.4f} | {ok} |")
    print("| setting | market | attack | accountant eps (CTR stage, audited) | whole-run eps | "
          "empirical eps >= (95%) (correct/guesses) | AUC | TPR@0.1%FPR | TPR@1%FPR | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
