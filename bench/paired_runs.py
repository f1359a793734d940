"""Paired differences between two evaluation-harness outputs (same data, seeds and settings).

Compares code versions rather than methods: run ``bench/eval_harness.py`` once per version into
two directories, then::

    python bench/paired_runs.py runs/new runs/old --metrics auc,logloss

prints, per setting, method and market, the mean of ``new - old`` over the seeds both ran, with
its 95% t-interval and how many seeds ``new`` was higher (markdown). Per-seed values come from
each run's ``results.json``: ``runs/<setting>/seed<N>/results.json`` inside a harness directory,
or ``s<N>/results.json`` (one ``fedmm-secure run --out DIR/s<N>`` per seed, e.g. PF-MSMTrec's,
whose metrics are per task: ``--metrics ctcvr.auc,ctcvr.logloss``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmm_secure.reports.paired import paired_difference


def _per_seed(root: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for f in sorted(root.glob("runs/*/seed*/results.json")):
        out[(f.parent.parent.name, int(f.parent.name.removeprefix("seed")))] = json.loads(f.read_text())["markets"]
    for f in sorted(root.glob("s[0-9]*/results.json")):
        out[("runs", int(f.parent.name.removeprefix("s")))] = json.loads(f.read_text())["markets"]
    return out


def _value(metrics: dict, path: str) -> float:
    for key in path.split("."):
        metrics = metrics[key]
    return float(metrics)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--metrics", default="auc,logloss")
    args = ap.parse_args(argv)
    new, old = _per_seed(args.new), _per_seed(args.old)
    common = sorted(set(new) & set(old))
    if not common:
        print(f"no (setting, seed) run in both {args.new} and {args.old}", file=sys.stderr)
        return 2
    for setting in sorted({s for s, _ in common}):
        seeds = [k for k in common if k[0] == setting]
        print(f"\n### {setting}: new - old over seeds {', '.join(str(s) for _, s in seeds)}\n")
        first = new[seeds[0]]
        methods = sorted({m for mk in first.values() for m in mk})
        metrics = args.metrics.split(",")
        print("| market | method | " + " | ".join(metrics) + " |")
        print("|---|---|" + "---|" * len(metrics))
        for market in first:
            for method in methods:
                cells = []
                for metric in metrics:
                    try:
                        a = [_value(new[k][market][method], metric) for k in seeds]
                        b = [_value(old[k][market][method], metric) for k in seeds]
                    except KeyError:
                        cells.append("-")
                        continue
                    d = paired_difference(a, b)
                    wins = sum(x > y for x, y in zip(a, b))
                    cells.append(f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] ({wins}/{d.n})")
                print(f"| {market} | {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
