"""``masking`` cost as the federation grows: time and peak memory per party, n x d.

The aggregator runs in a child process of its own (spawned: a fresh interpreter) and is handed
the markets' replies one at a time over a pipe, as a deployment's aggregator receives them. Its
peak memory is the child's peak resident set during the round minus its resident set just
before the round (Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``), so the
interpreter and imports do not dilute it. The markets run in the parent, all on one shared input
vector; one market's calls are traced (``tracemalloc``) for its peak memory: the most allocated
during any one of its calls, ``begin_round`` included (the input vector it reads, 8 bytes a
value, is the caller's).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np

from ..secagg.base import RoundContext, Roster
from ..secagg.masking import MaskingAggregator
from ..secagg.policy import MarketPolicy

__all__ = ["SCALING_NS", "SCALING_DS", "scaling_cell", "scaling_table", "fit_exponent"]

SCALING_NS = (5, 10, 20, 50, 100)
SCALING_DS = (1 << 16, 1 << 20, 1 << 22)
# Cells above this many coordinates in total are cut: the markets all run in one process and
# each keeps its decoded sum (8 bytes a value) until the round is agreed.
MAX_TOTAL = 100 * (1 << 20)


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current resident set
    except OSError:
        pass


def _aggregator_child(conn) -> None:  # runs in the spawned process
    agg = MaskingAggregator().create_aggregator()
    conn.send(agg.public_bundle())
    agg.install_roster(conn.recv())
    ctx = conn.recv()
    before = _status("VmRSS")
    _reset_peak()
    wall = cpu = 0.0

    def timed(fn):
        nonlocal wall, cpu
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        wall += time.perf_counter() - w
        cpu += time.thread_time() - c
        return out

    server = timed(lambda: agg.begin_round(ctx))
    conn.send((timed(server.start), False))
    while True:
        item = conn.recv()
        if item is None:
            outbox = timed(server.end_stage)
            conn.send((outbox, server.done))
            del outbox
            if server.done:
                break
        else:
            timed(lambda: server.receive(*item))
        del item
    peak = _status("VmHWM")
    conn.send({"wall_s": wall, "cpu_s": cpu, "rss_before": before, "peak_rss": peak,
               "head": server.result()[:4096]})


def scaling_cell(n: int, length: int, *, seed: int = 0) -> dict:
    """One round of ``n`` markets over ``length`` values; time and peak memory per party."""
    mp = multiprocessing.get_context("spawn")
    conn, child_conn = mp.Pipe()
    proc = mp.Process(target=_aggregator_child, args=(child_conn,), daemon=True)
    proc.start()
    try:
        backend = MaskingAggregator()
        ids = [f"m{i:03d}" for i in range(n)]
        markets = {m: backend.create_market(m) for m in ids}
        roster = Roster({m: markets[m].public_bundle() for m in ids}, aggregator=conn.recv())
        policy = MarketPolicy.pin(roster, backends={"masking"}, privacy={})
        for m in ids:
            markets[m].install_roster(roster, policy=policy)
        conn.send(roster)
        ctx = RoundContext("bench-scaling", 1, tuple(ids), length, 1.0)
        x = np.random.default_rng(seed).uniform(-1.0, 1.0, length)
        conn.send(ctx)
        wall = {m: 0.0 for m in ids}
        cpu = {m: 0.0 for m in ids}
        traced_peak = 0
        clients = {}
        for m in ids:   # begin_round quantizes the input: part of the market's cost
            if m == ids[0]:
                tracemalloc.start()
            w, c = time.perf_counter(), time.thread_time()
            clients[m] = markets[m].begin_round(ctx, x)
            wall[m] += time.perf_counter() - w
            cpu[m] += time.thread_time() - c
            if m == ids[0]:
                traced_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        outbox, final = conn.recv()
        while True:
            for m, msg in outbox.items():
                traced = m == ids[0]
                if traced:
                    tracemalloc.start()
                w, c = time.perf_counter(), time.thread_time()
                reply = clients[m].handle(msg)
                wall[m] += time.perf_counter() - w
                cpu[m] += time.thread_time() - c
                if traced:
                    traced_peak = max(traced_peak, tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()
                if not final:
                    conn.send((m, reply))
                del reply
            del outbox
            if final:
                break
            conn.send(None)
            outbox, final = conn.recv()
        stats = conn.recv()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if not np.allclose(stats["head"], n * x[:4096], atol=1e-5):
        raise RuntimeError("scaling round returned a wrong sum")
    return {"n": n, "d": length,
            "aggregator_cpu_ms": stats["cpu_s"] * 1e3, "aggregator_wall_ms": stats["wall_s"] * 1e3,
            "aggregator_peak_mib": (stats["peak_rss"] - stats["rss_before"]) / 2**20,
            "aggregator_peak_bytes_per_coordinate": (stats["peak_rss"] - stats["rss_before"]) / length,
            "market_cpu_ms": statistics.median(cpu.values()) * 1e3,
            "market_wall_ms": statistics.median(wall.values()) * 1e3,
            "market_peak_mib": traced_peak / 2**20}


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """b in y ~ a x^b, least squares on logs (needs two distinct x)."""
    lx = [math.log(v) for v in xs]
    ly = [math.log(max(v, 1e-12)) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def scaling_table(ns: Sequence[int] = SCALING_NS, ds: Sequence[int] = SCALING_DS, *,
                  max_total: int = MAX_TOTAL) -> dict:
    """Every cell with n x d <= ``max_total`` (the others are listed as cut), and per d the
    fitted growth in n of the aggregator's time and memory and of a market's time."""
    load = [os.getloadavg()[0]]
    rows, cut = [], []
    for d in ds:
        for n in ns:
            if n * d > max_total:
                cut.append({"n": n, "d": d})
                continue
            rows.append(scaling_cell(n, d))
    load.append(os.getloadavg()[0])
    growth = []
    for d in ds:
        cells = [r for r in rows if r["d"] == d]
        if len(cells) < 2:
            continue
        ns_ = [r["n"] for r in cells]
        growth.append({"d": d, **{f"{k}_vs_n_exponent": fit_exponent(ns_, [r[k] for r in cells])
                                   for k in ("aggregator_cpu_ms", "aggregator_peak_mib",
                                             "market_cpu_ms")}})
    flat = {}
    by = {(r["n"], r["d"]): r for r in rows}
    if (5, 1 << 20) in by and (100, 1 << 20) in by:
        flat = {"aggregator_peak_n100_over_n5_d1M": by[(100, 1 << 20)]["aggregator_peak_mib"]
                / by[(5, 1 << 20)]["aggregator_peak_mib"], "target": 1.5}
    return {"rows": rows, "cut": cut, "growth": growth, "flat_memory": flat,
            "load_average_1min": load, "repeats_per_cell": 1}
