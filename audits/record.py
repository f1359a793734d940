"""Re-create the recorded audits in audits/ (see audits/README.md).

    .venv/bin/python audits/record.py SETTING[:VARIANT] ATTACK [ATTACK ...] [--markets a,b]

SETTING names a config in audits/configs/ (synthetic_eps1, synthetic_eps4, synthetic_eps8,
synthetic_nodp, xmrec_eps4, xmrec_nodp). The run goes to runs/audits/SETTING (trained once,
reused when its results.json exists); each audit writes audits/SETTING[_VARIANT]_ATTACK.{json,md,png}.
VARIANT ``memorise`` audits the same run's CTR stage trained without DP for 30 epochs at lr 0.03
(the non-private control that memorises). Audits run in full mode (2000-record pools, 16 LiRA
shadows), seed 0, one torch thread. ``--markets`` audits a subset of the run's markets.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fedmm_secure.cli.audit import run_audit_command
from fedmm_secure.config import load_config
from fedmm_secure.workflows.fedmm_run import run_experiment

ROOT = Path(__file__).resolve().parent
VARIANTS = {"": {}, "memorise": {"private": False, "epochs": 30, "lr": 0.03}}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    markets = None
    if "--markets" in argv:
        i = argv.index("--markets")
        markets = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2:]
    setting, _, variant = argv[0].partition(":")
    attacks = argv[1:]
    run_dir = ROOT.parent / "runs" / "audits" / setting
    if not (run_dir / "results.json").exists():
        t0 = time.perf_counter()
        run_experiment(load_config(ROOT / "configs" / f"{setting}.json"), out_dir=run_dir)
        print(f"[record] trained {setting} in {time.perf_counter() - t0:.0f} s", flush=True)
    worst = 0
    for attack in attacks:
        t0 = time.perf_counter()
        stem = f"{setting}_{variant}_{attack}" if variant else f"{setting}_{attack}"
        code = run_audit_command(run_dir, attack=attack, out=ROOT / f"{stem}.json", quick=False, seed=0,
                                 markets=markets, **VARIANTS[variant])
        print(f"[record] {stem}: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
