"""Long-term identities and the roster a market can pin before a run.

Every backend's roster bundle (:class:`~.base.Roster`) is made fresh for each run (per-run
signing keys, CKKS static agreement keys), so its digest cannot be known in advance. What can be
known in advance is each party's long-term Ed25519 *identity* key: an :class:`IdentityRoster`
lists market -> identity public key plus the aggregator's identity key, and its :meth:`digest`
is what a market pins out of band.

The pin then covers the per-run roster through *endorsements*: each party signs its per-run
bundle with its identity key (:func:`endorse`), bound to the run, the backend, its role and its
name. :func:`check_session_roster` accepts a per-run roster only if it lists exactly the pinned
markets and every bundle, the aggregator's included, carries a valid endorsement by the pinned
key of its owner: an aggregator cannot add a market, drop one or swap a key without a party's
long-term secret.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import ConfigError, IntegrityError, PolicyError, ProtocolError
from ..primitives.keys import IdentityPrivateKey, IdentityPublicKey
from .base import Roster, check_id

__all__ = ["IdentityRoster", "endorse", "verify_endorsement", "check_session_roster", "AGGREGATOR_ROLE",
           "ROSTER_FORMAT"]

ROSTER_FORMAT = "fedmm-secure/identity-roster/v1"
AGGREGATOR_ROLE = "aggregator"
_DIGEST_DOMAIN = b"fedmm-secure/identity-roster/v1\x00"
_ENDORSE_DOMAIN = b"fedmm-secure/v1/roster-endorsement\x00"


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class IdentityRoster:
    """Market -> long-term identity key, and the aggregator's identity key; public.

    JSON form (:meth:`to_json`): ``{"format": ROSTER_FORMAT, "aggregator": "ssh-ed25519 ...",
    "markets": {"US": "ssh-ed25519 ...", ...}}``. Two markets may not share a key (one party
    holding two seats is an added market in disguise).
    """

    markets: Mapping[str, IdentityPublicKey] = field(default_factory=dict)
    aggregator: IdentityPublicKey | None = None

    def __post_init__(self) -> None:
        if not self.markets:
            raise ConfigError("roster", "lists no market")
        for m, k in self.markets.items():
            check_id("roster", m)
            if not isinstance(k, IdentityPublicKey):
                raise ConfigError("roster", f"the key of {m!r} must be an IdentityPublicKey")
        if not isinstance(self.aggregator, IdentityPublicKey):
            raise ConfigError("roster", "names no aggregator identity key",
                              allowed='an "aggregator" entry (its messages must be checkable)')
        keys = [k.to_bytes() for k in self.markets.values()] + [self.aggregator.to_bytes()]
        if len(set(keys)) != len(keys):
            raise ConfigError("roster", "two parties share one identity key")
        object.__setattr__(self, "markets", dict(sorted(self.markets.items())))

    def digest(self) -> bytes:
        """SHA-256 over every (market, key) in name order and the aggregator's key,
        length-prefixed: the value a market pins (``--roster-sha256``)."""
        h = hashlib.sha256(_DIGEST_DOMAIN)
        for m, k in self.markets.items():
            h.update(_pack(m.encode("ascii"), k.to_bytes()))
        h.update(_pack(AGGREGATOR_ROLE.encode("ascii"), self.aggregator.to_bytes()))
        return h.digest()

    def to_json(self) -> str:
        return json.dumps({"format": ROSTER_FORMAT, "aggregator": self.aggregator.to_openssh(),
                           "markets": {m: k.to_openssh() for m, k in self.markets.items()}},
                          indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IdentityRoster:
        """Parse :meth:`to_json` output; anything else raises :class:`ConfigError` saying what."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            raise ConfigError("roster", "not JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT:
            raise ConfigError("roster", "not an identity roster", allowed=f'JSON with "format": "{ROSTER_FORMAT}"')
        markets, agg = raw.get("markets"), raw.get("aggregator")
        if not isinstance(markets, dict) or not isinstance(agg, str):
            raise ConfigError("roster", 'needs "markets" {name: public key} and "aggregator" (public key)')
        try:
            keys = {str(m): IdentityPublicKey.from_openssh(k) if isinstance(k, str) else None
                    for m, k in markets.items()}
            agg_key = IdentityPublicKey.from_openssh(agg)
        except ProtocolError as e:
            raise ConfigError("roster", str(e)) from None
        bad = [m for m, k in keys.items() if k is None]
        if bad:
            raise ConfigError("roster", f"the key of {bad[0]!r} is not a string")
        return cls(keys, aggregator=agg_key)


def _endorsed_bytes(run_id: str, backend: str, role: str, name: str, bundle: bytes) -> bytes:
    return _ENDORSE_DOMAIN + _pack(run_id.encode("utf-8"), backend.encode("utf-8"),
                                   role.encode("ascii"), name.encode("ascii"), bytes(bundle))


def endorse(identity: IdentityPrivateKey, *, run_id: str, backend: str, name: str, bundle: bytes,
            role: str = "market") -> bytes:
    """``identity``'s signature over a per-run ``bundle`` of party ``name`` (role ``"market"``
    or :data:`AGGREGATOR_ROLE`) in run ``run_id`` with ``backend``. A market endorses one bundle
    per run, so a pinned key vouches for exactly the bundle its owner uses."""
    if role not in ("market", AGGREGATOR_ROLE):
        raise ProtocolError(f"unknown role {role!r}")
    return identity.sign(_endorsed_bytes(run_id, backend, role, name, bundle))


def verify_endorsement(key: IdentityPublicKey, signature: object, *, run_id: str, backend: str, name: str,
                       bundle: bytes, role: str = "market") -> None:
    """:class:`IntegrityError` unless ``signature`` is :func:`endorse`'s output for these values
    under ``key``."""
    if not isinstance(signature, (bytes, bytearray)):
        raise IntegrityError()
    key.verify(signature, _endorsed_bytes(run_id, backend, role, name, bundle))


def check_session_roster(pinned: IdentityRoster, roster: Roster, endorsements: Mapping[str, bytes],
                         *, aggregator_endorsement: bytes, run_id: str, backend: str) -> None:
    """Accept ``roster`` (this run's bundles) only if it lists exactly ``pinned``'s markets and
    every bundle, the aggregator's too, is endorsed by its owner's pinned identity key.

    Raises :class:`PolicyError` naming the first problem: an added or missing market, or a
    bundle its pinned owner did not sign (a swapped key).
    """
    added = sorted(set(roster.markets) - set(pinned.markets))
    missing = sorted(set(pinned.markets) - set(roster.markets))
    if added:
        raise PolicyError(f"the roster lists markets that are not on the pinned roster: {', '.join(added)}")
    if missing:
        raise PolicyError(f"the roster omits pinned markets: {', '.join(missing)}")
    for m in roster.markets:
        try:
            verify_endorsement(pinned.markets[m], endorsements.get(m), run_id=run_id, backend=backend, name=m,
                               bundle=roster.bundle(m))
        except IntegrityError:
            raise PolicyError(f"{m}'s key on the roster is not signed by {m}'s pinned identity key") from None
    try:
        verify_endorsement(pinned.aggregator, aggregator_endorsement, run_id=run_id, backend=backend,
                           name=AGGREGATOR_ROLE, bundle=roster.aggregator, role=AGGREGATOR_ROLE)
    except IntegrityError:
        raise PolicyError("the aggregator's key on the roster is not signed by its pinned identity key") from None
