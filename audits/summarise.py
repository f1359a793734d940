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
    rows, compact = [], []
    files = sorted(ROOT.glob("*.json"))
    for setting in ORDER:
        for attack in ("loss", "canary", "lira"):
            path = ROOT / f"{setting}_{attack}.json"
            if path not in files:
                continue
            rep = json.loads(path.read_text())
            audited = rep["audited"]["markets"]
            by_attack: dict[str, list] = {}
            for r in rep["results"]:
                by_attack.setdefault(r["attack"], []).append(r)
            for name, rs in by_attack.items():
                acc = [r["accountant_epsilon"] for r in rs if r["accountant_epsilon"] is not None]
                bounds = [r["epsilon_lower_bound"]["epsilon_lower_bound"] for r in rs]
                aucs = [r["auc"] for r in rs]
                compact.append(
                    f"| {setting} | {name} | {len(rs)} | "
                    + (f"{min(acc):.2f}-{max(acc):.2f}" if acc else "- (no DP)")
                    + f" | {max(bounds):.3f} | {min(aucs):.3f}-{max(aucs):.3f} | "
                    f"{max(r['tpr_at_0.1%_fpr'] for r in rs):.4f} | {max(r['tpr_at_1%_fpr'] for r in rs):.4f} | "
                    + ("-" if not acc else ("VIOLATION" if any(r["violation"] for r in rs) else "all bounds <= accountant"))
                    + " |")
            for r in rep["results"]:
                a = audited[r["market"]]
                b = r["epsilon_lower_bound"]
                ok = ("VIOLATION" if r["violation"] else "ok") if r["accountant_epsilon"] is not None else "no DP"
                rows.append(f"| {setting} | {r['market']} | {r['attack']} | {_fmt(r['accountant_epsilon'])} | "
                            f"{_fmt(a['run_epsilon_whole_run'])} | {_fmt(b['epsilon_lower_bound'])} "
                            f"({b['correct']}/{b['guesses']}) | {r['auc']:.3f} | {r['tpr_at_0.1%_fpr']:.4f} | "
                            f"{r['tpr_at_1%_fpr']:.4f} | {ok} |")
    print("### By setting (over markets)\n")
    print("| setting | attack | markets | accountant eps (CTR stage) | max empirical eps >= (95%) | AUC | "
          "max TPR@0.1%FPR | max TPR@1%FPR | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(compact))
    print("\n### Per market\n")
    print("| setting | market | attack | accountant eps (CTR stage, audited) | whole-run eps | "
          "empirical eps >= (95%) (correct/guesses) | AUC | TPR@0.1%FPR | TPR@1%FPR | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
