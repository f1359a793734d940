"""What a failed contract check raises."""

from __future__ import annotations

from ..errors import FedMMError

__all__ = ["ContractViolation", "require"]


class ContractViolation(FedMMError, AssertionError):
    """An implementation breaks its registry's contract (the message says which rule).

    An ``AssertionError`` too, so test runners report it as a test failure, not an error.
    """


def require(condition: bool, message: str) -> None:
    """Raise :class:`ContractViolation` with ``message`` unless ``condition`` holds (unlike
    ``assert``, never compiled away)."""
    if not condition:
        raise ContractViolation(message)
