"""Round hooks: what the privacy layer gets to say around every raw-data federated round.

Every federated method (FedMM's stages, PF-MSMTrec) calls the same :class:`RoundHooks`; the
privacy session (:class:`~fedmm_secure.privacy.session.PrivacySession`) overrides them, and the
defaults are those of a non-private run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..privacy.validation import EXACT, ValidationAccess

__all__ = ["RoundHooks"]


class RoundHooks:
    """Called around every raw-data federated round; the privacy session overrides both.

    ``validation_accounted``: validation reads are noisy releases paid from the run's budget
    (the privacy session), so the FedMM stages compare fewer candidates (see
    :mod:`~fedmm_secure.federation.fedmm.selection`).

    ``before_round`` returns the markets allowed to train this round (a market over its budget
    skips training but still takes part in the secure sum with its unchanged, already-private
    parameters); ``before_release`` runs after local training and before anything leaves the
    markets: the ledger is written there, so a crash never under-counts spent epsilon.
    """

    validation_accounted: bool = False

    def before_round(self, stage: str, rnd: int, markets: Sequence[str]) -> set[str]:
        return set(markets)

    def before_release(self, stage: str, rnd: int) -> None:
        return None

    def upload_bounds(self, label: str, bounds: np.ndarray) -> np.ndarray:
        """Bounds announced to the secure sum: widened when markets add noise, so that noise is
        never clipped (clipping a share of distributed noise would void the sum's guarantee)."""
        return bounds

    def perturb_upload(self, label: str, rnd: int, market: str, vector: np.ndarray,
                       bounds: np.ndarray) -> np.ndarray:
        """Market-side noise on an upload (distributed DP on the sum); identity by default."""
        return vector

    def validation_access(self, market: str, purpose: str, releases: int = 1) -> ValidationAccess:
        """How ``market`` may read its validation rows for ``releases`` releases (a model
        comparison, a calibration step), or its training rows for the one full-batch release
        that is not a DP-SGD step (the shared-key counts, ``purpose="key-counts"``): exactly in
        a non-private run; the privacy session accounts them and hands out Gaussian noise. Call
        only between rounds."""
        return EXACT
