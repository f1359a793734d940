"""``fedmm-secure flower local``: FedMM on a loopback Flower deployment (SuperLink + SuperNodes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError

__all__ = ["register", "command"]


def register(sub: argparse._SubParsersAction) -> None:
    fl = sub.add_parser("flower", help="distributed runtime on Flower (Deployment Engine)")
    flsub = fl.add_subparsers(dest="flower_command", required=True, parser_class=type(fl))
    fll = flsub.add_parser("local", help="SuperLink + one SuperNode per market on loopback; FedMM with our secure sum")
    # Defaults applied in command(), so --resume can refuse flags it would not use.
    fll.add_argument("--markets", type=int, help="number of synthetic markets (default 3)")
    fll.add_argument("--rounds", type=int, help="federated rounds per stage (default 2)")
    fll.add_argument("--secagg", help="masking (default) or ckks")
    fll.add_argument("--seed", type=int, help="default 0")
    fll.add_argument("--config", help="run config (default: a tiny synthetic config)")
    fll.add_argument("--epsilon", type=float, help="DP-SGD in every market, sigma calibrated to this epsilon "
                     "(each market's ledger: OUT/ledgers/MARKET)")
    fll.add_argument("--epsilon-budget", type=float, help="per-market budget enforced before every round")
    fll.add_argument("--tls", action="store_true",
                     help="TLS on the SuperLink and SuperNode authentication, with a throwaway PKI in OUT/tls")
    fll.add_argument("--startup-timeout", type=float, metavar="SECONDS",
                     help="how long the deployment may take to come up (default 60 + 20 per market)")
    fll.add_argument("--quiet", action="store_true", help="no progress lines")
    out_or_resume = fll.add_mutually_exclusive_group(required=True)
    out_or_resume.add_argument("--out", help="a new run directory")
    out_or_resume.add_argument("--resume", metavar="DIR",
                               help="continue the interrupted run in DIR with its own config; every market "
                                    "reopens its ledger (what it spent stays spent)")
    fll.set_defaults(handler=command)


def _stderr_line(line: str) -> None:
    from rich.console import Console
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]flower[/dim] {line}")


def command(args: argparse.Namespace) -> int:
    from ..workflows.flower_local import flower_local_command

    run_flags = {"--markets": args.markets, "--rounds": args.rounds, "--secagg": args.secagg, "--seed": args.seed,
                 "--config": args.config, "--epsilon": args.epsilon, "--epsilon-budget": args.epsilon_budget}
    if args.resume:
        given = [f for f, v in run_flags.items() if v is not None]
        if given:
            raise ConfigError("--resume", f"a resumed run keeps its own config; drop {', '.join(given)}")
    return flower_local_command(
        markets=3 if args.markets is None else args.markets, rounds=2 if args.rounds is None else args.rounds,
        secagg=args.secagg or "masking", seed=0 if args.seed is None else args.seed,
        out=Path(args.resume or args.out), resume=bool(args.resume),
        config=load_config(args.config) if args.config else None,
        epsilon=args.epsilon, epsilon_budget=args.epsilon_budget,
        tls=args.tls, progress=None if args.quiet else _stderr_line, startup_timeout=args.startup_timeout)
