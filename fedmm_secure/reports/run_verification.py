"""Can a run directory's privacy record be trusted? The gate ``budget check`` and ``report`` pass
before they read a single epsilon.

For every ledger of the run (one per run directory on the embedded runtime, one per market under
``ledgers/`` on Flower):

1. its hash chain verifies and its head is the one ``results.json`` released with the results
   (so removing its last rows, or rewriting it, is detected; see ``privacy/ledger/verify.py``);
2. the epsilon each market last reported on the ledger is what the ledger's own DP events give,
   recomputed with the run's accountant, and no event comes after it;
3. ``results.json`` reports, for every market, that epsilon, the ledger's delta, accountant and
   DP step count, and its per-round epsilons are the ledger's; and every market it reports is
   charged by a ledger (a removed ledger directory is not a market with nothing spent);
4. every DP baseline the run's (chained) configuration names has its own ledger
   (``baselines/<method>/``), verified as above against its head and summary in ``results.json``'s
   ``accounting`` section, and the total spend per market that section reports is the composition
   of every method's events (infinite when a non-private method ran).

A run without ``results.json`` (interrupted) fails: nothing outside its ledger says where the
ledger ended, so removed rows could not be detected. Resuming the run finishes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LedgerError, VerificationError
from ..primitives.keys import IdentityPublicKey
from ..privacy.ledger import LEDGER_FILENAME, Ledger, LedgerAnchor, LedgerVerification, verify_ledger
from ..privacy.composed import ComposedAccountants
from .run_totals import read_run_ledgers, run_totals

__all__ = ["EPSILON_RTOL", "LedgerCheck", "RunVerification", "ledger_dirs", "verify_run",
           "require_verified_run"]

# A fresh accountant composes a ledger's events at once; the run's composed them round by round,
# and the discretised PLD grid depends on that history (measured up to ~0.3%, grids refined at
# 2.5x the 0.3% target slack). Both are certified upper bounds; a difference beyond 1% is not
# numerics but events missing or added.
EPSILON_RTOL = 1e-2
# results.json copies the epsilon the session recorded, through a JSON float round trip: exact.
_COPY_RTOL = 1e-12


@dataclass(frozen=True)
class LedgerCheck:
    path: str                        # the ledger file, relative to the run directory
    verification: LedgerVerification


@dataclass(frozen=True)
class RunVerification:
    ok: bool
    problem: str | None              # one line naming the first bad entry, when not ok
    ledgers: tuple[LedgerCheck, ...]
    # The accountants the verification composed from the ledgers' events: the readers after
    # it (spend per market, totals) reuse them instead of running the same PLD pass again.
    composed: ComposedAccountants = field(default_factory=ComposedAccountants, compare=False, repr=False)

    def lines(self) -> list[str]:
        return [f"ledger {c.path}: {c.verification.describe()}" for c in self.ledgers]


def ledger_dirs(run_dir: Path) -> list[Path]:
    """The run's ledger directories: ``run_dir`` itself (embedded runtime: one ledger for every
    market) or ``run_dir/ledgers/<market>`` (Flower runtime: each market keeps its own)."""
    if not run_dir.is_dir():
        raise ConfigError("dir", f"{run_dir} is not a run directory (no such directory)")
    if (run_dir / LEDGER_FILENAME).exists():
        return [run_dir]
    found = sorted(p.parent for p in (run_dir / "ledgers").glob(f"*/{LEDGER_FILENAME}"))
    if not found:
        raise LedgerError(f"{run_dir} has no {LEDGER_FILENAME} (nor ledgers/*/{LEDGER_FILENAME}): "
                          "the run was not private (epsilon = inf)")
    return found


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def _anchor(results: dict, privacy: Mapping, run_dir: Path, d: Path) -> LedgerAnchor:
    if d == run_dir:
        raw = results.get("ledger")
    else:
        market = privacy.get(d.name)
        raw = market.get("ledger") if isinstance(market, Mapping) else None
    if not isinstance(raw, Mapping):
        raise LedgerError("results.json holds no head for this ledger (written by an older version, "
                          "or removed)")
    return LedgerAnchor.from_dict(raw)


def _cross_check(led: Ledger, anchor: LedgerAnchor, privacy: Mapping, composed: ComposedAccountants) -> str | None:
    """Ledger events vs ledger epsilons vs results.json; the first disagreement, or None."""
    committed = sum(r.status == "committed" for r in led.rounds())
    if committed != anchor.committed_rounds:
        return (f"results.json says {anchor.committed_rounds} committed rounds, the ledger has "
                f"{committed}")
    for m in led.markets():
        events, recs = led.event_records(m), led.epsilons(m)
        if events and not recs:
            return f"entry {events[-1].entry} (events): market {m} spent privacy but never reported an epsilon"
        if not recs:
            continue
        last = recs[-1]
        late = [e for e in events if e.entry > last.entry]
        if late:
            return (f"entry {late[0].entry} (events): a DP event of {m} after its last reported epsilon "
                    f"(entry {last.entry})")
        recomputed = composed.get([e.event for e in events], last.accountant).get_epsilon(last.delta)
        if not _close(recomputed, last.epsilon, EPSILON_RTOL):
            return (f"entry {last.entry} (epsilons): {m} reported epsilon {last.epsilon:.4f} but the "
                    f"ledger's {len(events)} DP events give {recomputed:.4f} ({last.accountant})")
        p = privacy.get(m)
        if not isinstance(p, Mapping):
            return f"entry {last.entry} (epsilons): results.json reports no epsilon for {m}, which the ledger charges"
        steps = sum(e.event.steps for e in events)
        per_round = [r.epsilon for r in recs]
        shown = p.get("epsilon_per_round")
        for what, ok in (
            (f"epsilon {p.get('epsilon')!r}, the ledger {last.epsilon!r}",
             isinstance(p.get("epsilon"), (int, float)) and _close(p["epsilon"], last.epsilon, _COPY_RTOL)),
            (f"delta {p.get('delta')!r}, the ledger {last.delta!r}", p.get("delta") == last.delta),
            (f"accountant {p.get('accountant')!r}, the ledger {last.accountant!r}",
             p.get("accountant") == last.accountant),
            (f"{p.get('steps')!r} DP steps, the ledger's events {steps}", p.get("steps") == steps),
            ("per-round epsilons that are not the ledger's",
             isinstance(shown, list) and 0 < len(shown) <= len(per_round)
             and all(isinstance(a, (int, float)) and _close(a, b, _COPY_RTOL)
                     for a, b in zip(shown, per_round[-len(shown):]))),
        ):
            if not ok:
                return f"entry {last.entry} (epsilons): results.json reports for {m} {what}"
    return None


def verify_run(run_dir: Path, *,
               public_keys: Mapping[str, IdentityPublicKey] | None = None) -> RunVerification:
    """Verify every ledger of ``run_dir`` against itself and ``results.json``.

    ``public_keys`` maps a ledger's path relative to the run directory (``ledger.sqlite``,
    ``ledgers/<market>/ledger.sqlite``) to the market's identity key: that ledger's signed heads
    are then checked against it. Raises ConfigError for a missing directory and LedgerError for
    a run without a ledger; every other failure is ``ok=False`` with the first problem.
    """
    run_dir = Path(run_dir)
    dirs = ledger_dirs(run_dir)
    checks: list[LedgerCheck] = []
    composed = ComposedAccountants()

    def fail(problem: str) -> RunVerification:
        return RunVerification(ok=False, problem=problem, ledgers=tuple(checks), composed=composed)

    res_path = run_dir / "results.json"
    if not res_path.is_file():
        return fail("results.json is missing: nothing outside the ledger says where it ended, so rows "
                    "removed from its end could not be detected (an interrupted run: resume it to finish)")
    try:
        results = json.loads(res_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return fail(f"results.json is not valid JSON ({exc})")
    if not isinstance(results, dict):
        return fail("results.json is not a JSON object")
    privacy = results.get("privacy") or {}
    if not isinstance(privacy, Mapping):
        return fail("results.json's privacy section is not a JSON object")
    charged: set[str] = set()
    for d in dirs:
        rel = (d / LEDGER_FILENAME).relative_to(run_dir).as_posix()
        try:
            anchor = _anchor(results, privacy, run_dir, d)
            v = verify_ledger(d, public_key=(public_keys or {}).get(rel), anchor=anchor)
        except LedgerError as exc:
            return fail(f"{rel}: {str(exc).replace(str(d / LEDGER_FILENAME) + ': ', '')}")
        checks.append(LedgerCheck(rel, v))
        if not v.ok:
            return fail(f"{rel}: {v.first_bad_entry}")
        with Ledger.open(d) as led:
            problem = _cross_check(led, anchor, privacy, composed)
            charged |= set(led.markets())
        if problem:
            return fail(f"{rel}: {problem}")
    missing = sorted(set(privacy) - charged)
    if missing:
        return fail(f"results.json reports epsilon for {', '.join(missing)} but no ledger of the run "
                    "charges it (a ledger was removed?)")
    try:
        problem = _verify_methods(run_dir, dirs, results, checks, composed)
    except LedgerError as exc:
        problem = str(exc)
    if problem:
        return fail(problem)
    return RunVerification(ok=True, problem=None, ledgers=tuple(checks), composed=composed)


def _verify_methods(run_dir: Path, dirs: list[Path], results: dict, checks: list[LedgerCheck],
                    composed: ComposedAccountants) -> str | None:
    """Every method the run trained on raw rows: its ledger (baselines) verified like the deployed
    one, and ``results.json``'s per-market totals recomputed from all of them."""
    lset = read_run_ledgers(run_dir, dirs)
    for f in lset.deployed_files:
        with Ledger.open(f) as led:
            if led.method not in (None, lset.deployed):
                return f"{f.relative_to(run_dir).as_posix()}: tagged as {led.method!r}, not the deployed method"
    if lset.unexpected:
        return (f"{lset.unexpected[0].relative_to(run_dir).as_posix()}: a ledger of a method the run's "
                "configuration does not name")
    accounting = results.get("accounting")
    if not (lset.baseline_files or lset.non_private):
        return None   # one method: the deployed ledger(s) above are the whole spend
    if not isinstance(accounting, Mapping) or not isinstance(accounting.get("methods"), Mapping):
        return ("results.json has no accounting section, but the run trained "
                f"{', '.join(lset.methods)} on the same markets: its total spend is not reported")
    for m, f in lset.baseline_files.items():
        rel = f.relative_to(run_dir).as_posix()
        entry = accounting["methods"].get(m)
        if not f.is_file():
            return f"{rel}: missing, but the run trained {m} on raw rows: its spend must be on a ledger"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("head"), Mapping):
            return f"{rel}: results.json holds no head for this ledger"
        anchor = LedgerAnchor.from_dict(entry["head"])
        v = verify_ledger(f, anchor=anchor)
        checks.append(LedgerCheck(rel, v))
        if not v.ok:
            return f"{rel}: {v.first_bad_entry}"
        privacy = entry.get("privacy") if isinstance(entry.get("privacy"), Mapping) else {}
        with Ledger.open(f) as led:
            if led.method != m:
                return f"{rel}: tagged as {led.method!r}, not {m!r}"
            problem = _cross_check(led, anchor, privacy, composed)
            uncharged = sorted(set(privacy) - set(led.markets()))
        if problem:
            return f"{rel}: {problem}"
        if uncharged:
            return f"{rel}: results.json reports {m}'s epsilon for {', '.join(uncharged)}, which it does not charge"
    shown = accounting.get("total")
    if not isinstance(shown, Mapping):
        return "results.json reports no total spend per market"
    for market, t in run_totals(lset, composed=composed).items():
        s = shown.get(market)
        if not isinstance(s, Mapping):
            return f"results.json reports no total spend for {market}"
        if t.infinite:
            if s.get("infinite") is not True:
                return (f"results.json reports a finite total for {market}, but "
                        f"{', '.join(t.non_private)} read its raw rows without DP")
        elif s.get("infinite") or not isinstance(s.get("epsilon"), (int, float)) \
                or not _close(s["epsilon"], t.epsilon, EPSILON_RTOL):
            return (f"results.json reports a total of {s.get('epsilon')!r} for {market}; the ledgers' events "
                    f"of every method give {t.epsilon:.4f}")
    return None


def require_verified_run(run_dir: Path, *,
                         public_keys: Mapping[str, IdentityPublicKey] | None = None) -> RunVerification:
    """:func:`verify_run`, raising LedgerError (one line, the first bad entry) unless it passed."""
    check = verify_run(run_dir, public_keys=public_keys)
    if not check.ok:
        raise VerificationError(f"ledger verification FAILED: {check.problem}")
    return check
