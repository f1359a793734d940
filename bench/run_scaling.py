"""Whole-run time and peak memory of a private run against data size, with the fitted growth.

Run (repo root)::

    .venv/bin/python bench/run_scaling.py --scales 1,3.333,10 [--batch-size 4096] [--out FILE]

Each point is one ``fedmm-secure run --config bench/configs/synthetic_10_markets.json
--synthetic-scale S --epsilon 8 --rounds 1 --methods local,fedmm`` in a child process (scale 1 is
0.3M training rows in 10 markets, scale 10 is 3M). The child's wall time, CPU time
(user + system) and peak resident set size come from ``wait4``'s resource usage of that child
alone; the load average at start and end is printed with each point, since the machine is shared.
The growth exponent is the least-squares slope of log(time) on log(rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_point", "fit_exponent", "main"]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "configs" / "synthetic_10_markets.json"


def run_point(scale: float, *, batch_size: int | None, methods: str, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="fedmm-scaling-")) / "run"
    cmd = [str(Path(sys.executable).parent / "fedmm-secure"), "run", "--config", str(CONFIG),
           "--synthetic-scale", str(scale), "--epsilon", "8", "--rounds", "1", "--methods", methods,
           "--out", str(out), "--quiet"]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    env = {**os.environ, "FEDMM_THREADS": str(threads)}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, env)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    res = json.loads((out / "results.json").read_text())
    rows = sum(v["train_rows"] for v in res["market_sizes"].values())
    return {"scale": scale, "batch_size": batch_size or "default", "train_rows": rows, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "timing_s": res["timing_s"], "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
            "mean_auc": {m: round(v["mean_auc"], 4) for m, v in res["summary"].items()},
            "max_epsilon": round(max(v["epsilon"] for v in res["privacy"].values()), 3)}


def fit_exponent(points: list[dict], key: str) -> float:
    xs = [math.log(p["train_rows"]) for p in points]
    ys = [math.log(p[key]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,3.333,10")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--methods", default="local,fedmm")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the run (FEDMM_THREADS)")
    ap.add_argument("--out", help="append each point as a JSON line here")
    args = ap.parse_args(argv)
    points = []
    for s in (float(v) for v in args.scales.split(",")):
        p = run_point(s, batch_size=args.batch_size, methods=args.methods, threads=args.threads)
        points.append(p)
        print(json.dumps(p), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(p) + "\n")
    if len(points) > 1:
        print(f"growth: wall ~ rows^{fit_exponent(points, 'wall_s'):.2f}, cpu ~ rows^{fit_exponent(points, 'cpu_s'):.2f}, "
              f"peak RSS ~ rows^{fit_exponent(points, 'peak_rss_mb'):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
