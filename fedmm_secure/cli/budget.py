"""``fedmm-secure budget check`` and ``fedmm-secure report``: a run directory's privacy budget."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "check_command", "report_command", "ledger_keys"]

_ROSTER_HELP = ("an identity roster (`fedmm-secure keys roster`; a Flower run: OUT/identity/roster.json): "
                "every ledgers/<market>/ledger.sqlite must then carry heads signed by that market's key")


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
    bc.add_argument("--roster", help=_ROSTER_HELP)
    bc.set_defaults(handler=check_command)

    rep = sub.add_parser("report", help="verify the run's ledgers, then write its privacy report: "
                                          "privacy_report.md, a self-contained privacy_report.html "
                                          "and privacy_report.json")
    rep.add_argument("dir")
    rep.add_argument("--roster", help=_ROSTER_HELP)
    rep.set_defaults(handler=report_command)


def ledger_keys(run_dir: Path, roster_path: str | None) -> dict | None:
    """Ledger path -> the market's identity key from the roster, for every per-market ledger of
    ``run_dir``; a ledger whose market is not on the roster is refused (``ConfigError``)."""
    if roster_path is None:
        return None
    from ..errors import ConfigError
    from ..reports.run_verification import ledger_dirs
    from ..runtime.flower.keyfiles import read_roster

    roster = read_roster(Path(roster_path))
    keys = {}
    for d in ledger_dirs(run_dir):
        if d == run_dir:
            raise ConfigError("--roster", f"{run_dir} holds one ledger for every market (an embedded run), "
                              "not one signed ledger per market")
        if d.name not in roster.markets:
            raise ConfigError("--roster", f"the ledger of {d.name!r} has no key on the roster")
        keys[f"ledgers/{d.name}/ledger.sqlite"] = roster.markets[d.name]
    return keys


def check_command(args: argparse.Namespace) -> int:
    from ..reports.privacy_report import budget_table
    run_dir = Path(args.dir)
    rows, ok = budget_table(run_dir, max_epsilon=args.max_epsilon, delta=args.delta, scope=args.scope,
                            public_keys=ledger_keys(run_dir, args.roster))
    print(rows)
    return 0 if ok else 1


def report_command(args: argparse.Namespace) -> int:
    from ..reports.privacy_report import write_privacy_report
    path = write_privacy_report(Path(args.dir), public_keys=ledger_keys(Path(args.dir), args.roster))
    print(f"privacy report: {path} (and beside it {path.with_suffix('.html').name}, "
          f"{path.with_suffix('.json').name})")
    return 0
