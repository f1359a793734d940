"""Accountants already composed, shared by every reader of one run directory.

Why: ``budget check`` verifies each ledger (recomputing every market's epsilon from its events),
then reads each market's spend and the run's totals; each of those rebuilt a fresh accountant
from the same events and ran the same PLD computation again. One :class:`ComposedAccountants`
handed from the verification to the other readers returns the accountant already built for the
same (accountant name, events); the PLD accountant memoises its epsilon per delta, so the same
composition at the same delta is computed once. A different event list or accountant name gets
its own accountant: results are those of a fresh one, never of another composition.
"""

from __future__ import annotations

from collections.abc import Sequence

from .accountant import PrivacyAccountant, make_accountant
from .events import SubsampledGaussianEvent

__all__ = ["ComposedAccountants"]


class ComposedAccountants:
    """(accountant name, events in order) -> an accountant that composed exactly those events."""

    def __init__(self) -> None:
        self._accountants: dict[tuple[str, tuple[SubsampledGaussianEvent, ...]], PrivacyAccountant] = {}

    def __len__(self) -> int:
        return len(self._accountants)

    def get(self, events: Sequence[SubsampledGaussianEvent], accountant: str = "pld") -> PrivacyAccountant:
        """The accountant for ``events`` (composed in order; mixing units raises as
        :meth:`~.accountant.PrivacyAccountant.compose` does)."""
        key = (accountant, tuple(events))
        acc = self._accountants.get(key)
        if acc is None:
            acc = make_accountant(accountant)
            for e in key[1]:
                acc.compose(e)
            self._accountants[key] = acc
        return acc
