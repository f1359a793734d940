"""Exception hierarchy shared by every layer.

Every error the library raises on bad input derives from :class:`FedMMError`, so a caller (the
CLI above all) can turn it into a one-line message without a traceback.
"""

from __future__ import annotations

__all__ = [
    "FedMMError",
    "ConfigError",
    "DataError",
    "ProtocolError",
    "IntegrityError",
    "PolicyError",
    "AbortError",
    "BudgetExceededError",
    "LedgerError",
    "VerificationError",
]


class FedMMError(Exception):
    """Base class of every error raised by fedmm-secure on bad input or a refused operation."""


class ConfigError(FedMMError, ValueError):
    """A configuration value or flag is invalid.

    ``field`` names the offending setting and ``allowed`` describes what would be accepted, so
    the message can say exactly what to change.
    """

    def __init__(self, field: str, message: str, *, allowed: str | None = None) -> None:
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class DataError(FedMMError, ValueError):
    """Input data is malformed; the message names the file and line where known."""


class ProtocolError(FedMMError):
    """A protocol message arrived at the wrong stage, for the wrong round, twice, or with the
    wrong shape. State is left exactly as it was before the message."""


class IntegrityError(ProtocolError):
    """A message failed authentication (signature, AEAD tag) or could not be parsed.

    Deliberately opaque, in the style of pyca/cryptography's ``InvalidTag``: which check failed is
    not said, so a tampering peer learns nothing from the error.
    """

    def __init__(self, message: str = "message failed integrity check") -> None:
        super().__init__(message)


class PolicyError(ProtocolError):
    """A round departs from the market's own policy (roster, cohort, threshold, backend, privacy
    settings). Raised before anything secret leaves the market; the round's state is unchanged
    and it can only be abandoned."""


class AbortError(FedMMError):
    """A protocol round cannot complete (for example fewer than t survivors); nothing partial
    is released."""


class BudgetExceededError(FedMMError):
    """A privacy budget would be exceeded and the policy is to stop."""


class LedgerError(FedMMError):
    """The privacy ledger is missing, corrupt, or inconsistent with the run being resumed."""


class VerificationError(LedgerError):
    """A run's ledger or results failed verification (tampered, truncated, or disagreeing): the
    check ran and its answer is FAIL, which the CLI reports as exit 1 like an exceeded budget."""
