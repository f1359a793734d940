"""White-box gradient-canary audit of a run's DP-SGD mechanism, per market, written to disk.

The mechanism audited is what the ledger accounts: each market's sample rate, noise multiplier,
total steps, clipping norm and unit, read from a finished run's ledger (``RUN_DIR``) or, for a
config, from the privacy session a run of that config would open (the numbers its ledger would
record). :func:`gradient_audit` runs ``repeats`` independent one-run audits of ``canaries``
Dirac canaries through the project's DP-SGD trainer (:mod:`fedmm_secure.audit.gradient_canary`)
and tests the accountant's claimed tradeoff curve (:mod:`fedmm_secure.audit.fdp_one_run`); with
``plant_bug`` the same number of repeats runs with the noise multiplier halved while the ledger
keeps the original (an accounting bug the audit must flag).

Reported per market: the accountant's epsilon at the run's delta (the project's PLD
accountant), the achievable ceiling (the bound if every guess were right) and every repeat's
empirical lower bound. A correct mechanism's bound exceeds the accountant's epsilon with
probability at most ``alpha`` per repeat; a ceiling at or below the accountant's epsilon means
the audit could not flag anything ("not for conclusions").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..audit.fdp_one_run import fdp_family_bound, noise_family, subsampled_gaussian_profile
from ..audit.gradient_canary import DPSGDMechanism, run_gradient_canaries
from ..config import RunConfig, load_config
from ..data.loaders import load_data
from ..errors import ConfigError
from ..federation.fedmm.privacy import privacy_session
from ..privacy.accountant import make_accountant
from ..privacy.events import SubsampledGaussianEvent
from ..privacy.ledger import Ledger
from ..reports.run_report import write_json_atomic
from .audit_targets import AuditedRun, load_run

__all__ = ["GradientAuditSettings", "mechanisms_from_config", "mechanisms_from_run", "gradient_audit",
           "gradient_markdown", "write_gradient_audit", "load_mechanisms", "violations", "QUICK_CANARIES",
           "FULL_CANARIES", "NOT_FOR_CONCLUSIONS"]

log = logging.getLogger(__name__)

QUICK_CANARIES, FULL_CANARIES = 1000, 20_000
NOT_FOR_CONCLUSIONS = "not for conclusions"


@dataclass(frozen=True)
class GradientAuditSettings:
    """How many canaries and repeats, whether to plant the bug, the test level and family grid."""

    canaries: int = FULL_CANARIES
    repeats: int = 1
    plant_bug: bool = False
    alpha: float = 0.05
    steps_per_octave: int = 12
    records_per_user: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 10:
            raise ConfigError("--canaries", f"need an int >= 10, got {self.canaries!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError("--repeats", f"must be a positive int, got {self.repeats!r}")
        if not (0 < self.alpha < 1):
            raise ConfigError("alpha", f"must be in (0, 1), got {self.alpha!r}")


def mechanisms_from_config(cfg: RunConfig, *, unit: str | None = None) -> dict[str, DPSGDMechanism]:
    """Per market, the DP-SGD mechanism a private run of ``cfg`` accounts (its ledger's numbers)."""
    if not cfg.privacy.enabled:
        raise ConfigError("privacy", "the config is not private: there is no DP mechanism to audit")
    if unit is not None:
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, unit=unit))
    markets = load_data(cfg)
    session = privacy_session(cfg, markets, method="fedmm", ledger=None, method_index=0)
    return {m: DPSGDMechanism(sample_rate=p.sample_rate, noise_multiplier=session.noise_multipliers[m],
                              steps=p.total_steps, max_grad_norm=session.max_grad_norm, unit=session.unit,
                              delta=session.delta)
            for m, p in session.plans.items()}


def _validation_release(event: SubsampledGaussianEvent, run: AuditedRun, market: str) -> bool:
    """Is ``event`` one of the run's releases from validation rows (results.json names their
    noise multiplier per market)?"""
    priv = run.results.get("privacy") or {}
    valid = (priv.get(market) or {}).get("validation") or {}
    return event.sample_rate == 1 and event.noise_multiplier == valid.get("noise_multiplier")


def mechanisms_from_run(run_dir: Path) -> dict[str, DPSGDMechanism]:
    """Per market, the mechanism a finished run's ledger recorded (one rate and multiplier)."""
    run = load_run(run_dir)
    ledger_path = Path(run_dir) / "ledger.sqlite"
    if not ledger_path.is_file():
        raise ConfigError("dir", f"{run_dir} has no ledger.sqlite (not a private run)")
    ledger = Ledger.open(ledger_path)
    try:
        out = {}
        for m in ledger.markets():
            # DP-SGD's events only: the full-batch releases from validation rows (model selection,
            # calibration: q = 1 at their own noise multiplier) are a different mechanism.
            events = [e for e in ledger.events_for(m, committed_only=True) if not _validation_release(e, run, m)]
            kinds = {(e.sample_rate, e.noise_multiplier, e.unit) for e in events}
            if not events:
                continue
            if len(kinds) != 1:
                raise ConfigError("dir", f"market {m!r}: the ledger holds {len(kinds)} different DP-SGD "
                                  "settings; this audit tests one subsampled Gaussian at a time")
            (q, sigma, unit), = kinds
            out[m] = DPSGDMechanism(sample_rate=q, noise_multiplier=sigma, steps=sum(e.steps for e in events),
                                    max_grad_norm=run.config.max_grad_norm(), unit=unit,
                                    delta=float(run.config.privacy.delta))
    finally:
        ledger.close()
    if not out:
        raise ConfigError("dir", f"{run_dir}: the ledger records no DP-SGD steps")
    return out


def load_mechanisms(run_dir: Path | None, config: str | None, *, unit: str | None) -> dict[str, DPSGDMechanism]:
    """From a run directory's ledger, or from a config (default: the default run's config)."""
    if run_dir is not None:
        if config is not None or unit is not None:
            raise ConfigError("--config", "a run directory's ledger fixes the mechanism; drop --config/--unit")
        return mechanisms_from_run(run_dir)
    cfg = load_config(config) if config else RunConfig()
    return mechanisms_from_config(cfg, unit=unit)


def _accountant_epsilon(mech: DPSGDMechanism) -> float:
    acc = make_accountant("pld")
    acc.compose(SubsampledGaussianEvent(mech.sample_rate, mech.noise_multiplier, mech.steps, mech.unit))
    return float(acc.get_epsilon(mech.delta))


def _audit_market(mech: DPSGDMechanism, s: GradientAuditSettings, progress: Callable[[str, int], None] | None) -> dict:
    sigmas, claimed = noise_family(mech.noise_multiplier, steps_per_octave=s.steps_per_octave)
    family = [subsampled_gaussian_profile(sample_rate=mech.sample_rate, noise_multiplier=x, steps=mech.steps,
                                          delta=mech.delta) for x in sigmas]
    acc_eps = _accountant_epsilon(mech)
    variants = [("correct", mech.noise_multiplier)] + ([("planted_bug", mech.noise_multiplier / 2)]
                                                        if s.plant_bug else [])
    out: dict = {"mechanism": mech.to_dict(), "accountant_epsilon": acc_eps, "canaries": s.canaries,
                 "repeats": s.repeats, "family_epsilons": [p.label_epsilon for p in family],
                 "family_noise_multipliers": sigmas, "claimed_index": claimed}
    for name, sigma in variants:
        obs = run_gradient_canaries(mech, m=s.canaries, repeats=s.repeats, trained_noise_multiplier=sigma,
                                    records_per_user=s.records_per_user,
                                    progress=(lambda t, n=name: progress(n, t)) if progress else None)
        bounds = fdp_family_bound(obs.scores, obs.included, family, claimed=claimed, alpha=s.alpha)
        eps = [b.epsilon_lower_bound for b in bounds]
        out[name] = {"trained_noise_multiplier": sigma, "bounds": [b.to_dict() for b in bounds],
                     "empirical_epsilons": eps, "max_empirical_epsilon": max(eps),
                     "exceeding_accountant": int(sum(e > acc_eps for e in eps))}
        out["ceiling"] = bounds[0].ceiling
    out["conclusive"] = out["ceiling"] > acc_eps
    return out


def gradient_audit(mechanisms: dict[str, DPSGDMechanism], settings: GradientAuditSettings, *,
                   markets: list[str] | None = None,
                   progress: Callable[[str, str, int], None] | None = None) -> dict:
    """Audit each market's mechanism; returns the JSON-able payload (see module docstring)."""
    chosen = markets or list(mechanisms)
    unknown = [m for m in chosen if m not in mechanisms]
    if unknown:
        raise ConfigError("--market", f"unknown market(s) {unknown}", allowed=", ".join(mechanisms))
    results = {}
    for m in chosen:
        log.info("gradient-canary audit of %s: %s", m, mechanisms[m])
        results[m] = _audit_market(mechanisms[m], settings,
                                   (lambda name, t, mk=m: progress(mk, name, t)) if progress else None)
    return {"attack": "gradient", "settings": dataclasses.asdict(settings), "markets": results}


def gradient_markdown(payload: dict, *, command: str | None = None) -> str:
    """The Markdown summary of :func:`gradient_audit`'s payload."""
    s = payload["settings"]
    lines = ["# White-box gradient-canary audit (f-DP one run)", "",
             f"{s['canaries']} Dirac canaries per audit, {s['repeats']} repeat(s), confidence "
             f"{1 - s['alpha']:.2f}; the claimed tradeoff curve is the accountant's for the ledger's "
             "(q, sigma, steps); empirical lower bounds and ceilings are epsilons at the run's delta.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| market | unit | q | sigma | steps | accountant eps | ceiling | correct: max empirical eps "
              "| correct: > accountant | planted bug: min empirical eps | planted bug: flagged |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in payload["markets"].items():
        mech, acc = r["mechanism"], r["accountant_epsilon"]
        bug = r.get("planted_bug")
        lines.append(
            f"| {name} | {mech['unit']} | {mech['sample_rate']:.4g} | {mech['noise_multiplier']:.4g} | "
            f"{mech['steps']} | {acc:.3f} | {r['ceiling']:.3f} | {r['correct']['max_empirical_epsilon']:.3f} | "
            f"{r['correct']['exceeding_accountant']}/{r['repeats']} | "
            + (f"{min(bug['empirical_epsilons']):.3f} | {bug['exceeding_accountant']}/{r['repeats']} |" if bug
               else "- | - |"))
    warn = [n for n, r in payload["markets"].items() if not r["conclusive"]]
    if warn:
        lines += ["", f"**Ceiling at or below the accountant's epsilon for {', '.join(warn)}: this audit "
                  f"could not flag anything there ({NOT_FOR_CONCLUSIONS}; use more canaries).**"]
    lines += ["", "A correct mechanism exceeds its accountant epsilon with probability at most "
              f"{s['alpha']} per repeat; an excess is a VIOLATION of the claimed guarantee."]
    return "\n".join(lines) + "\n"


def write_gradient_audit(payload: dict, json_path: Path, *, command: str | None = None) -> str:
    """Write the payload (JSON) and its Markdown summary next to it; return the Markdown."""
    json_path = Path(json_path)
    if json_path.suffix != ".json":
        raise ConfigError("--out", f"{json_path} must be a .json file")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if command:
        payload = {**payload, "command": command}
    write_json_atomic(json_path, payload)
    md = gradient_markdown(payload, command=command)
    json_path.with_suffix(".md").write_text(md, encoding="utf-8")
    return md


def violations(payload: dict) -> list[str]:
    """Markets whose correct-mechanism audit exceeded the accountant's epsilon."""
    return [n for n, r in payload["markets"].items() if r["correct"]["exceeding_accountant"] > 0]
