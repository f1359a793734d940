"""``fedmm-secure bench secagg``: what each secure-aggregation backend costs, as JSON on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .paths import check_output_file

__all__ = ["register", "command"]


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks of what each protection costs")
    bsub = bench.add_subparsers(dest="bench_target", required=True, parser_class=type(bench))
    bs = bsub.add_parser("secagg", help="masking and CKKS cost against floors measured in the same run")
    bs.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (default: off)")
    bs.add_argument("--out", help="also write the JSON to this file (its directory must exist)")
    bs.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    from ..benchmarks import bench_masking
    from ..reports.run_report import write_json_atomic

    if args.out:  # checked before minutes of benchmarking, not after
        check_output_file(Path(args.out), flag="--out")

    out: dict = {"masking": bench_masking(quick=args.quick)}
    try:
        from ..benchmarks.ckks import bench_ckks
        out["ckks"] = bench_ckks(quick=args.quick)
    except ImportError as e:  # TenSEAL is an optional dependency
        out["ckks"] = {"skipped": f"tenseal not available: {e}"}
    text = json.dumps(out, indent=2, default=str)
    if args.out:
        write_json_atomic(Path(args.out), out)
    print(text)
    return 0
