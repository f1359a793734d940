"""``fedmm-secure bench secagg``: what each secure-aggregation backend costs, as a table of
ratios against floors measured in the same run (and the anchors of docs/performance.md); the
full figures go to a JSON file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .paths import check_output_file

__all__ = ["register", "command"]

DEFAULT_OUT = "bench-secagg.json"


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks of what each protection costs")
    bsub = bench.add_subparsers(dest="bench_target", required=True, parser_class=type(bench))
    bs = bsub.add_parser("secagg", help="masking and CKKS cost against floors measured in the same run")
    bs.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (default: off)")
    bs.add_argument("--scaling", action="store_true",
                    help="also the n x d table of time and peak memory per party (minutes)")
    bs.add_argument("--out", default=DEFAULT_OUT,
                    help=f"where the full JSON goes (its directory must exist; default {DEFAULT_OUT})")
    bs.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    from ..benchmarks import bench_masking
    from ..benchmarks.summary import format_table, summary_rows
    from ..reports.run_report import write_json_atomic

    out_path = Path(args.out)
    check_output_file(out_path, flag="--out")  # before minutes of benchmarking, not after
    load = os.getloadavg()[0]
    out: dict = {"masking": bench_masking(quick=args.quick, scaling=args.scaling)}
    try:
        from ..benchmarks.ckks import bench_ckks
        out["ckks"] = bench_ckks(quick=args.quick)
    except ImportError as e:  # TenSEAL is an optional dependency
        out["ckks"] = {"skipped": f"tenseal not available: {e}"}
    out["load_average_1min"] = [load, os.getloadavg()[0]]
    write_json_atomic(out_path, out)
    print(format_table(summary_rows(out)))
    print(f"load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"ratios are medians of interleaved repeats; full figures in {out_path}")
    return 0
