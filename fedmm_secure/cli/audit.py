"""``fedmm-secure audit``: audit a run directory's CTR models (or the self-contained demo).

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
    aud.add_argument("--attack", required=True, choices=("loss", "lira", "canary"))
    aud.add_argument("--out", help="JSON output file")
    aud.add_argument("--quick", action="store_true")
    aud.add_argument("--seed", type=int, default=0)
    aud.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
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
    print(f"audit: {outcome.json_path}  summary: {outcome.markdown_path}  ROC: {outcome.roc_plot}")
    return 1 if outcome.report.violations else 0
