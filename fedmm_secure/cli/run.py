"""``fedmm-secure run``: train FedMM (or PF-MSMTrec) and the baselines; print the results table.

The run's config comes from ``--config`` (YAML or JSON) overlaid with the flags, or, with
``--resume DIR``, from the run directory's own ``config.json`` (flags may not change what the
ledger accounts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEFAULT_EPSILON, METHODS, REFERENCE_METHODS, SECAGG_BACKENDS, RunConfig, config_from_dict, load_config
from ..errors import ConfigError
from .paths import check_output_dir

__all__ = ["register", "command"]

_PRIVACY_FLAGS = (("epsilon", "epsilon"), ("noise_multiplier", "noise_multiplier"),
                  ("max_grad_norm", "max_grad_norm"), ("delta", "delta"), ("epsilon_budget", "epsilon_budget"),
                  ("on_exceed", "on_exceed"), ("unit", "unit"),
                  ("market_noise_multiplier", "market_noise_multiplier"), ("randomness", "randomness"))


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="train FedMM and the baselines; writes results.json and report.md",
                         description="Private by default: DP-SGD at epsilon " f"{DEFAULT_EPSILON:g}" " per market "
                         "(record level, delta 1e-5) with masking secure aggregation, unless --no-dp.")
    run.add_argument("--config", help="YAML or JSON config file (see README); flags override it")
    run.add_argument("--rounds", type=int, help="federated rounds per stage (default: 4)")
    run.add_argument("--seed", type=int, help="seed of data generation and model initialisation, never of the "
                     "DP noise (default: 0)")
    run.add_argument("--out", help="output directory, new or without results (default: runs/latest)")
    run.add_argument("--data", help="synthetic (default), xmrec:PATH, movielens:PATH or aliexpress:PATH")
    run.add_argument("--markets", type=_csv, help="comma-separated subset of markets (default: all)")
    run.add_argument("--synthetic-scale", type=float,
                     help="synthetic data: every market's users and items times this (rows grow linearly; "
                          "default: 1)")
    run.add_argument("--batch-size", type=int,
                     help="expected records per training step (model.batch_size; default: 256); a market needing more than "
                          "model.max_steps_per_epoch (default 64) steps per epoch samples 1/64 of its records instead")
    run.add_argument("--methods", type=_csv, help=f"comma-separated subset of {', '.join(METHODS)} (default: all); "
                     f"synthetic data also takes the references {', '.join(REFERENCE_METHODS)}")
    run.add_argument("--secagg", help=f"secure aggregation backend: {', '.join(SECAGG_BACKENDS)} (default: masking; "
                     "plain is not secure)")
    run.add_argument("--model", dest="model_family", help="model family: fedmm (default) or pf-msmtrec")
    run.add_argument("--dp", dest="dp", action="store_true", default=None, help="train with DP-SGD (the default)")
    run.add_argument("--no-dp", dest="dp", action="store_false",
                     help="train without DP (epsilon = inf); every output says so")
    run.add_argument("--epsilon", type=float, help="target epsilon per market: calibrates the noise multiplier "
                     f"(default: {DEFAULT_EPSILON:g}, or the budget if lower)")
    run.add_argument("--noise-multiplier", type=float, help="DP-SGD noise multiplier, instead of --epsilon")
    run.add_argument("--max-grad-norm", type=float, help="DP-SGD clipping norm (default: 1.0 for fedmm, "
                     "2.0 for pf-msmtrec)")
    run.add_argument("--delta", type=float, help="delta of every reported epsilon (default: 1e-5)")
    run.add_argument("--epsilon-budget", type=float, help="per-market budget enforced before every round "
                     "(default: none); alone, it also sets the target epsilon")
    run.add_argument("--on-exceed", help="when a round would exceed the budget: skip (the market sits it out; "
                     "default) or stop (the run stops)")
    run.add_argument("--fail-on-skip", action="store_true",
                     help="exit 1 if any market sat out a round because of its budget (default: exit 0)")
    run.add_argument("--unit", help="unit of privacy: interaction (default for implicit-feedback data: a positive and its sampled negatives), record (default elsewhere: one row) or user")
    run.add_argument("--market-noise", dest="market_noise_multiplier", type=float,
                     help="market-level protection: noise multiplier of the Gaussian each market adds to its "
                          "uploads (default: none)")
    run.add_argument("--randomness", choices=("secure", "reproducible"),
                     help="source of DP-SGD noise and batch sampling: secure (default; an OS-keyed "
                          "AES-CTR stream) or reproducible (seeded from --seed: NOT PRIVATE, for "
                          "experiments that must repeat bit for bit)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted private run in DIR from its "
                     "ledger and config (no other run flags)")
    run.add_argument("--quiet", action="store_true", help="no progress display (default: a progress bar)")
    run.set_defaults(handler=command)


_RUN_FLAGS = ("config", "rounds", "seed", "out", "data", "markets", "synthetic_scale", "batch_size", "methods", "secagg",
              "model_family", "dp")


def _run_config(args: argparse.Namespace) -> RunConfig:
    if args.resume:
        # The run's own config is authoritative; flags may not change what the ledger accounts.
        given = [f for f in _RUN_FLAGS + tuple(f for f, _ in _PRIVACY_FLAGS) if getattr(args, f) is not None]
        if given:
            raise ConfigError("--resume", "a resumed run keeps its own config; drop "
                              + ", ".join("--" + f.replace("_", "-") for f in given))
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.exists():
            raise ConfigError("--resume", f"{args.resume} has no config.json (not a fedmm-secure run directory)")
        if (run_dir / "results.json").exists():
            raise ConfigError("--resume", f"{args.resume} holds a finished run (results.json): nothing to resume",
                              allowed="a run directory interrupted before its results were written")
        return load_config(cfg_path)
    cfg = load_config(args.config) if args.config else RunConfig()
    raw = cfg.to_dict()
    for flag, key in (("rounds", "rounds"), ("seed", "seed"), ("data", "data"), ("markets", "markets"),
                      ("methods", "methods"), ("secagg", "secagg"), ("model_family", "model_family")):
        v = getattr(args, flag)
        if v is not None:
            raw[key] = list(v) if isinstance(v, tuple) else v
    if args.synthetic_scale is not None:
        raw["synthetic"] = {**raw["synthetic"], "scale": args.synthetic_scale}
    if args.batch_size is not None:
        raw["model"]["batch_size"] = args.batch_size
    priv = raw["privacy"]
    for flag, key in _PRIVACY_FLAGS:
        v = getattr(args, flag)
        if v is not None:
            priv[key] = v
    if args.noise_multiplier is not None and args.epsilon is None:
        priv["epsilon"] = None     # a noise multiplier on the command line replaces the file's target
    if args.dp is not None:
        priv["enabled"] = args.dp
    elif args.epsilon is not None or args.noise_multiplier is not None or args.epsilon_budget is not None:
        priv["enabled"] = True
    return config_from_dict(raw)


def command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..reports.run_report import markdown_table
    from ..workflows.fedmm_run import run_experiment

    cfg = _run_config(args)
    out = Path(args.resume or args.out or "runs/latest")
    if args.resume and not cfg.privacy.enabled:
        raise ConfigError("--resume", "only private runs have a ledger to resume from")
    if not args.resume:
        check_output_dir(out, flag="--out")
        if (out / "results.json").exists():
            raise ConfigError("--out", f"{out} already holds a run's results", allowed="a new directory")
    console = Console(stderr=True)
    if cfg.model_family == "pf-msmtrec":
        from ..workflows.pf_run import run_pf_experiment as runner
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
        return _refusals(results, fail=args.fail_on_skip)
    print(markdown_table(results))
    priv = results.get("privacy")
    if priv:
        order = "CTR rounds" if cfg.model.design == "joint" else "CF rounds, then CTR rounds"
        from ..federation.fedmm.joint import KEY_COUNTS
        from ..federation.fedmm.selection import CALIBRATE, SELECT

        # The releases this run made, found by the stage labels its ledgers hold.
        made = {s for v in priv.values() for s in (v.get("round_stages") or {}).values()}
        names = [n for stage, n in ((KEY_COUNTS, "shared-key counts"), (SELECT, "model selection"),
                                    (CALIBRATE, "calibration")) if stage in made]
        if names:
            order += f", each market's full-batch releases ({', '.join(names)}) in rounds of their own"
        print(f"epsilon after each ledger round (fedmm: {order}):")
        for m, v in priv.items():
            print(f"  {m}: " + " ".join(f"{e:.2f}" for e in v["epsilon_per_round"]))
        acct = results.get("accounting") or {}
        print("epsilon per market (" + next(iter(priv.values()))["unit"] + "-level, delta="
              + f"{next(iter(priv.values()))['delta']:g}"
              + (f", deployed method {acct['deployed_method']} only" if acct else "") + "): "
              + ", ".join(f"{m} {v['epsilon']:.3f}" for m, v in priv.items()))
        if acct:
            print("total spent on each market's data by every method of the run: " + ", ".join(
                f"{m} {'inf' if t['infinite'] else format(t['epsilon'], '.3f')}" for m, t in acct["total"].items())
                + (" (centralized read raw rows without DP)" if acct.get("total_is_infinite") else ""))
    else:
        print("privacy: no DP (epsilon = inf)")
    sec = results.get("secagg")
    if sec and not sec["secure"]:
        print("secure aggregation: plain (NOT SECURE: baseline only)")
    if results.get("randomness", {}).get("private") is False:
        print("DP noise: " + results["randomness"]["note"])
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return _refusals(results, fail=args.fail_on_skip)


def _refusals(results: dict, *, fail: bool) -> int:
    """Say which market-rounds the budget refused (they were logged as they happened); exit 1 on
    any with ``--fail-on-skip``."""
    skipped = {m: v.get("skipped_rounds", []) for m, v in (results.get("privacy") or {}).items()}
    skipped = {m: s for m, s in skipped.items() if s}
    if not skipped:
        return 0
    total = sum(len(s) for s in skipped.values())
    print(f"REFUSED by the budget: {total} market-round(s); those markets trained less than planned:")
    for m, rounds in skipped.items():
        print(f"  {m}: rounds " + ", ".join(f"{r['round']} ({r['stage']})" for r in rounds))
    return 1 if fail else 0
