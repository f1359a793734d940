"""A membership-inference audit of a run directory (or of the self-contained demo), written to disk.

:func:`audit_run` audits the CTR stage of a finished FedMM run's markets
(:mod:`.audit_targets`); :func:`audit_and_write` runs it (or the demo) and writes the JSON
report, a Markdown summary next to it (same stem, ``.md``) and the log-log ROC plot (same stem,
``.png``). An empirical lower bound above its accountant epsilon is a VIOLATION (see
``docs/audit.md``); the report lists them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audit import ATTACKS, AuditReport, MarketAuditTarget, run_audit
from ..data.loaders import load_data
from ..errors import ConfigError
from ..reports.run_report import write_json_atomic
from .audit_targets import fedmm_codes, fedmm_ctr_targets, load_run

__all__ = ["AuditOutcome", "audit_run", "audit_and_write"]

_QUICK_POOL, _FULL_POOL = 500, 2000
_DEMO_DELTA = 1e-5
# Codes of stages 1-2 per run directory: one recomputation serves every attack of a session.
_CODES_CACHE: dict[tuple[str, float], dict] = {}


def _pool_size(requested: int | None, n_train: int, quick: bool) -> int:
    # Half of the rows at most: the rest stays fixed training data, as in the run.
    size = requested if requested is not None else (_QUICK_POOL if quick else _FULL_POOL)
    return max(4, min(size, n_train // 2))


def _demo_targets(seed: int) -> dict[str, MarketAuditTarget]:
    from ..audit.demo import demo_targets
    targets = {}
    for private, tag in ((True, "dp"), (False, "no-dp")):
        for name, t in demo_targets(seed=seed, private=private, delta=_DEMO_DELTA, quick=True).items():
            targets[f"{name} ({tag})"] = dataclasses.replace(t, name=f"{name} ({tag})")
    return targets


def audit_run(run_dir: Path, *, attack: str, quick: bool, seed: int, markets: list[str] | None = None,
              pool_size: int | None = None, canary_pool_size: int | None = None, epochs: int | None = None,
              lr: float | None = None, private: bool | None = None, n_shadows: int | None = None,
              out_dir: Path) -> tuple[AuditReport, dict]:
    """Audit the CTR stage of a run's markets; returns the report and what was audited
    (per market: target description, CTR-stage accountant epsilon, the run's whole epsilon)."""
    run = load_run(run_dir)
    delta = float(run.config.privacy.delta)
    sizes = run.results.get("market_sizes", {})
    data = load_data(run.config)
    key = (str(Path(run_dir).resolve()), (Path(run_dir) / "config.json").stat().st_mtime)
    if key not in _CODES_CACHE:
        _CODES_CACHE[key] = fedmm_codes(run.config, data)
    chosen = markets or [m.name for m in data]
    targets = {}
    for name in chosen:
        n_train = int(sizes.get(name, {}).get("train_rows") or len(next(m for m in data if m.name == name).train))
        pool = _pool_size(pool_size, n_train, quick)
        canaries = canary_pool_size if canary_pool_size is not None else pool
        targets.update(fedmm_ctr_targets(run, markets=[name], pool_size=pool, canary_pool_size=canaries,
                                         delta=delta, seed=seed, epochs=epochs, lr=lr, private=private,
                                         data=data, codes=_CODES_CACHE[key]))
    report = run_audit(attack=attack, markets=targets, out_dir=out_dir, quick=quick, seed=seed,
                       accountant_epsilon=None, delta=delta, n_shadows=n_shadows)
    privacy = run.results.get("privacy") or {}
    audited = {
        name: {"description": t.description,
               "accountant_epsilon_ctr_stage": t.accountant_epsilon,
               # A non-private control is not the run's mechanism: the run's epsilon does not apply.
               "run_epsilon_whole_run": (privacy.get(name, {}).get("epsilon")
                                         if t.accountant_epsilon is not None else None)}
        for name, t in targets.items()
    }
    return report, {"run_dir": str(run_dir), "delta": delta, "private": private if private is not None else run.private,
                    "markets": audited}


def _markdown(report: AuditReport, context: dict) -> str:
    lines = [report.to_markdown(), "## What was audited", ""]
    if context.get("run_dir"):
        lines += [f"Run directory: `{context['run_dir']}`. Audited mechanism: the CTR stage of each "
                  "market (codes fixed); its accountant epsilon is the CTR stage's alone, smaller "
                  "than the whole run's (which also pays for the CF stage).", ""]
    lines += ["| market | target | accountant eps (audited mechanism) | whole-run eps |", "|---|---|---|---|"]
    for name, m in context["markets"].items():
        acc = m.get("accountant_epsilon_ctr_stage")
        whole = m.get("run_epsilon_whole_run")
        lines.append(f"| {name} | {m['description']} | {'-' if acc is None else f'{acc:.3f}'} | "
                     f"{'-' if whole is None else f'{whole:.3f}'} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AuditOutcome:
    """An audit written to disk: the report, its three files and the Markdown summary."""

    report: AuditReport
    json_path: Path
    markdown_path: Path
    roc_plot: Path
    markdown: str


def audit_and_write(run_dir: Path | None, *, attack: str, out: Path | None, quick: bool, seed: int,
                    markets: list[str] | None = None, pool_size: int | None = None,
                    canary_pool_size: int | None = None, epochs: int | None = None, lr: float | None = None,
                    private: bool | None = None, n_shadows: int | None = None) -> AuditOutcome:
    """Audit ``run_dir`` (or, with ``run_dir=None`` and ``quick``, the demo targets) with ``attack``.

    Writes ``out`` (JSON; default ``run_dir/audit/audit_<attack>.json``, or
    ``audit-demo/audit_<attack>.json`` for the demo), ``out`` with suffix ``.md`` and ``.png``.
    The keyword-only extras narrow or change the audit (markets, pool sizes, CTR epochs and
    learning rate, ``private=False`` for a non-private control, LiRA shadows).
    """
    if attack not in ATTACKS:
        raise ConfigError("--attack", f"unknown attack {attack!r}", allowed=", ".join(ATTACKS))
    if run_dir is None and not quick:
        raise ConfigError("dir", "a run directory is required (or --quick for the self-contained demo)")
    default_dir = Path("audit-demo") if run_dir is None else Path(run_dir) / "audit"
    json_path = Path(out) if out is not None else default_dir / f"audit_{attack}.json"
    if json_path.suffix != ".json":
        raise ConfigError("--out", f"{json_path} must be a .json file")
    out_dir = json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_dir is None:
        targets = _demo_targets(seed)
        report = run_audit(attack=attack, markets=targets, out_dir=out_dir, quick=True, seed=seed,
                           accountant_epsilon=None, delta=_DEMO_DELTA, n_shadows=n_shadows)
        context = {"run_dir": None, "delta": _DEMO_DELTA, "private": None,
                   "markets": {n: {"description": t.description, "accountant_epsilon_ctr_stage": t.accountant_epsilon,
                                   "run_epsilon_whole_run": None} for n, t in targets.items()}}
    else:
        report, context = audit_run(Path(run_dir), attack=attack, quick=quick, seed=seed, markets=markets,
                                    pool_size=pool_size, canary_pool_size=canary_pool_size, epochs=epochs,
                                    lr=lr, private=private, n_shadows=n_shadows, out_dir=out_dir)
    png = json_path.with_suffix(".png")
    if report.roc_plot and Path(report.roc_plot) != png:
        shutil.move(report.roc_plot, png)
    report = dataclasses.replace(report, roc_plot=str(png))
    payload = report.to_dict()
    payload["audited"] = context
    write_json_atomic(json_path, json.loads(json.dumps(payload, allow_nan=False, default=_finite)))
    md = _markdown(report, context)
    json_path.with_suffix(".md").write_text(md, encoding="utf-8")
    return AuditOutcome(report=report, json_path=json_path, markdown_path=json_path.with_suffix(".md"),
                        roc_plot=png, markdown=md)


def _finite(x: object) -> object:
    if isinstance(x, (np.floating, np.integer)):
        v = x.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
