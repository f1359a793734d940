"""``fedmm-secure budget check`` and ``fedmm-secure report``: a run directory's privacy budget."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "check_command", "report_command"]


def register(sub: argparse._SubParsersAction) -> None:
    budget = sub.add_parser("budget", help="privacy budget checks on a run directory")
    bgsub = budget.add_subparsers(dest="budget_command", required=True, parser_class=type(budget))
    bc = bgsub.add_parser("check", help="verify the run's ledgers, then exit 0 when every market is within "
                                        "--max-epsilon; 1 when over budget or verification fails")
    bc.add_argument("dir")
    bc.add_argument("--max-epsilon", type=float, required=True)
    bc.add_argument("--delta", type=float, help="delta to evaluate at (default: the run's)")
    bc.add_argument("--scope", choices=("total", "deployed"), default="total",
                    help="total: each market's spend over every method the run trained on its data "
                         "(infinite if the non-private centralized baseline ran); deployed: the "
                         "deployed method's own spend only (default: %(default)s)")
    bc.set_defaults(handler=check_command)

    rep = sub.add_parser("report", help="verify the run's ledgers, then write its privacy report: "
                                          "privacy_report.md, a self-contained privacy_report.html "
                                          "and privacy_report.json")
    rep.add_argument("dir")
    rep.set_defaults(handler=report_command)


def check_command(args: argparse.Namespace) -> int:
    from ..reports.privacy_report import budget_table
    rows, ok = budget_table(Path(args.dir), max_epsilon=args.max_epsilon, delta=args.delta, scope=args.scope)
    print(rows)
    return 0 if ok else 1


def report_command(args: argparse.Namespace) -> int:
    from ..reports.privacy_report import write_privacy_report
    path = write_privacy_report(Path(args.dir))
    print(f"privacy report: {path} (and beside it {path.with_suffix('.html').name}, "
          f"{path.with_suffix('.json').name})")
    return 0
