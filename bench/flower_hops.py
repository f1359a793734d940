"""Where a Flower secure-sum stage spends its time: per-hop timestamps and the deployment's CPU.

Runs the workload of bench/bench_flower.py (5 markets, one secure sum of 16 640 values per
round) once on a loopback deployment, with ``bench/flower_probe`` on every process's
PYTHONPATH (timestamps only, see its docstring), then prints

* per stage (median over the measured rounds' stages, and p90), the critical path split into
  hops: ServerApp push start -> the last-answering market's SuperNode has the message stored ->
  its worker has pushed the reply -> its SuperNode has pushed the reply to the SuperLink -> the
  ServerApp has pulled every reply;
* every Flower API request type: count, median and p90 duration;
* CPU seconds of every deployment process over the run, and over 10 s idle after it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/flower_hops.py [--secagg masking|ckks] [--rounds 8]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedmm_secure.runtime.flower.local import FlowerLocalDeployment
from fedmm_secure.runtime.flower.processes import marked_pids
from fedmm_secure.workflows.flower_local import tiny_flower_config

PROBE = Path(__file__).resolve().parent / "flower_probe"
MARKETS, LENGTH = 5, 256 * 64 + 256


def _read(log_dir: Path) -> dict[int, tuple[str, str, list]]:
    """pid -> (kind, market, [(t, event, {key: value})])."""
    procs = {}
    for f in log_dir.glob("*.log"):
        lines = f.read_text(encoding="utf-8").splitlines()
        argv = lines[0] if lines else ""
        kind = next((k for k in ("supernode", "worker", "serverapp", "superlink", "superexec") if k in argv), "other")
        market = argv.split("market='")[1].split("'")[0] if "market='" in argv else \
            argv.split("--market ")[1].split()[0] if "--market " in argv else ""
        events = []
        for line in lines[1:]:
            if not line[:1].isdigit():
                continue
            t, name, *rest = line.split(" ")
            kv = {}
            for x in rest:
                if "=" in x:
                    k, v = x.split("=", 1)
                    kv[k] = v
                elif x:
                    kv["dur"] = float(x)
            events.append((float(t), name, kv))
        procs[int(f.stem)] = (kind, market, events)
    return procs


def _q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def hops(procs, skip_first_round_stages: int) -> dict[str, list[float]]:
    server = next(ev for kind, _, ev in procs.values() if kind == "serverapp")
    nodes = {m: ev for kind, m, ev in procs.values() if kind == "supernode"}
    workers = {m: ev for kind, m, ev in procs.values() if kind == "worker"}
    pushes = [(float(kv["began"]), t) for t, name, kv in server if name == "srv_push"]
    out = collections.defaultdict(list)
    for i, (p0, p1) in enumerate(pushes):
        nxt = pushes[i + 1][0] if i + 1 < len(pushes) else float("inf")
        got = [t for t, name, kv in server if name == "srv_pull" and kv["n"] != "0" and p0 < t < nxt]
        if not got or i < skip_first_round_stages or nxt == float("inf"):
            continue   # round 0 (first use of every code path), and the last exchange
        end = max(got)
        paths = []
        for m, nev in nodes.items():
            try:
                began, pulled = next((float(kv["began"]), t) for t, name, kv in nev
                                     if name == "node_pull" and p0 < t < end)
                # The task ends after its SuperNode began pulling the message: it may have been
                # acquired before the objects were stored, and may end before the SuperNode has
                # confirmed the message to the SuperLink (then hop 2 is negative).
                task = next(t for t, name, kv in workers[m] if name == "exe_task" and began < t < end)
                pushed = next(t for t, name, kv in nev if name == "node_push" and task <= t <= end)
            except StopIteration:
                continue
            paths.append((pushed, pulled, task))
        if len(paths) != len(nodes):
            continue
        pushed, pulled, task = max(paths)   # the market whose reply the ServerApp waited for
        out["stage (ServerApp push start -> every reply pulled)"].append(end - p0)
        out["  ServerApp pushes the messages and their objects"].append(p1 - p0)
        out["  1 push start -> last market's SuperNode has message + objects"].append(pulled - p0)
        out["  2 -> its worker acquired, handled, pushed the reply"].append(task - pulled)
        out["  3 -> its SuperNode pushed the reply to the SuperLink"].append(pushed - task)
        out["  4 -> ServerApp pulled every reply"].append(end - pushed)
    return out


def requests(procs, t0: float, t1: float) -> dict[tuple[str, str], list[float]]:
    out = collections.defaultdict(list)
    for kind, _, ev in procs.values():
        for t, name, kv in ev:
            if name == "http" and t0 <= t <= t1:
                out[(kind, kv["path"])].append(kv["dur"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--secagg", default="masking", choices=["masking", "ckks"])
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedmm-hops-"))
    log_dir = work / "hops"
    log_dir.mkdir()
    # Inherited by every process the deployment starts (they copy this environment).
    os.environ["FEDMM_HOP_LOG"] = str(log_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), os.environ.get("PYTHONPATH")]))
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, tuple[str, float]] = {}

    def sample(dep) -> None:
        for pid in marked_pids(dep.marker):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            name = next((c.decode().rsplit("/", 1)[-1] for c in cmd[1:3] if c and not c.startswith(b"-")), "?")
            cpu[pid] = (name, (int(stat[11]) + int(stat[12])) / tick)

    cfg = tiny_flower_config(markets=MARKETS, rounds=1, secagg=args.secagg, seed=0)
    load0 = os.getloadavg()[0]
    with FlowerLocalDeployment(cfg, out_dir=work / "run", stage_timeout=120.0,
                               workload={"name": "secure-sum", "length": LENGTH, "rounds": args.rounds}) as dep:
        dep.start()
        dep.submit()
        res = dep.wait(timeout=3600.0, on_poll=sample)
        sample(dep)
        at_end = {pid: c for pid, (_, c) in cpu.items()}
        time.sleep(10.0)
        sample(dep)
    load1 = os.getloadavg()[0]
    rounds = res["secagg"]["rounds"]
    stages = len(rounds[0]["stage_s"])
    procs = _read(log_dir)
    proto = [r["protocol_s"] for r in rounds[1:]]
    print(f"{args.secagg}: {MARKETS} markets, {LENGTH} values, {len(rounds)} rounds, {stages - 1} stages; "
          f"load {load0:.2f} -> {load1:.2f}; round median {statistics.median(proto):.3f} s (rounds 1..)")
    print("per stage, median / p90 (s):")
    for name, v in hops(procs, skip_first_round_stages=stages).items():
        print(f"  {name:66s} {statistics.median(v):.3f} / {_q(v, 0.9):.3f}  (n={len(v)})")
    srv = next(ev for kind, _, ev in procs.values() if kind == "serverapp")
    t0 = min(float(kv["began"]) for t, name, kv in srv if name == "srv_push")
    t1 = max(t for t, name, kv in srv)
    print(f"Flower API requests during the rounds ({t1 - t0:.1f} s):")
    for (kind, path), v in sorted(requests(procs, t0, t1).items(), key=lambda x: -len(x[1])):
        print(f"  {kind:10s} {path:42s} n={len(v):5d}  median {statistics.median(v) * 1e3:5.1f} ms  "
              f"p90 {_q(v, 0.9) * 1e3:5.1f} ms")
    total = sum(c for _, c in cpu.values())
    idle = sum(c - at_end.get(pid, c) for pid, (_, c) in cpu.items())
    print(f"deployment CPU: {total:.1f} s over the run; {idle:.2f} s in 10 s idle after it")
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for pid, (name, c) in cpu.items():
        by_name[name][0] += 1
        by_name[name][1] += c
        by_name[name][2] += c - at_end.get(pid, c)
    for name, (n, c, i) in sorted(by_name.items(), key=lambda x: -x[1][1]):
        print(f"  {name:40s} x{n}  {c:6.1f} s  idle {i:5.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
