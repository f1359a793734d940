"""A market's own rules on Flower and the checks a worker makes with them before it takes part.

:class:`MarketRules` is set on the market's machine, never by the aggregator: the backends it
runs, its privacy settings, its minimum cohort and c, the roster it pins and the public listings
it trusts. The functions here are the policy half of :class:`~.worker.MarketWorker` (the stage
loop is the other): privacy settings compared with the run's (:func:`run_with_own_privacy`) and
pre-run roster pinning (:func:`pinned_roster_at_hello`, :func:`check_start_roster`).

Pinning: the pin is an :class:`~fedmm_secure.secagg.identity.IdentityRoster` (market -> long-term
identity key, and the aggregator's) or its SHA-256, both obtainable before the run because
identity keys persist (``fedmm-secure keys new``). At ``hello`` a pinning market refuses, before
it answers anything, a roster that differs from its pin or does not hold its own key; at
``start`` it refuses, before any training or secure-aggregation message, a per-run roster that
adds or omits a market or carries a bundle not endorsed by its owner's pinned key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...config import DEFAULT_MAX_GRAD_NORM, PrivacyConfig, RunConfig, config_from_dict
from ...errors import ConfigError, PolicyError
from ...primitives.keys import IdentityPrivateKey
from ...secagg import DEFAULT_COLLUDERS, Roster
from ...secagg.identity import IdentityRoster, check_session_roster
from .keyfiles import read_identity_key, read_roster
from .listings import read_listings
from .wire import unb64

__all__ = ["MarketRules", "own_privacy", "run_with_own_privacy", "pinned_roster_at_hello",
           "check_start_roster", "add_rule_arguments", "rules_from_arguments"]


@dataclass(frozen=True)
class MarketRules:
    """The market's own say over a run, set on the market's machine (never by the aggregator).

    ``backends``: the secure-aggregation backends this market runs (``plain`` only if named).
    ``privacy``: this market's privacy settings; the run config's must equal them (``None``
    accepts only a non-private run). ``min_cohort``: fewest markets in any sum (default
    max(3, ceil(2n/3)) of the roster). ``colluders``: the c of the threshold rule.
    ``roster``: the pinned identity roster (market -> identity key, aggregator's key), obtained
    out of band; ``roster_digest``: its :meth:`~IdentityRoster.digest` (the aggregator then
    sends the roster, which must hash to it). With neither, the market trusts the first roster
    the aggregator shows it (checked only after the run, by comparing the markets' records).
    ``listings``: the public catalogues (market -> product keys) of the run's markets, which the
    market obtained itself; with real data it is where the shared-key list comes from (synthetic
    data: every market's listing is generated from the seed). Never an aggregator's list.
    """

    backends: frozenset[str] = frozenset({"masking", "ckks"})
    privacy: Mapping | None = None
    min_cohort: int | None = None
    colluders: int = DEFAULT_COLLUDERS
    roster_digest: bytes | None = None
    listings: Mapping[str, list[str]] | None = None
    roster: IdentityRoster | None = None

    def __post_init__(self) -> None:
        if self.roster_digest is not None and (not isinstance(self.roster_digest, bytes)
                                               or len(self.roster_digest) != 32):
            raise ConfigError("roster-sha256", "must be a SHA-256 digest", allowed="64 hex digits")
        if (self.roster is not None and self.roster_digest is not None
                and self.roster.digest() != self.roster_digest):
            raise ConfigError("roster-sha256", "the roster file does not hash to the pinned digest")

    @property
    def pins_roster(self) -> bool:
        return self.roster is not None or self.roster_digest is not None

    def privacy_settings(self) -> dict:
        return dict(self.privacy) if self.privacy is not None else {"enabled": False}


# The worker always trains FedMM, so an unset clip norm means FedMM's default, whatever model
# family the aggregator's run config names.
_WORKER_FAMILY = "fedmm"


def _pin_clip(p: PrivacyConfig) -> PrivacyConfig:
    if p.max_grad_norm is not None:
        return p
    return dataclasses.replace(p, max_grad_norm=float(DEFAULT_MAX_GRAD_NORM[_WORKER_FAMILY]))


def own_privacy(rules: MarketRules) -> PrivacyConfig:
    """The market's own privacy settings, complete: every field it does not name takes its
    default (``randomness`` "secure" above all) and an unset clip norm is written out."""
    try:
        own = config_from_dict({"privacy": rules.privacy_settings()}).privacy
    except ConfigError as e:
        raise PolicyError(f"this market's own privacy settings are invalid: {e}") from None
    return _pin_clip(own)


def run_with_own_privacy(cfg: RunConfig, rules: MarketRules) -> RunConfig:
    """``cfg`` (the aggregator's run config) carrying this market's own privacy settings.

    The run's settings must agree with the market's (every market of a run must train alike and
    account alike), but they are only compared: what the market trains and accounts with is its
    own :class:`PrivacyConfig`, so nothing of the aggregator's (its seed-driven
    ``reproducible`` randomness in particular) reaches the DP noise unless the market's own
    settings say so. A mismatch raises :class:`PolicyError` naming the fields.
    """
    own = own_privacy(rules)
    asked = _pin_clip(cfg.privacy)
    if own.enabled or asked.enabled:
        mine, theirs = dataclasses.asdict(own), dataclasses.asdict(asked)
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        if diff:
            detail = ", ".join(f"{k}: run {theirs[k]!r}, market {mine[k]!r}" for k in diff)
            why = (" (reproducible randomness lets anyone with the seed remove the DP noise; a "
                   "market uses it only if its own settings say so)"
                   if "randomness" in diff else "")
            raise PolicyError(f"the run's privacy settings differ from this market's own: {detail}{why}")
    return dataclasses.replace(cfg, privacy=own)


def pinned_roster_at_hello(rules: MarketRules, offered: str | None, *, market: str,
                           identity: IdentityPrivateKey | None) -> IdentityRoster | None:
    """The identity roster this market holds the run to (``None``: it pins none).

    ``offered`` is the roster the aggregator's ``hello`` carries (JSON, or ``None``). A pinning
    market needs its identity key, and refuses with :class:`PolicyError` an offered roster that
    is not its pinned one (a digest-only pin needs the offer to learn the keys), or a pinned
    roster that does not hold this market's own identity key.
    """
    if not rules.pins_roster:
        return None
    if identity is None:
        raise ConfigError("identity-key", "a market that pins a roster needs its identity key",
                          allowed="--identity-key FILE")
    shown = None
    if offered is not None:
        try:
            shown = IdentityRoster.from_json(offered)
        except ConfigError as e:
            raise PolicyError(f"the aggregator's roster is unreadable: {e}") from None
    pinned = rules.roster if rules.roster is not None else shown
    if pinned is None:
        raise PolicyError("this market pins a roster digest, but the aggregator sent no roster")
    if rules.roster_digest is not None and pinned.digest() != rules.roster_digest:
        raise PolicyError("the roster differs from the one this market pinned")
    if shown is not None and shown.digest() != pinned.digest():
        raise PolicyError("the roster differs from the one this market pinned")
    if pinned.markets.get(market) != identity.public_key():
        raise PolicyError(f"the pinned roster does not hold this market's identity key under {market!r}")
    return pinned


def check_start_roster(pinned: IdentityRoster, msg: Mapping, roster: Roster, *, run_id: str,
                       backend: str) -> None:
    """The ``start`` message's per-run ``roster`` against the pin (:func:`check_session_roster`):
    the endorsements travel in ``msg`` as base64 (``endorsements``, ``aggregator_endorsement``)."""
    raw = msg.get("endorsements")
    if not isinstance(raw, dict):
        raise PolicyError("the roster carries no endorsements by the markets' identity keys")
    try:
        endorsements = {str(m): unb64(s) for m, s in raw.items()}
        agg = unb64(msg.get("aggregator_endorsement", ""))
    except Exception:
        raise PolicyError("the roster's endorsements are malformed") from None
    check_session_roster(pinned, roster, endorsements, aggregator_endorsement=agg, run_id=run_id,
                         backend=backend)


def add_rule_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's flags for the market's own rules and its identity key."""
    p.add_argument("--allow-backend", action="append", default=None,
                   help="a secure-aggregation backend this market runs (repeat; default masking and ckks)")
    p.add_argument("--privacy-json", help="this market's own privacy settings (JSON; default: not private)")
    p.add_argument("--min-cohort", type=int, help="fewest markets in any sum (default max(3, 2/3 of the roster))")
    p.add_argument("--colluders", type=int, default=DEFAULT_COLLUDERS, help="c in the threshold rule 2t > n + c")
    p.add_argument("--identity-key", help="this market's long-term identity key (`fedmm-secure keys new`; mode 0600)")
    p.add_argument("--roster", help="the pinned identity roster (JSON, market -> public key and the aggregator's), "
                                    "obtained out of band; needs --identity-key")
    p.add_argument("--roster-sha256", help="the pinned identity roster's SHA-256 (hex), obtained out of band; "
                                           "needs --identity-key")
    p.add_argument("--listings", help="the markets' public catalogues, JSON {market: [key, ...]} (real data: "
                                      "this market's source of the shared-key list)")


def rules_from_arguments(args: argparse.Namespace) -> tuple[MarketRules, IdentityPrivateKey | None]:
    """The market's rules and identity key from :func:`add_rule_arguments`' flags; bad input
    (a key file open to others, a corrupt roster, bad JSON, ...) raises :class:`ConfigError`."""
    digest = None
    if args.roster_sha256 is not None:
        text = args.roster_sha256.strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ConfigError("--roster-sha256", f"got {args.roster_sha256!r}", allowed="64 hex digits")
        digest = bytes.fromhex(text)
    try:
        privacy = json.loads(args.privacy_json) if args.privacy_json else None
    except json.JSONDecodeError as e:
        raise ConfigError("--privacy-json", f"not JSON ({e.msg})") from None
    identity = read_identity_key(Path(args.identity_key)) if args.identity_key else None
    rules = MarketRules(backends=frozenset(args.allow_backend or ("masking", "ckks")), privacy=privacy,
                        min_cohort=args.min_cohort, colluders=args.colluders, roster_digest=digest,
                        roster=read_roster(Path(args.roster)) if args.roster else None,
                        listings=read_listings(Path(args.listings)) if args.listings else None)
    return rules, identity
