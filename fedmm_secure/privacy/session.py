"""A private run's privacy state: one accountant per market, the ledger, the budget policy, and
the DP-SGD trainers handed to the federation code.

The session is the federation's ``TrainerFactory`` (every raw-data training loop gets a
:class:`~fedmm_secure.privacy.dpsgd.DPTrainer` whose events land here) and its ``RoundHooks``:

* ``before_round``: for each market, the epsilon the round *would* reach is computed; a market
  that would exceed its budget skips the round (``on_exceed="skip"``) or the run stops
  (``"stop"``); the decision goes to the ledger;
* ``before_release``: the round's DP events and the resulting epsilon per market are written
  and committed to the ledger *before* anything trained in the round leaves the markets;
* ``validation_access``: one release computed from a market's validation rows (a noisy model
  comparison or a Platt step, :mod:`.validation`) gets its own ledger round for that market,
  budget decision and event written before the noise is handed out.

The number of validation releases per market is planned up front: they get the noise multiplier
that would spend ``VALIDATION_SHARE`` of the target on its own, and the DP-SGD noise is calibrated
so that training and validation releases together compose to the target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BudgetExceededError, ConfigError
from ..models.optim import adam
from .accountant import PrivacyAccountant, make_accountant
from .budget import BudgetPolicy
from .calibration import calibrate_noise_multiplier
from .dpsgd import DPTrainer, dp_train_epoch
from .events import NoiseSplit, SubsampledGaussianEvent
from .ledger import Ledger
from .randomness import RANDOMNESS, RandomSource, SecureRandom
from .sampling import PoissonRecordSampler, PoissonUserSampler, capped_sample_rate
from .sparse_noise import SparseNoiseConfig
from .validation import VALIDATION_SHARE, ValidationAccess

__all__ = ["MarketPlan", "PrivacySession", "plan_markets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarketPlan:
    """What is known before training: sample rate and planned steps of one market."""

    market: str
    sample_rate: float
    steps_per_round: dict[str, int]   # stage -> DP steps in one round of that stage
    rounds: int

    @property
    def total_steps(self) -> int:
        return self.rounds * sum(self.steps_per_round.values())


def plan_markets(*, unit: str, batch_size: int, epochs: Mapping[str, int], rounds: int,
                 n_records: Mapping[str, int], n_users: Mapping[str, int],
                 n_interactions: Mapping[str, int] | None = None,
                 max_steps_per_epoch: int | None = None) -> dict[str, MarketPlan]:
    """Sample rate and step counts per market. Record level: ``batch_size`` records per step in
    expectation; user and interaction level: the same expected number of records, reached by
    sampling users (interactions). ``n_interactions`` defaults to one per record.
    ``max_steps_per_epoch``: a market large enough to need more steps per epoch samples at
    ``1 / max_steps_per_epoch`` instead (its expected batch grows with its size)."""
    plans = {}
    for m, n in n_records.items():
        if unit == "record":
            q = min(1.0, batch_size / max(1, n))
        else:
            units = n_users[m] if unit == "user" else (n_interactions or n_records)[m]
            records_per_unit = n / max(1, units)
            q = min(1.0, batch_size / max(1.0, records_per_unit) / max(1, units))
        q = capped_sample_rate(q, max_steps_per_epoch)
        steps = max(1, math.ceil(1.0 / q))
        plans[m] = MarketPlan(m, q, {stage: e * steps for stage, e in epochs.items()}, rounds)
    return plans


class PrivacySession:
    # Validation reads are accounted releases (RoundHooks.validation_accounted).
    validation_accounted = True

    def __init__(self, *, unit: str, delta: float, max_grad_norm: float, plans: Mapping[str, MarketPlan],
                 noise_multiplier: float | None, target_epsilon: float | None, accountant: str,
                 policy: BudgetPolicy | None, ledger: Ledger | None, ledger_round_offset: int = 0,
                 prior_events: Mapping[str, Sequence[SubsampledGaussianEvent]] | None = None,
                 randomness: str, noise_seed: int | None = None, market_noise_multiplier: float | None = None,
                 upload_rng: np.random.Generator | None = None, federation_size: int | None = None,
                 interactions: Mapping[str, np.ndarray] | None = None,
                 validation_releases: Mapping[str, int] | None = None,
                 sparse: SparseNoiseConfig | None = None) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError("privacy.noise_multiplier", "give exactly one of a noise multiplier or a target epsilon")
        self.unit, self.delta, self.max_grad_norm = unit, delta, max_grad_norm
        # Sparse embedding noise (DP-AdaFEST) splits each market's calibrated multiplier; the
        # accounting is unchanged (the split composes to it), the ledger records the split.
        self.sparse = sparse
        # Interaction id of every training row, per market (unit="interaction"); a market without
        # them has one row per interaction.
        self.interactions = {m: np.asarray(v, np.int64) for m, v in (interactions or {}).items()}
        self.plans = dict(plans)
        self.policy, self.ledger = policy, ledger
        self.accountant_name = accountant
        if randomness not in RANDOMNESS:
            raise ConfigError("privacy.randomness", f"unknown source {randomness!r}", allowed=", ".join(RANDOMNESS))
        if randomness == "reproducible" and noise_seed is None:
            raise ConfigError("noise_seed", "the reproducible mode needs a noise seed")
        self.randomness = randomness
        self._noise_seed = noise_seed
        self.accountants: dict[str, PrivacyAccountant] = {m: make_accountant(accountant) for m in plans}
        for m, events in (prior_events or {}).items():
            if m in self.accountants:
                for e in events:
                    self.accountants[m].compose(e)
        # --epsilon alone: calibrate sigma per market for its planned steps (markets differ in q).
        # Calibrated for the planned steps as one event; the run composes them round by round,
        # and the discretised accountant's answer depends slightly on that history (~0.3%), so
        # aim 1% low: the reported epsilon must never end above the asked-for target.
        # Validation releases (full-batch Gaussian mechanisms, q = 1) are part of the target:
        # their noise is fixed first (they alone would spend VALIDATION_SHARE of it), then the
        # DP-SGD noise is calibrated for training composed with them.
        self.validation_releases = {m: int(k) for m, k in (validation_releases or {}).items() if k}
        self.validation_noise_multipliers: dict[str, float] = {}
        self.noise_multipliers: dict[str, float] = {}
        for m, p in plans.items():
            k = self.validation_releases.get(m, 0)
            if noise_multiplier is not None:
                self.noise_multipliers[m] = float(noise_multiplier)
                if k:
                    spent = make_accountant(accountant).predict_epsilon(
                        [SubsampledGaussianEvent(p.sample_rate, float(noise_multiplier), p.total_steps, unit)], delta)
                    self.validation_noise_multipliers[m] = calibrate_noise_multiplier(
                        target_epsilon=VALIDATION_SHARE * spent, delta=delta, sample_rate=1.0, steps=k,
                        accountant=accountant, unit=unit)
                continue
            fixed = []
            if k:
                sv = calibrate_noise_multiplier(target_epsilon=VALIDATION_SHARE * 0.99 * target_epsilon, delta=delta,
                                                sample_rate=1.0, steps=k, accountant=accountant, unit=unit)
                self.validation_noise_multipliers[m] = sv
                fixed = [SubsampledGaussianEvent(1.0, sv, k, unit)]
            self.noise_multipliers[m] = calibrate_noise_multiplier(
                target_epsilon=0.99 * target_epsilon, delta=delta, sample_rate=p.sample_rate, steps=p.total_steps,
                accountant=accountant, unit=unit, fixed_events=fixed)
        # Market-level protection: each market adds a share of Gaussian noise to every upload so
        # the *sum* is DP with respect to one market's whole contribution (sensitivity: the L2
        # norm of the public bound vector, add/remove one market). Shares are sized so that the
        # noise of the `t` markets the protocol needs to survive already reaches the target std.
        if market_noise_multiplier is not None and upload_rng is None:
            raise ConfigError("upload_rng", "market-level noise needs a random generator passed in")
        self.market_noise_multiplier = market_noise_multiplier
        self._upload_rng = upload_rng
        n = len(self.plans) if federation_size is None else int(federation_size)
        if n < len(self.plans):
            raise ConfigError("federation_size", f"{n} is fewer than the {len(self.plans)} markets of this session")
        self._honest = max(1, n - n // 3)
        self.market_accountant = make_accountant(accountant) if market_noise_multiplier is not None else None
        self._noised: set[tuple[str, int]] = set()
        self.validation_used: dict[str, int] = defaultdict(int)
        self.epsilon_per_round: dict[str, list[float]] = defaultdict(list)
        self.skipped: dict[str, list[dict]] = defaultdict(list)
        self._pending: dict[str, int] = defaultdict(int)
        self._round = ledger_round_offset
        self._stage_round: tuple[str, int] | None = None
        # The ledger's rounds carry no stage (its schema is hash-chained); results.json names it
        # so a report can tell CF rounds from CTR rounds. A label, not an input to any epsilon.
        self.round_stages: dict[int, str] = {}

    # -- TrainerFactory -------------------------------------------------------------------------
    def __call__(self, *, market: str, stage: str, model: torch.nn.Module, loss_fn, n_records: int,
                 users: torch.Tensor, settings, generator: torch.Generator):
        plan = self.plans[market]
        q = plan.sample_rate
        noise_gen: RandomSource
        sample_gen: RandomSource
        if self.randomness == "secure":
            # Fresh OS-keyed stream per trainer: nothing in the run's config or outputs (the seed
            # included) determines the noise or which records each step samples.
            # Two streams, so the noise can be drawn on its own thread while the sampler runs.
            noise_gen, sample_gen = SecureRandom(), SecureRandom()
        else:
            noise_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator))
                                                      ^ self._noise_seed)
            sample_gen = generator
        if self.unit == "record":
            sampler = PoissonRecordSampler(num_records=n_records, sample_rate=q, generator=sample_gen)
        elif self.unit == "interaction":
            # Sample whole interactions and clip each one's summed gradient: a positive and its
            # negatives leave or join a batch together, so the bound covers all of them.
            ids = self.interactions.get(market, np.arange(n_records, dtype=np.int64))
            if len(ids) != n_records:
                raise ConfigError("privacy.unit", f"market {market!r}: {len(ids)} interaction ids for the "
                                  f"{n_records} rows stage {stage!r} trains on")
            sampler = PoissonUserSampler(user_of_record=torch.from_numpy(ids), sample_rate=q,
                                         generator=sample_gen, unit="interaction")
        else:
            sampler = PoissonUserSampler(user_of_record=users, sample_rate=q, generator=sample_gen)
        # Fused Adam: one pass over each (dense, noised) table per step instead of about ten;
        # same update. The DP trainer seals it like any optimizer (step pre-hook).
        optimizer = adam(model.parameters(), lr=settings.lr)
        trainer = DPTrainer(model, optimizer, loss_fn=lambda mdl, idx: loss_fn(mdl, idx),
                            noise_multiplier=self.noise_multipliers[market], max_grad_norm=self.max_grad_norm,
                            sampler=sampler, on_event=lambda e, m=market: self._on_event(m, e),
                            generator=noise_gen, sparse=self.sparse)
        return _DPLocal(trainer)

    def noise_split(self, market: str) -> NoiseSplit | None:
        """How ``market``'s DP-SGD noise is split between row selection and the gradient
        (None for dense noise)."""
        return None if self.sparse is None else self.sparse.split(self.noise_multipliers[market])

    def _on_event(self, market: str, event: SubsampledGaussianEvent) -> None:
        self._pending[market] += event.steps

    # -- RoundHooks -----------------------------------------------------------------------------
    def before_round(self, stage: str, rnd: int, markets: Sequence[str]) -> set[str]:
        rid = self._round
        self.round_stages[rid] = stage
        if self.ledger is not None:
            self.ledger.record_round_start(rid, list(markets))
        allowed = set()
        for m in markets:
            plan = self.plans[m]
            planned = SubsampledGaussianEvent(plan.sample_rate, self.noise_multipliers[m],
                                              plan.steps_per_round[stage], self.unit)
            if self.policy is None:
                allowed.add(m)
                continue
            try:
                decision = self.policy.decide(self.accountants[m], [planned], market=m)
            except BudgetExceededError as e:  # policy "stop": the refusal is on record first
                if self.ledger is not None:
                    self.ledger.record_decision(m, rid, e.decision)
                    self.ledger.skip_round(rid, e.decision.reason)
                raise
            if self.ledger is not None:
                self.ledger.record_decision(m, rid, decision)
            if decision.allowed:
                allowed.add(m)
            else:
                self.skipped[m].append({"round": rid, "stage": stage, "reason": decision.reason})
                log.warning("round %d (%s): market %s refused by its budget: %s", rid, stage, m, decision.reason)
                if self.ledger is not None:
                    self.ledger.record_skip(m, rid, decision.reason)
        self._stage_round = (stage, rnd)
        return allowed

    def before_release(self, stage: str, rnd: int) -> None:
        rid = self._round
        for m in self.plans:
            steps = self._pending.pop(m, 0)
            if steps:
                event = SubsampledGaussianEvent(self.plans[m].sample_rate, self.noise_multipliers[m], steps, self.unit,
                                                split=self.noise_split(m))
                if self.ledger is not None:
                    self.ledger.record_event(m, rid, event)
                self.accountants[m].compose(event)
            eps = self.accountants[m].get_epsilon(self.delta)
            self.epsilon_per_round[m].append(eps)
            if self.ledger is not None:
                self.ledger.record_epsilon(m, rid, eps, self.delta, self.accountant_name,
                                           certified=self.accountants[m].certified)
        if self.ledger is not None:
            self.ledger.commit_round(rid)
        self._round += 1

    def validation_access(self, market: str, purpose: str, releases: int = 1) -> ValidationAccess:
        """Grant ``releases`` Gaussian releases computed from ``market``'s validation rows (or,
        for the planned shared-key count release, its training rows: a full-batch Gaussian
        mechanism accounted the same way).

        Opens and commits a ledger round of its own for ``market`` (call it when no training round
        is open): the budget decision, then the event and the epsilon after it, all durable before
        the caller draws the noise. A release the budget refuses comes back ``"refused"`` (the
        caller decides without reading the rows), as does one the session did not plan (no
        ledger round then: nothing is read or spent); with ``on_exceed="stop"`` the run stops.
        """
        sigma = self.validation_noise_multipliers.get(market)
        if sigma is None:
            # Nothing was planned (a session built without validation releases): reading the rows
            # would be unaccounted, so the caller decides without them; nothing is spent.
            return ValidationAccess("refused", reason="no validation releases planned", unit=self.unit)
        if self.validation_used[market] + releases > self.validation_releases[market]:
            # The target was split for the planned count: more would exceed it unnoticed without
            # a budget policy.
            raise BudgetExceededError(f"market {market!r}: validation release beyond the "
                                      f"{self.validation_releases[market]} planned for this run")
        event = SubsampledGaussianEvent(1.0, sigma, releases, self.unit)
        rid = self._round
        self._round += 1
        self.round_stages[rid] = purpose
        led = self.ledger
        if led is not None:
            led.record_round_start(rid, [market])
        allowed, reason = True, ""
        if self.policy is not None:
            try:
                decision = self.policy.decide(self.accountants[market], [event], market=market)
            except BudgetExceededError as e:
                if led is not None:
                    led.record_decision(market, rid, e.decision)
                    led.skip_round(rid, e.decision.reason)
                raise
            if led is not None:
                led.record_decision(market, rid, decision)
            allowed, reason = decision.allowed, decision.reason
        if allowed:
            if led is not None:
                led.record_event(market, rid, event)
            self.accountants[market].compose(event)
            self.validation_used[market] += releases
        else:
            self.skipped[market].append({"round": rid, "stage": purpose, "reason": reason})
            log.warning("round %d (%s): market %s refused by its budget: %s", rid, purpose, market, reason)
            if led is not None:
                led.record_skip(market, rid, reason)
        eps = self.accountants[market].get_epsilon(self.delta)
        self.epsilon_per_round[market].append(eps)
        if led is not None:
            led.record_epsilon(market, rid, eps, self.delta, self.accountant_name,
                               certified=self.accountants[market].certified)
            led.commit_round(rid)
        if not allowed:
            return ValidationAccess("refused", reason=reason, unit=self.unit)
        return ValidationAccess("private", sigma, self._validation_source(market, rid), unit=self.unit)

    def _validation_source(self, market: str, rid: int):
        if self.randomness == "secure":
            return SecureRandom()
        # Reproducible (NOT private) runs: a stream fixed by the noise seed, market and round.
        digest = sum(ord(c) * 31 ** i for i, c in enumerate(market)) % (2**31)
        return torch.Generator().manual_seed((self._noise_seed * 1_000_003 + digest * 7_919 + rid) % (2**62))

    # -- market-level noise on uploads ---------------------------------------------------------------
    def _share_std(self, bounds: np.ndarray) -> float:
        return self.market_noise_multiplier * float(np.linalg.norm(bounds)) / math.sqrt(self._honest)

    def upload_bounds(self, label: str, bounds: np.ndarray) -> np.ndarray:
        if self.market_noise_multiplier is None:
            return bounds
        # 9 share-std of headroom: a coordinate's noise exceeds it with probability < 1e-18.
        return bounds + 9.0 * self._share_std(bounds)

    def perturb_upload(self, label: str, rnd: int, market: str, vector: np.ndarray,
                       bounds: np.ndarray) -> np.ndarray:
        if self.market_noise_multiplier is None:
            return vector
        key = (label, rnd)
        if key not in self._noised:  # one Gaussian mechanism per secure sum
            self._noised.add(key)
            self.market_accountant.compose(
                SubsampledGaussianEvent(1.0, float(self.market_noise_multiplier), 1, "market"))
        return vector + self._upload_rng.normal(scale=self._share_std(bounds), size=vector.shape)

    # -- results --------------------------------------------------------------------------------
    def market_level_summary(self) -> dict | None:
        if self.market_accountant is None:
            return None
        return {"unit": "market", "noise_multiplier": self.market_noise_multiplier,
                "secure_sums": len(self._noised), "assumed_surviving_markets": self._honest,
                "sensitivity": "L2 norm of the public bound vector of each upload (add/remove one market)",
                "epsilon": self.market_accountant.get_epsilon(self.delta), "delta": self.delta}

    def summary(self) -> dict:
        out = {}
        for m, acc in self.accountants.items():
            rep = acc.report(self.delta)
            out[m] = {
                "unit": self.unit,
                "delta": self.delta,
                "accountant": self.accountant_name,
                "certified": rep.certified,
                "bound": rep.bound,
                "noise_multiplier": self.noise_multipliers[m],
                "embedding_noise": "dense" if self.sparse is None else {
                    "mode": "sparse", **dataclasses.asdict(self.noise_split(m))},
                "validation": {"releases_planned": self.validation_releases.get(m, 0),
                               "releases_used": self.validation_used.get(m, 0),
                               "noise_multiplier": self.validation_noise_multipliers.get(m)},
                "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.plans[m].sample_rate,
                "steps": acc.steps,
                "epsilon_per_round": list(self.epsilon_per_round[m]),
                "epsilon": rep.epsilon,
                "budget": None if self.policy is None else self.policy.epsilon_budget,
                "skipped_rounds": list(self.skipped[m]),
                "round_stages": {str(r): s for r, s in self.round_stages.items()},
            }
        return out


class _DPLocal:
    private = True

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def train_epochs(self, epochs: int) -> int:
        steps = epochs * self.trainer.sampler.steps_per_epoch
        try:
            dp_train_epoch(self.trainer, lambda idx: idx, steps=steps)
        finally:
            self.trainer.close()
        return steps
