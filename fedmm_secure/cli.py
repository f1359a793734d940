"""Command-line interface: the only place that reads argv, environment and config files.

Bad flags and bad config values end with one line on stderr naming the field and what is
allowed, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
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
    run.add_argument("--model", dest="model_family", help="model family: fedmm (default) or pf-msmtrec")
    run.add_argument("--dp", dest="dp", action="store_true", default=None, help="train with DP-SGD")
    run.add_argument("--no-dp", dest="dp", action="store_false", help="train without DP (epsilon = inf)")
    run.add_argument("--epsilon", type=float, help="target epsilon per market: calibrates the noise multiplier")
    run.add_argument("--noise-multiplier", type=float, help="DP-SGD noise multiplier (instead of --epsilon)")
    run.add_argument("--max-grad-norm", type=float, help="DP-SGD clipping norm")
    run.add_argument("--delta", type=float, help="delta of every reported epsilon")
    run.add_argument("--epsilon-budget", type=float, help="per-market budget enforced before every round")
    run.add_argument("--on-exceed", help="skip (market skips the round) or stop (run stops)")
    run.add_argument("--unit", help="unit of privacy: record (default) or user")
    run.add_argument("--market-noise", dest="market_noise_multiplier", type=float,
                     help="market-level protection: noise multiplier of the Gaussian each market adds to its uploads")
    run.add_argument("--randomness", choices=("secure", "reproducible"),
                     help="source of DP-SGD noise and batch sampling: secure (default; an OS-keyed "
                          "AES-CTR stream) or reproducible (seeded from --seed: NOT PRIVATE, for "
                          "experiments that must repeat bit for bit)")
    run.add_argument("--resume", metavar="DIR", help="continue the private run in DIR from its ledger")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    bench = sub.add_parser("bench", help="benchmarks of what each protection costs")
    bsub = bench.add_subparsers(dest="bench_target", required=True, parser_class=_Parser)
    bs = bsub.add_parser("secagg", help="masking and CKKS cost against floors measured in the same run")
    bs.add_argument("--quick", action="store_true")
    bs.add_argument("--out", help="write the JSON here")

    budget = sub.add_parser("budget", help="privacy budget checks on a run directory")
    bgsub = budget.add_subparsers(dest="budget_command", required=True, parser_class=_Parser)
    bc = bgsub.add_parser("check", help="exit 0 when every market is within --max-epsilon, 1 otherwise")
    bc.add_argument("dir")
    bc.add_argument("--max-epsilon", type=float, required=True)
    bc.add_argument("--delta", type=float, help="delta to evaluate at (default: the run's)")

    rep = sub.add_parser("report", help="write a self-contained privacy report (Markdown + PNG) for a run")
    rep.add_argument("dir")

    fl = sub.add_parser("flower", help="distributed runtime on Flower (Deployment Engine)")
    flsub = fl.add_subparsers(dest="flower_command", required=True, parser_class=_Parser)
    fll = flsub.add_parser("local", help="SuperLink + one SuperNode per market on loopback; FedMM with our secure sum")
    # Defaults applied in _cmd_flower_local, so --resume can refuse flags it would not use.
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
    fll.add_argument("--quiet", action="store_true", help="no progress lines")
    out_or_resume = fll.add_mutually_exclusive_group(required=True)
    out_or_resume.add_argument("--out", help="a new run directory")
    out_or_resume.add_argument("--resume", metavar="DIR",
                               help="continue the interrupted run in DIR with its own config; every market "
                                    "reopens its ledger (what it spent stays spent)")

    aud = sub.add_parser("audit", help="membership-inference audit of a run's models")
    aud.add_argument("dir", nargs="?", help="run directory (omit with --quick for the self-contained demo)")
    aud.add_argument("--attack", required=True, choices=("loss", "lira", "canary"))
    aud.add_argument("--out", help="JSON output file")
    aud.add_argument("--quick", action="store_true")
    aud.add_argument("--seed", type=int, default=0)
    return p


_PRIVACY_FLAGS = (("epsilon", "epsilon"), ("noise_multiplier", "noise_multiplier"),
                  ("max_grad_norm", "max_grad_norm"), ("delta", "delta"), ("epsilon_budget", "epsilon_budget"),
                  ("on_exceed", "on_exceed"), ("unit", "unit"),
                  ("market_noise_multiplier", "market_noise_multiplier"), ("randomness", "randomness"))


def _stderr_line(line: str) -> None:
    from rich.console import Console
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]flower[/dim] {line}")


def _cmd_flower_local(args: argparse.Namespace) -> int:
    from .runtime.flower_local import flower_local_command

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
        tls=args.tls, progress=None if args.quiet else _stderr_line)


def _run_config(args: argparse.Namespace) -> RunConfig:
    if args.resume:
        # The run's own config is authoritative; flags may not change what the ledger accounts.
        cfg_path = Path(args.resume) / "config.json"
        if not cfg_path.exists():
            raise ConfigError("--resume", f"{args.resume} has no config.json (not a fedmm-secure run directory)")
        return load_config(cfg_path)
    cfg = load_config(args.config) if args.config else RunConfig()
    raw = cfg.to_dict()
    for flag, key in (("rounds", "rounds"), ("seed", "seed"), ("data", "data"), ("markets", "markets"),
                      ("methods", "methods"), ("secagg", "secagg"), ("model_family", "model_family")):
        v = getattr(args, flag)
        if v is not None:
            raw[key] = list(v) if isinstance(v, tuple) else v
    priv = raw["privacy"]
    for flag, key in _PRIVACY_FLAGS:
        v = getattr(args, flag)
        if v is not None:
            priv[key] = v
    if args.dp is not None:
        priv["enabled"] = args.dp
    elif args.epsilon is not None or args.noise_multiplier is not None or args.epsilon_budget is not None:
        priv["enabled"] = True
    return config_from_dict(raw)


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiment import run_experiment
    from .reports.run_report import markdown_table

    cfg = _run_config(args)
    out = Path(args.resume or args.out)
    if args.resume and not cfg.privacy.enabled:
        raise ConfigError("--resume", "only private runs have a ledger to resume from")
    console = Console(stderr=True)
    if cfg.model_family == "pf-msmtrec":
        from .pf_experiment import run_pf_experiment as runner
    else:
        runner = run_experiment
    kwargs = {"resume": bool(args.resume)}
    if args.quiet:
        results = runner(cfg, out_dir=out, **kwargs)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("starting", total=1.0)
            results = runner(cfg, out_dir=out,
                             progress=lambda msg, frac: bar.update(task, description=msg, completed=frac), **kwargs)
    if cfg.model_family != "fedmm":
        print((out / "report.md").read_text(encoding="utf-8"))
        print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
        return 0
    print(markdown_table(results))
    priv = results.get("privacy")
    if priv:
        print("epsilon after each ledger round (fedmm: CF rounds, then CTR rounds):")
        for m, v in priv.items():
            print(f"  {m}: " + " ".join(f"{e:.2f}" for e in v["epsilon_per_round"]))
        print("epsilon per market (" + next(iter(priv.values()))["unit"] + "-level, delta="
              + f"{next(iter(priv.values()))['delta']:g}): "
              + ", ".join(f"{m} {v['epsilon']:.3f}" for m, v in priv.items()))
    else:
        print("privacy: no DP (epsilon = inf)")
    sec = results.get("secagg")
    if sec and not sec["secure"]:
        print("secure aggregation: plain (NOT SECURE: baseline only)")
    if results.get("randomness", {}).get("private") is False:
        print("DP noise: " + results["randomness"]["note"])
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import bench_masking
    from .reports.run_report import write_json_atomic

    out: dict = {"masking": bench_masking(quick=args.quick)}
    try:
        from .benchmarks.ckks import bench_ckks
        out["ckks"] = bench_ckks(quick=args.quick)
    except ImportError as e:  # TenSEAL is an optional dependency
        out["ckks"] = {"skipped": f"tenseal not available: {e}"}
    text = json.dumps(out, indent=2, default=str)
    if args.out:
        write_json_atomic(Path(args.out), out)
    print(text)
    return 0


def _cmd_budget_check(args: argparse.Namespace) -> int:
    from .reports.privacy_report import budget_table
    rows, ok = budget_table(Path(args.dir), max_epsilon=args.max_epsilon, delta=args.delta)
    print(rows)
    return 0 if ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from .reports.privacy_report import write_privacy_report
    path = write_privacy_report(Path(args.dir))
    print(f"privacy report: {path}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit_cli import run_audit_command
    if args.dir is None and not args.quick:
        raise ConfigError("dir", "a run directory is required (or --quick for the self-contained demo)")
    return run_audit_command(Path(args.dir) if args.dir else None, attack=args.attack,
                             out=Path(args.out) if args.out else None, quick=args.quick, seed=args.seed)


def _set_threads() -> None:
    # The models are small: on a 2-core machine one intra-op thread beats an oversubscribed
    # pool. FEDMM_THREADS overrides.
    import os

    import torch
    raw = os.environ.get("FEDMM_THREADS", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("FEDMM_THREADS", f"must be a positive integer, got {raw!r}")
    torch.set_num_threads(int(raw))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _set_threads()
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "budget":
            return _cmd_budget_check(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "flower":
            return _cmd_flower_local(args)
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
