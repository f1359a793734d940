"""Market cost per masking round, two versions interleaved: each imports its own checkout.

Two long-lived processes (``PYTHONPATH`` = each checkout) run one ``time_round`` each on
request, alternating A B / B A, so load drift on a shared machine hits both alike; prints the
medians, their ratio and the median of the per-pair ratios, with the load average. ``--cpu``
times with the round thread's CPU clock instead of the wall clock (preemption excluded)::

    git worktree add --detach ../old main     # the version to compare against
    .venv/bin/python bench/ab_masking.py ../old . --n 10 --d 262144 --pairs 20 [--cpu]
    git worktree remove ../old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

__all__ = ["main"]

_CHILD = r"""
import json, sys, time
if sys.argv[3] == "cpu":
    time.perf_counter = time.thread_time   # time_round reads this clock
from fedmm_secure.benchmarks.masking import time_round
n, d = int(sys.argv[1]), int(sys.argv[2])
time_round(n, d, seed=99)   # warm-up
for i, _ in enumerate(sys.stdin):
    r = time_round(n, d, seed=i)
    print(json.dumps({k: r[k] for k in ("client_s", "client_mask_stage_s", "server_s")}), flush=True)
"""

_KEYS = ("client_s", "client_mask_stage_s", "server_s")


def _child(path: str, n: int, d: int, clock: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(n), str(d), clock], env=env,
                            cwd=path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(p: subprocess.Popen) -> dict[str, float]:
    p.stdin.write("go\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="checkout A (the baseline)")
    ap.add_argument("b", help="checkout B")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--d", type=int, default=262_144)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="thread CPU time instead of wall time")
    args = ap.parse_args(argv)
    clock = "cpu" if args.cpu else "wall"
    pa, pb = _child(args.a, args.n, args.d, clock), _child(args.b, args.n, args.d, clock)
    before = os.getloadavg()[0]
    res: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for i in range(args.pairs):
        for tag, p in ((("A", pa), ("B", pb)) if i % 2 == 0 else (("B", pb), ("A", pa))):
            res[tag].append(_ask(p))
    after = os.getloadavg()[0]
    for p in (pa, pb):
        p.stdin.close()
        p.wait()
    print(f"n={args.n} d={args.d} pairs={args.pairs} clock={clock} "
          f"load average (1 min) {before:.2f} before, {after:.2f} after")
    for k in _KEYS:
        ma = statistics.median(r[k] for r in res["A"])
        mb = statistics.median(r[k] for r in res["B"])
        pair = statistics.median(y[k] / x[k] for x, y in zip(res["A"], res["B"]))
        print(f"{k:20s} A {ma * 1e3:8.2f} ms  B {mb * 1e3:8.2f} ms  "
              f"B/A of medians {mb / ma:.3f}  median pair ratio {pair:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
