"""Privacy-utility table: AUC of FedMM and the baselines at epsilon in {1, 4, 8, inf} on the
default synthetic config (masking on). Not a test: run it by hand and record the output.

    .venv/bin/python bench/privacy_utility.py --seed 0 --out runs/privacy_utility
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedmm_secure.config import RunConfig, config_from_dict
from fedmm_secure.workflows.fedmm_run import run_experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/privacy_utility")
    ap.add_argument("--epsilons", default="1,4,8,inf")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for eps in args.epsilons.split(","):
        raw = RunConfig(seed=args.seed).to_dict()
        if eps != "inf":
            raw["privacy"].update(enabled=True, epsilon=float(eps), delta=1e-5)
        out = Path(args.out) / f"eps_{eps}"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        t0 = time.perf_counter()
        res = run_experiment(config_from_dict(raw), out_dir=out)
        rows.append((eps, res, time.perf_counter() - t0))
    methods = rows[0][1]["methods"]
    markets = list(rows[0][1]["markets"])
    lines = ["| epsilon | method | " + " | ".join(markets) + " | mean | mean sparse | max eps reported |",
             "|---|---|" + "---|" * (len(markets) + 3)]
    for eps, res, secs in rows:
        priv = res.get("privacy_by_method", {})
        for m in methods:
            aucs = [res["markets"][mk][m]["auc"] for mk in markets]
            reported = max(priv[m].values()) if m in priv else float("inf")
            lines.append(f"| {eps} | {m} | " + " | ".join(f"{a:.4f}" for a in aucs)
                         + f" | {np.mean(aucs):.4f} | {np.mean(aucs[1:]):.4f} | {reported:.3f} |")
        lines.append(f"|  | (run time {secs:.0f} s) |" + " |" * (len(markets) + 3))
    print("\n".join(lines))
    (Path(args.out) / "table.md").write_text("\n".join(lines) + "\n")
    (Path(args.out) / "table.json").write_text(json.dumps(
        {eps: {m: {mk: res["markets"][mk][m]["auc"] for mk in markets} for m in methods} for eps, res, _ in rows},
        indent=2))


if __name__ == "__main__":
    main()
