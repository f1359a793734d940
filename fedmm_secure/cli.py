"""Command-line interface: the only place that reads argv, environment and config files.

Bad flags and bad config values end with one line on stderr naming the field and what is
allowed, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import METHODS, SECAGG_BACKENDS, RunConfig, config_from_dict, load_config
from .errors import BudgetExceededError, ConfigError, FedMMError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedmm-secure", description="Privacy-hardened federated multi-market recommendation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train FedMM and the baselines; writes results.json and report.md")
    run.add_argument("--config", help="YAML or JSON config file (see README)")
    run.add_argument("--rounds", type=int, help="federated rounds per stage")
    run.add_argument("--seed", type=int)
    run.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    run.add_argument("--data", help="synthetic (default), xmrec:PATH, movielens:PATH or aliexpress:PATH")
    run.add_argument("--markets", type=_csv, help="comma-separated subset of markets")
    run.add_argument("--methods", type=_csv, help=f"comma-separated subset of {', '.join(METHODS)}")
    run.add_argument("--secagg", help=f"secure aggregation backend: {', '.join(SECAGG_BACKENDS)}")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _run_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config) if args.config else RunConfig()
    raw = cfg.to_dict()
    for flag, key in (("rounds", "rounds"), ("seed", "seed"), ("data", "data"), ("markets", "markets"),
                      ("methods", "methods"), ("secagg", "secagg")):
        v = getattr(args, flag)
        if v is not None:
            raw[key] = list(v) if isinstance(v, tuple) else v
    return config_from_dict(raw)


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiment import run_experiment
    from .reports.run_report import markdown_table

    cfg = _run_config(args)
    out = Path(args.out)
    console = Console(stderr=True)
    if args.quiet:
        results = run_experiment(cfg, out_dir=out)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("starting", total=1.0)
            results = run_experiment(cfg, out_dir=out,
                                     progress=lambda msg, frac: bar.update(task, description=msg, completed=frac))
    print(markdown_table(results))
    sec = results.get("secagg")
    if sec and not sec["secure"]:
        print("secure aggregation: plain (NOT SECURE: baseline only)")
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        parser.error(f"unknown command {args.command!r}")
    except ConfigError as e:
        print(f"fedmm-secure: error: {e}", file=sys.stderr)
        return 2
    except BudgetExceededError as e:
        print(f"fedmm-secure: budget exceeded: {e}", file=sys.stderr)
        return 3
    except FedMMError as e:
        print(f"fedmm-secure: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedmm-secure: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
