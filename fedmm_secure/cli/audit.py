"""``fedmm-secure audit``: audit a run directory's CTR models (or the self-contained demo), or,
with ``--attack gradient``, the run's DP-SGD mechanism itself with white-box gradient canaries.

Prints the Markdown summary of the audit (:func:`fedmm_secure.workflows.audit.audit_and_write`
writes the JSON report, the summary and the ROC plot) and returns the exit code: 0 when every
empirical lower bound is at or below its accountant epsilon, 1 when any is above (a VIOLATION:
see ``docs/audit.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError

__all__ = ["register", "command", "run_audit_command"]


def register(sub: argparse._SubParsersAction) -> None:
    aud = sub.add_parser("audit", help="membership-inference audit of a run's models")
    aud.add_argument("dir", nargs="?", help="run directory (omit with --quick for the self-contained demo)")
    aud.add_argument("--attack", required=True, choices=("loss", "lira", "canary", "gradient"))
    aud.add_argument("--out", help="JSON output file")
    aud.add_argument("--quick", action="store_true")
    aud.add_argument("--seed", type=int, default=0)
    grad = aud.add_argument_group("--attack gradient (white-box DP-SGD audit)")
    grad.add_argument("--config", help="audit the mechanism a run of this config accounts (default: the "
                      "default run's config) instead of a run directory's ledger")
    grad.add_argument("--unit", choices=("record", "user", "interaction"),
                      help="with --config: the privacy unit (default: the config's)")
    grad.add_argument("--market", action="append", help="market to audit (repeatable; default: every market)")
    grad.add_argument("--canaries", type=int, help="canaries per audit (default 20000; 1000 with --quick)")
    grad.add_argument("--repeats", type=int, default=1, help="independent audits per market")
    grad.add_argument("--plant-bug", action="store_true",
                      help="also audit a trainer whose noise multiplier is halved while the ledger keeps it")
    aud.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    if args.attack == "gradient":
        return run_gradient_command(args)
    if args.config or args.unit or args.market or args.canaries or args.repeats != 1 or args.plant_bug:
        raise ConfigError("--attack", "--config, --unit, --market, --canaries, --repeats and --plant-bug "
                          "are for --attack gradient")
    if args.dir is None and not args.quick:
        raise ConfigError("dir", "a run directory is required (or --quick for the self-contained demo)")
    return run_audit_command(Path(args.dir) if args.dir else None, attack=args.attack,
                             out=Path(args.out) if args.out else None, quick=args.quick, seed=args.seed)


def run_audit_command(run_dir: Path | None, *, attack: str, out: Path | None, quick: bool, seed: int,
                      markets: list[str] | None = None, pool_size: int | None = None,
                      canary_pool_size: int | None = None, epochs: int | None = None, lr: float | None = None,
                      private: bool | None = None, n_shadows: int | None = None) -> int:
    """Audit ``run_dir`` (or, with ``run_dir=None`` and ``quick``, the demo targets) with ``attack``.

    Writes the report files (:func:`~fedmm_secure.workflows.audit.audit_and_write`), prints the
    Markdown summary; returns 0, or 1 if any market's bound exceeds its accountant epsilon. The
    keyword-only extras narrow or change the audit (markets, pool sizes, CTR epochs and learning
    rate, ``private=False`` for a non-private control, LiRA shadows).
    """
    from ..workflows.audit import audit_and_write

    outcome = audit_and_write(run_dir, attack=attack, out=out, quick=quick, seed=seed, markets=markets,
                              pool_size=pool_size, canary_pool_size=canary_pool_size, epochs=epochs, lr=lr,
                              private=private, n_shadows=n_shadows)
    print(outcome.markdown)
    if quick:
        # The Markdown carries them too; quick mode repeats them last, where they are seen.
        for line in outcome.report.ceiling_lines():
            print(line)
    print(f"audit: {outcome.json_path}  summary: {outcome.markdown_path}  ROC: {outcome.roc_plot}")
    return 1 if outcome.report.violations else 0


def run_gradient_command(args: argparse.Namespace) -> int:
    """``--attack gradient``: white-box canary audit of each market's DP-SGD, with progress bars.

    Prints the Markdown summary (ceilings, empirical bounds, accountant epsilons) and, in quick
    mode or whenever a ceiling does not exceed the accountant's epsilon, "not for conclusions".
    Returns 1 if a correct mechanism's bound exceeded its accountant epsilon, else 0.
    """
    import shlex
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..workflows.gradient_audit import (FULL_CANARIES, NOT_FOR_CONCLUSIONS, QUICK_CANARIES,
                                            GradientAuditSettings, gradient_audit, load_mechanisms, violations,
                                            write_gradient_audit)

    if args.dir is not None and not Path(args.dir).is_dir():
        raise ConfigError("dir", f"{args.dir} is not a run directory")
    canaries = args.canaries if args.canaries is not None else (QUICK_CANARIES if args.quick else FULL_CANARIES)
    settings = GradientAuditSettings(canaries=canaries, repeats=args.repeats, plant_bug=args.plant_bug)
    out = Path(args.out) if args.out else (Path(args.dir) / "audit" if args.dir else Path("audit-gradient")) \
        / "audit_gradient.json"
    if out.suffix != ".json":
        raise ConfigError("--out", f"{out} must be a .json file")
    mechanisms = load_mechanisms(Path(args.dir) if args.dir else None, args.config, unit=args.unit)
    chosen = args.market or list(mechanisms)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[tuple[str, str], int] = {}

        def progress(market: str, variant: str, step: int) -> None:
            key = (market, variant)
            if key not in tasks:
                tasks[key] = bar.add_task(f"{market} {variant}: DP-SGD steps", total=mechanisms[market].steps)
            bar.update(tasks[key], completed=step)

        payload = gradient_audit(mechanisms, settings, markets=args.market, progress=progress)
    command_line = "fedmm-secure " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    md = write_gradient_audit(payload, out, command=command_line)
    print(md)
    for name in chosen:
        r = payload["markets"][name]
        if args.quick or not r["conclusive"]:
            note = NOT_FOR_CONCLUSIONS if not r["conclusive"] else "quick mode (few canaries)"
            print(f"{name}: ceiling {r['ceiling']:.3f} vs accountant epsilon {r['accountant_epsilon']:.3f}"
                  + (f": {NOT_FOR_CONCLUSIONS}" if not r["conclusive"] else f" ({note})"))
    print(f"audit: {out}  summary: {out.with_suffix('.md')}")
    return 1 if violations(payload) else 0
