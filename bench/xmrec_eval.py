"""XMRec evaluation: FedMM vs local, local_codes and centralized on all 7 Electronics markets,
with and without DP (epsilon 8), 3 seeds, mean and spread. One command, by hand (not a test):

    .venv/bin/python bench/xmrec_eval.py --out runs/xmrec_eval

Reads ../shared/data/xmrec-electronics (academic use only, never committed); exits 0 with a
message when it is absent. A lighter training config than the synthetic default (2 rounds,
1 CTR epoch per round, 10 RQ-VAE epochs, batch 512) keeps the 6 runs under 15 minutes here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedmm_secure.config import config_from_dict
from fedmm_secure.workflows.fedmm_run import run_experiment

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xmrec-electronics"
BASE = {"rounds": 2, "data": f"xmrec:{DATA}", "model": {"vq_epochs": 10, "ctr_epochs": 1, "batch_size": 512}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/xmrec_eval")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (XMRec data is only on the project's machines)")
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    results: dict[str, list[dict]] = {"no DP": [], "eps 8": []}
    t0 = time.perf_counter()
    for setting, privacy in (("no DP", {}), ("eps 8", {"enabled": True, "epsilon": 8.0, "delta": 1e-5})):
        for s in (int(x) for x in args.seeds.split(",")):
            d = out / f"{setting.replace(' ', '_')}_seed{s}"
            shutil.rmtree(d, ignore_errors=True)
            cfg = config_from_dict(dict(BASE, seed=s, privacy=privacy))
            results[setting].append(run_experiment(cfg, out_dir=d))
            print(f"{setting} seed {s}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    first = results["no DP"][0]
    markets, methods = list(first["markets"]), first["methods"]
    lines = [f"Total time: {total:.0f} s for {sum(len(v) for v in results.values())} runs.", ""]
    for setting, runs in results.items():
        lines += [f"### {setting}: test AUC, mean ± std over {len(runs)} seeds", "",
                  "| market | " + " | ".join(methods) + " | fedmm - local |", "|---|" + "---|" * (len(methods) + 1)]
        for mk in markets + ["mean"]:
            cells = []
            for m in methods:
                v = [np.mean([r["markets"][x][m]["auc"] for x in markets]) if mk == "mean" else r["markets"][mk][m]["auc"]
                     for r in runs]
                cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f}")
            gain = [(np.mean([r["markets"][x]["fedmm"]["auc"] - r["markets"][x]["local"]["auc"] for x in markets])
                     if mk == "mean" else r["markets"][mk]["fedmm"]["auc"] - r["markets"][mk]["local"]["auc"]) for r in runs]
            lines.append(f"| {mk} | " + " | ".join(cells) + f" | {np.mean(gain):+.4f} ± {np.std(gain):.4f} |")
        align = [r.get("code_alignment", {}).get("fedmm", {}) for r in runs]
        if all(align):
            lines += ["", "Same product, same level-1 code (fedmm): "
                      + ", ".join(f"{a['same_code_rate']:.3%} vs chance {a['chance_rate']:.3%}" for a in align)]
        if setting != "no DP":
            eps = [max(v["epsilon"] for v in r["privacy"].values()) for r in runs]
            lines.append(f"Max epsilon reported per run: {', '.join(f'{e:.3f}' for e in eps)}")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({k: [r["markets"] for r in v] for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
