"""``masking`` backend cost against the AES-CTR keystream floor, measured in the same run.

Run (quick grid: n x d in (3, 16K), (10, 256K), (10, 1M))::

    .venv/bin/python -m pytest bench/bench_masking.py -s -p no:cacheprovider

Full grid n in {3, 10, 50, 100} x d in {16K, 256K, 1M}::

    FEDMM_BENCH_FULL=1 .venv/bin/python -m pytest bench/bench_masking.py -s -p no:cacheprovider

Targets and anchors: docs/performance.md. ``test_floor_ratios_n10_d1M`` prints the target table
(market and aggregator over the AES floor at n = 10, d = 1M, CPU and wall, median of interleaved
repeats); ``test_scaling_table`` the time and peak memory per party for n in {5, 10, 20, 50, 100}
x d in {64K, 1M} (+ 4M with ``FEDMM_BENCH_FULL=1``; cells above 100M coordinates are cut).

Floors (see fedmm_secure/benchmarks/masking.py): a client must expand n AES-256-CTR keystreams of
4d bytes (1 self mask + n-1 pairwise masks), so the fair floor is ``n`` keystreams; the ratio to a
single keystream of d values is printed too. Every round's floor is measured right before and
after the round (the machine is shared, so the load drifts); the mean of the two is used.
"""

from __future__ import annotations

import os
import statistics

import pytest

from fedmm_secure.benchmarks.masking import (FULL_GRID, QUICK_GRID, floor_ratios,
                                             keystream_floor, mask_breakdown, shamir_timings,
                                             time_round)
from fedmm_secure.benchmarks.scaling import SCALING_DS, SCALING_NS, scaling_table
from fedmm_secure.benchmarks.summary import format_table, summary_rows
from fedmm_secure.primitives.shamir import recover_secret, split_secret

GRID = FULL_GRID if os.environ.get("FEDMM_BENCH_FULL") else QUICK_GRID


def _floors(n: int, d: int) -> tuple[float, float]:
    return keystream_floor(d, repeats=5), keystream_floor(d, count=n, repeats=3)


@pytest.mark.parametrize("d", sorted({d for _, d in GRID}))
def test_keystream_floor(benchmark, d):
    buf_len = d
    benchmark.pedantic(lambda: keystream_floor(buf_len, repeats=1), rounds=5, iterations=1)
    benchmark.extra_info.update(d=d, bytes=4 * d)


@pytest.mark.parametrize("n,d", GRID)
def test_round_vs_floor(benchmark, n, d):
    rows: list[dict] = []

    def one_round() -> None:
        before = _floors(n, d)
        r = time_round(n, d, seed=len(rows))
        after = _floors(n, d)
        r["ks1"] = (before[0] + after[0]) / 2
        r["ksn"] = (before[1] + after[1]) / 2
        rows.append(r)

    benchmark.pedantic(one_round, rounds=3 if n <= 10 else 1, iterations=1)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    info = {
        "n": n, "d": d,
        "keystream_1_ms": med["ks1"] * 1e3, "keystream_n_ms": med["ksn"] * 1e3,
        "client_ms": med["client_s"] * 1e3, "client_mask_stage_ms": med["client_mask_stage_s"] * 1e3,
        "server_ms": med["server_s"] * 1e3,
        "client/n_keystreams": statistics.median(r["client_s"] / r["ksn"] for r in rows),
        "client_mask_stage/n_keystreams": statistics.median(
            r["client_mask_stage_s"] / r["ksn"] for r in rows),
        "client/1_keystream": statistics.median(r["client_s"] / r["ks1"] for r in rows),
        "server/n_keystreams": statistics.median(r["server_s"] / r["ksn"] for r in rows),
        "upload_bytes_per_coord": rows[0]["masked_upload_bytes"] / d,
        "upload_vs_float32": rows[0]["masked_upload_bytes"] / (4 * d),
        "max_abs_error": max(r["max_abs_error"] for r in rows),
    }
    benchmark.extra_info.update(info)
    print("\nmasking " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in info.items()))


@pytest.mark.parametrize("n,d", [(n, d) for n, d in GRID if d >= 262_144])
def test_mask_breakdown(benchmark, n, d):
    """Masking proper (``accumulate_masks``) vs the n-keystream floor, plus the other
    per-coordinate client work, pieces interleaved so that load drift hits all alike."""
    rows: list[dict] = []
    benchmark.pedantic(lambda: rows.append(mask_breakdown(n, d, repeats=3)),
                       rounds=3 if n <= 10 else 1, iterations=1)
    keys = [k for k in rows[0] if k not in ("n", "d")]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    benchmark.extra_info.update(n=n, d=d, **med)
    print(f"\nbreakdown n={n} d={d} " + "  ".join(f"{k}={v:.4g}" for k, v in med.items()))


def test_shamir_split_n100(benchmark):
    secret = os.urandom(32)
    xs = list(range(1, 101))
    benchmark(lambda: split_secret(secret, threshold=67, xs=xs, entropy=os.urandom))
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(n=100, t=67, median_ms=ms, target_ms=1.0)
    print(f"\nshamir split n=100 t=67: {ms:.3f} ms (target <= 1 ms; Flower 237 ms)")


def test_shamir_recover_n100(benchmark):
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=67, xs=range(1, 101), entropy=os.urandom)[33:]
    result = benchmark(lambda: recover_secret(shares, threshold=67))
    if result != secret:
        raise RuntimeError("recovery returned the wrong secret")
    ms = benchmark.stats.stats.median * 1e3
    batched = shamir_timings(n=100, repeats=5)["recover_batched_ms_per_secret"]
    benchmark.extra_info.update(n=100, t=67, median_ms=ms, batched_ms_per_secret=batched,
                                target_ms=5.0)
    print(f"\nshamir recover n=100 t=67: {ms:.3f} ms per secret, {batched:.3f} ms per secret "
          "when a round's secrets share one survivor set (target <= 5 ms; Flower 728 ms)")


def test_floor_ratios_n10_d1M():
    """The targets' setting: 9 interleaved repeats of (AES floor, one round, hash costs)."""
    r = floor_ratios(10, 1 << 20, repeats=9)
    print("\n" + format_table(summary_rows({"masking": {"floor_ratios": r}, "ckks": {
        "skipped": "see bench_ckks.py"}})[:8]))
    print(f"load average (1 min) {r['load_average_1min'][0]:.2f} before, "
          f"{r['load_average_1min'][1]:.2f} after")


def test_scaling_table():
    ds = SCALING_DS if os.environ.get("FEDMM_BENCH_FULL") else SCALING_DS[:2]
    t = scaling_table(SCALING_NS, ds)
    print("\n| n | d | aggregator CPU ms | aggregator wall ms | aggregator peak MiB | "
          "market CPU ms | market wall ms | market peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in t["rows"]:
        print(f"| {r['n']} | {r['d']:,} | {r['aggregator_cpu_ms']:.0f} | {r['aggregator_wall_ms']:.0f} "
              f"| {r['aggregator_peak_mib']:.1f} | {r['market_cpu_ms']:.0f} | "
              f"{r['market_wall_ms']:.0f} | {r['market_peak_mib']:.1f} |")
    for g in t["growth"]:
        print(f"d={g['d']:,}: aggregator time ~ n^{g['aggregator_cpu_ms_vs_n_exponent']:.2f}, "
              f"aggregator memory ~ n^{g['aggregator_peak_mib_vs_n_exponent']:.2f}, "
              f"market time ~ n^{g['market_cpu_ms_vs_n_exponent']:.2f}")
    print(f"cut (n x d > 100M): {t['cut']}; flat memory: {t['flat_memory']}; "
          f"load average {t['load_average_1min']}")
