"""The DP session of a FedMM-family run: trainer factory and round hooks from the run's config.

Used wherever FedMM runs privately: the embedded run (all markets in one process), a Flower
market worker (its own market only) and the audit's recomputation of a run's codes, so all three
account the same stages with the same plans.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ...config import SHARING_METHODS, RunConfig
from ...data.market import MarketData
from ...privacy.budget import BudgetPolicy
from ...privacy.events import SubsampledGaussianEvent
from ...privacy.session import PrivacySession, plan_markets
from ...privacy.sparse_noise import sparse_noise_config
from ...privacy.validation import PLATT_STEPS
from ..catalogue import PublicCatalogue
from .driver import public_catalogue

if TYPE_CHECKING:
    from ...privacy.ledger import Ledger

__all__ = ["privacy_session", "validation_releases"]

log = logging.getLogger(__name__)


def validation_releases(cfg: RunConfig, method: str, *, shared_keys: bool) -> int:
    """Gaussian releases from one market's validation rows in a private run of ``method``
    (:mod:`.selection`): one model comparison when federated and a round's two models compete
    (``model.serve: select``, or the staged design: the last round's local against its averaged
    model; none otherwise, as when ``serve: ensemble`` makes them one candidate),
    ``PLATT_STEPS`` for the Platt fit; plus, with
    ``model.key_weights: counts``, the federated methods' one release of per-product training
    counts (:mod:`.joint`), planned the same way (a full-batch Gaussian mechanism) when there
    are ``shared_keys`` to weigh: a release planned and never made would raise the DP-SGD noise
    for nothing."""
    federated = method in SHARING_METHODS
    compete = cfg.model.design == "staged" or cfg.model.serve == "select"
    comparisons = 1 if federated and compete and cfg.model.select_by_validation else 0
    counts = 1 if (federated and shared_keys and cfg.model.design == "joint"
                   and cfg.model.key_weights == "counts") else 0
    return comparisons + counts + (PLATT_STEPS if cfg.model.calibrate else 0)


def privacy_session(cfg: RunConfig, markets: Sequence[MarketData], *, method: str, ledger: Ledger | None,
                    resume_offset: int = 0, prior_events: Mapping[str, Sequence[SubsampledGaussianEvent]] | None = None,
                    method_index: int, federation_size: int | None = None,
                    catalogue: PublicCatalogue | None = None) -> PrivacySession:
    """The DP session (trainer factory + round hooks) for ``markets`` under ``cfg.privacy``.

    ``federation_size``: how many markets take part in the secure sums, when this process holds
    only some of them (a market worker on the Flower runtime); it sizes market-level noise.
    ``catalogue``: the run's public shared keys (whether the count release is planned), built
    from ``markets`` when None, as the embedded run builds them; a market worker that holds its
    own market only passes the list it built from the markets' listings.
    """
    p, mc = cfg.privacy, cfg.model
    catalogue = catalogue if catalogue is not None else public_catalogue(markets)
    # The pipeline releases counts exactly when the catalogue has shared rows (.joint).
    shared_keys = catalogue is not None and len(catalogue.shared_keys) > 0
    if cfg.privacy_unit() == "record" and any(m.train.n_interactions < len(m.train) for m in markets):
        # A registered implicit-feedback dataset defaults to "record" (the default follows the
        # built-in loaders' names): one derived row would then be the protected unit.
        log.warning("privacy.unit is 'record' but the training rows derive from fewer interactions "
                    "(sampled negatives): one row is protected, not one interaction; set privacy.unit: "
                    "interaction")
    plans = plan_markets(unit=cfg.privacy_unit(), batch_size=mc.batch_size,
                         # One budget: in the joint design every method trains only the CTR model on
                         # raw rows (codes and sharing are post-processing), so a FedMM market
                         # trains on `local`'s plan (its releases besides DP-SGD are planned below,
                         # inside the same target); the staged design adds a CF stage.
                         epochs=({"ctr": mc.ctr_epochs} if method == "local" or mc.design == "joint"
                                 else {"cf": mc.cf_epochs, "ctr": mc.ctr_epochs}),
                         rounds=cfg.rounds,
                         n_records={m.name: len(m.train) for m in markets},
                         n_users={m.name: m.n_users for m in markets},
                         n_interactions={m.name: m.train.n_interactions for m in markets},
                         max_steps_per_epoch=mc.max_steps_per_epoch)
    policy = (BudgetPolicy(epsilon_budget=p.epsilon_budget, delta=p.delta, on_exceed=p.on_exceed)
              if p.epsilon_budget is not None else None)
    return PrivacySession(unit=cfg.privacy_unit(), delta=p.delta, max_grad_norm=cfg.max_grad_norm(), plans=plans,
                          noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon,
                          accountant=p.accountant, policy=policy, ledger=ledger, ledger_round_offset=resume_offset,
                          prior_events=prior_events, randomness=p.randomness, noise_seed=cfg.seed * 7_919 + method_index,
                          market_noise_multiplier=p.market_noise_multiplier,
                          federation_size=federation_size,
                          # Every raw-data stage trains on the market's train rows, in order.
                          interactions={m.name: m.train.interaction_ids() for m in markets},
                          # Upload noise must be unpredictable to the other parties: OS entropy.
                          upload_rng=np.random.default_rng(secrets.randbits(128)),
                          # Validation releases are planned with training: the target covers both.
                          sparse=sparse_noise_config(p),
                          validation_releases={m.name: validation_releases(cfg, method, shared_keys=shared_keys)
                                               for m in markets})
