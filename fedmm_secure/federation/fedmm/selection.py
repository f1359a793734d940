"""Validation-based choices of a FedMM-family market: the kept CTR model and the served Platt map.

Both read the market's validation rows, and both shape what the market serves, so under DP both
are releases accounted on the market's ledger (:mod:`fedmm_secure.privacy.validation`); the
hooks say how the rows may be read (:meth:`~fedmm_secure.federation.hooks.RoundHooks.validation_access`):

* exact (non-private run): the candidate with the highest validation AUC is kept, and the Platt
  map is the maximum-likelihood fit, as without DP;
* private: the candidates are those of the **last round only** (federated with
  ``model.serve: select``: its local and its averaged model, one noisy difference of Brier
  scores, one release for the whole run; otherwise the round's one candidate, kept without a
  comparison: with ``serve: ensemble`` the mean of the two models' logits). Comparing across rounds by a Brier score
  would favour the early, barely trained models, whose probabilities stay near the base rate
  while DP-SGD inflates later logits (measured: bench/RESULTS_fedmm_dp.md), and every
  comparison costs budget; only the served model depends on the choice, so earlier rounds'
  pairs are not compared at all. The Platt map comes from a few noisy Newton steps (one
  release of ``PLATT_STEPS`` steps);
* refused by the budget: no row is read; the newer candidate is kept (what a run without
  selection serves) and the map stays the identity.

With ``model.select_by_validation: false`` no candidate is compared: the market serves its final
model, and with ``model.calibrate: false`` as well the validation rows are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...metrics import evaluate_ctr
from ...models.calibration import PlattScaling, fit_platt
from ...privacy.validation import PLATT_STEPS, brier_rows, noisy_difference, private_platt, unit_index
from ..hooks import RoundHooks
from .features import MarketRun

__all__ = ["ModelSelector", "served_calibration"]

SELECT = "ctr-select"       # ledger stage label of a model comparison
CALIBRATE = "calibrate"     # ledger stage label of the Platt fit


class ModelSelector:
    """Keeps the best of the candidate models one market sees (see the module doc)."""

    def __init__(self, r: MarketRun, hooks: RoundHooks, *, enabled: bool) -> None:
        self.r, self.hooks, self.enabled = r, hooks, enabled
        self.last_round_only = bool(hooks.validation_accounted)
        self.active = True
        self.labels = r.data.valid.click
        self.best: tuple[np.ndarray, Any] | None = None    # (validation probabilities, snapshot)
        r.history["valid_selection"] = []

    def start_round(self, final: bool) -> None:
        """A new round's candidates follow (``final``: the run's last round); under DP only the
        last round's compete and earlier ones are not even scored."""
        if self.last_round_only:
            self.best = None
            self.active = final

    @property
    def exact(self) -> bool:
        """Comparisons are exact and free (a run without DP): offer every model worth comparing."""
        return not self.last_round_only

    @property
    def looking(self) -> bool:
        """Whether a candidate offered now is scored (else :meth:`consider` does nothing)."""
        return self.enabled and self.active

    def consider(self, probs: Callable[[], np.ndarray], snapshot: Callable[[], Any]) -> None:
        """Offer the market's current model: ``probs()`` its validation click probabilities,
        ``snapshot()`` what to restore if it is kept."""
        if not self.looking:
            return
        if self.best is None:   # the first candidate is kept without a comparison: no release
            self.best = (probs(), snapshot())
            return
        access = self.hooks.validation_access(self.r.data.name, SELECT, 1)
        if access.mode == "refused":
            self.best = (probs(), snapshot())   # the newer candidate; nothing is released
            self.r.history["valid_selection"].append({"kept": "newer", "refused": True})
            return
        p = probs()
        if access.mode == "exact":
            new, old = evaluate_ctr(self.labels, p)["auc"], evaluate_ctr(self.labels, self.best[0])["auc"]
            better = bool(new > old)
            self.r.history["valid_selection"].append({"auc": float(new), "kept_auc": float(old), "kept": better})
        else:
            index, n = unit_index(self.r.data.valid, access.unit)
            d = noisy_difference(brier_rows(self.labels, p), brier_rows(self.labels, self.best[0]), index, n, access)
            better = d < 0
            self.r.history["valid_selection"].append({"noisy_brier_difference": d, "kept": better})
        if better:
            self.best = (p, snapshot())

    def kept(self) -> Any | None:
        """The kept candidate's snapshot; None: keep the current (final) model."""
        return None if self.best is None else self.best[1]


def served_calibration(r: MarketRun, hooks: RoundHooks, valid_logits: np.ndarray) -> PlattScaling:
    """The Platt map of the served model's CTR logits, from the market's validation rows."""
    access = hooks.validation_access(r.data.name, CALIBRATE, PLATT_STEPS)
    if access.mode == "exact":
        return fit_platt(valid_logits, r.data.valid.click)
    if access.mode == "refused":
        return PlattScaling()
    index, n = unit_index(r.data.valid, access.unit)
    return private_platt(valid_logits, r.data.valid.click, index, n, access, PLATT_STEPS)
