"""One call to train a user's own PyTorch model with DP-SGD to a target epsilon.

In the spirit of Opacus's ``make_private_with_epsilon``::

    trainer, privacy = make_private(model, optimizer, loss_fn=per_record_loss,
                                    data_size=len(x), batch_size=64, epochs=5,
                                    target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    for _ in range(privacy.plan.epochs):
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]))
    privacy.epsilon()          # spent so far, <= 3.0

What it does: picks the Poisson sample rate ``q = batch_size / data_size``; calibrates the noise
multiplier with the project's accountant so that ``epochs`` expected passes reach
``target_epsilon`` (never more); builds a :class:`~fedmm_secure.privacy.dpsgd.DPTrainer`
(fast per-record clipping, noise and sampling from an OS-keyed
:class:`~fedmm_secure.privacy.randomness.SecureRandom` unless a seeded generator is passed for
a reproducible, not private, run); seals the optimizer (stepping it outside the trainer raises
:class:`~fedmm_secure.privacy.dpsgd.AccountingBypassError`); and accounts every step, refusing
any step beyond the planned ones with :class:`~fedmm_secure.errors.BudgetExceededError` before
it touches the model. With a ledger, every privacy event and the epsilon it brings are written
durably before the step that spends them is applied.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BudgetExceededError, ConfigError
from .accountant import PrivacyAccountant, check_delta, make_accountant
from .calibration import calibrate_noise_multiplier
from .dpsgd import DPTrainer, LossFn
from .events import SubsampledGaussianEvent
from .ledger import Ledger
from .randomness import RandomSource, SecureRandom
from .sampling import PoissonRecordSampler, PoissonUserSampler

__all__ = ["PrivacyPlan", "PrivateTraining", "make_private"]

log = logging.getLogger(__name__)

UNITS = ("record", "interaction", "user")
# Relative precision of the noise calibration: the planned epsilon ends within about 0.5% below
# the target (the accountant's answer moves less than sigma does near the target).
_CALIBRATION_TOLERANCE = 2e-3


@dataclass(frozen=True)
class PrivacyPlan:
    """What :func:`make_private` decided, before any step ran.

    ``sample_rate``: Poisson probability that a unit (record or user) joins a step;
    ``steps_per_epoch``: ``ceil(1 / sample_rate)``; ``total_steps``: ``epochs * steps_per_epoch``,
    the most steps the trainer will take; ``noise_multiplier``: sigma (noise std / clipping norm);
    ``planned_epsilon``: the accountant's epsilon after ``total_steps`` steps (<= target);
    ``randomness``: ``"secure"`` or ``"reproducible"`` (a seeded generator: NOT private).
    """

    target_epsilon: float
    planned_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    epochs: int
    total_steps: int
    unit: str
    accountant: str
    randomness: str


class PrivateTraining:
    """The privacy side of a :func:`make_private` trainer: its plan, accountant and ledger.

    Receives the trainer's privacy events (it is the trainer's ``on_event``): each one is
    checked against the plan, written to the ledger (if any) and composed into the accountant.
    """

    def __init__(self, plan: PrivacyPlan, *, ledger: Ledger | None, ledger_market: str,
                 ledger_round_offset: int) -> None:
        self.plan = plan
        self.accountant: PrivacyAccountant = make_accountant(plan.accountant)
        self.ledger = ledger
        self.ledger_market = ledger_market
        self._next_round = ledger_round_offset

    @property
    def steps_accounted(self) -> int:
        """Steps reported so far (a prepaid epoch counts in full as soon as it is reported)."""
        return self.accountant.steps

    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta (the accountant's upper bound)."""
        return self.accountant.get_epsilon(self.plan.delta)

    def __call__(self, event: SubsampledGaussianEvent) -> None:
        p = self.plan
        if (event.sample_rate, event.noise_multiplier, event.unit) != (p.sample_rate, p.noise_multiplier, p.unit):
            raise ConfigError("event", f"{event} does not match the plan ({p.sample_rate}, {p.noise_multiplier}, {p.unit})")
        if self.steps_accounted + event.steps > p.total_steps:
            # Raised before the update exists anywhere but in .grad: the trainer discards it.
            raise BudgetExceededError(
                f"{self.steps_accounted + event.steps} DP steps would exceed the {p.total_steps} planned for "
                f"epsilon={p.target_epsilon} at delta={p.delta}; make_private again with more epochs")
        epsilon = self.accountant.predict_epsilon([event], p.delta)
        if self.ledger is not None:
            # Durable before the step is applied; one ledger round per reported event.
            r = self._next_round
            self.ledger.record_round_start(r, [self.ledger_market])
            self.ledger.record_event(self.ledger_market, r, event)
            self.ledger.record_epsilon(self.ledger_market, r, epsilon, p.delta, p.accountant,
                                       certified=self.accountant.certified)
            self.ledger.commit_round(r)
            self._next_round += 1
        self.accountant.compose(event)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be a positive int, got {value!r}")
    return value


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn,
    data_size: int,
    batch_size: int,
    epochs: int,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    unit: str = "record",
    user_of_record: torch.Tensor | None = None,
    interaction_of_record: torch.Tensor | None = None,
    accountant: str = "pld",
    ledger: Ledger | None = None,
    ledger_market: str = "local",
    ledger_round_offset: int = 0,
    generator: RandomSource | None = None,
) -> tuple[DPTrainer, PrivateTraining]:
    """Wrap ``model`` and ``optimizer`` for DP-SGD reaching ``target_epsilon`` after ``epochs``.

    Args:
        model: supported layers only (``nn.Linear``, ``nn.Embedding``, ``nn.EmbeddingBag``,
            ``nn.LayerNorm``, ``AddBias``; no BatchNorm); checked here.
        optimizer: holds exactly the model's trainable parameters; sealed (see module doc).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-record losses (``reduction="none"``).
        data_size: number of records ``N``; the trainer samples record indices in ``[0, N)``.
        batch_size: expected records per step (Poisson sampling: the actual size varies).
        epochs: expected passes over the data; ``epochs * ceil(N / batch_size)`` steps at most.
        target_epsilon, delta: the (epsilon, delta) guarantee for one ``unit``. No defaults.
        max_grad_norm: clipping norm C of each unit's gradient (L2, over all parameters).
        unit: ``"record"``, ``"interaction"`` (then ``interaction_of_record``, a length-N int
            tensor, is required: every record derived from one interaction, e.g. an
            implicit-feedback positive and the negatives sampled for it, shares an id; a step
            samples interactions with all their records and clips their summed gradient) or
            ``"user"`` (then ``user_of_record`` is required; a step samples users with all their
            records).
        accountant: ``"pld"`` (default, certified) or another registered accountant.
        ledger: an open :class:`~fedmm_secure.privacy.ledger.Ledger` (``Ledger.open(path,
            run_config=..., create=True)``); events are recorded as market ``ledger_market``
            in rounds numbered from ``ledger_round_offset``.
        generator: randomness for noise and sampling; default a fresh
            :class:`~fedmm_secure.privacy.randomness.SecureRandom`. A seeded
            ``torch.Generator`` makes the run reproducible and NOT private.

    Returns:
        ``(trainer, privacy)``: the :class:`~fedmm_secure.privacy.dpsgd.DPTrainer` (drive it
        with :func:`~fedmm_secure.privacy.dpsgd.dp_train_epoch` or ``trainer.sample()`` /
        ``trainer.step(batch, draw=...)``) and the :class:`PrivateTraining` holding the
        :class:`PrivacyPlan` and the spent epsilon.

    Raises:
        ConfigError: an invalid setting, an unsupported model, or an unreachable target.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) \
            or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError("target_epsilon", f"must be a finite number > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) \
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ConfigError("max_grad_norm", f"must be a finite number > 0, got {max_grad_norm!r}")
    n = _positive_int("data_size", data_size)
    b = _positive_int("batch_size", batch_size)
    epochs = _positive_int("epochs", epochs)
    if unit not in UNITS:
        raise ConfigError("unit", f"unknown unit {unit!r}", allowed=", ".join(UNITS))
    groups = {"user": ("user_of_record", user_of_record), "interaction": ("interaction_of_record", interaction_of_record)}
    for group_unit, (name, ids) in groups.items():
        if unit == group_unit:
            if not isinstance(ids, torch.Tensor) or ids.shape != (n,) or ids.dtype.is_floating_point:
                raise ConfigError(name, f"{group_unit}-level DP needs a ({n},) integer tensor of {group_unit} ids")
        elif ids is not None:
            raise ConfigError(name, f"only for unit={group_unit!r}")
    if generator is None:
        generator = SecureRandom()
    elif isinstance(generator, torch.Generator):
        log.warning("make_private with a seeded torch.Generator: reproducible and NOT PRIVATE "
                    "(anyone who knows the seed can remove the noise)")
    randomness = "secure" if isinstance(generator, SecureRandom) else "reproducible"

    # Every unit: batch_size records per step in expectation (a grouped step samples users or
    # interactions at the same rate, carrying batch_size records on average).
    q = min(1.0, b / n)
    sampler: PoissonRecordSampler | PoissonUserSampler
    if unit == "record":
        sampler = PoissonRecordSampler(num_records=n, sample_rate=q, generator=generator)
    else:
        ids = groups[unit][1]
        assert ids is not None
        # The grouped sampler works on any grouping of records; the accountant's event carries
        # the unit, so the ledger says which one the epsilon protects.
        sampler = PoissonUserSampler(user_of_record=ids, sample_rate=q, generator=generator, unit=unit)
    total = epochs * sampler.steps_per_epoch
    sigma = calibrate_noise_multiplier(target_epsilon=float(target_epsilon), delta=delta, sample_rate=q,
                                       steps=total, accountant=accountant, unit=unit,
                                       tolerance=_CALIBRATION_TOLERANCE)
    planned = make_accountant(accountant).predict_epsilon([SubsampledGaussianEvent(q, sigma, total, unit)], delta)
    plan = PrivacyPlan(target_epsilon=float(target_epsilon), planned_epsilon=planned, delta=delta,
                       noise_multiplier=sigma, max_grad_norm=float(max_grad_norm), sample_rate=q,
                       expected_batch_size=sampler.expected_batch_size, steps_per_epoch=sampler.steps_per_epoch,
                       epochs=epochs, total_steps=total, unit=unit, accountant=accountant, randomness=randomness)
    privacy = PrivateTraining(plan, ledger=ledger, ledger_market=ledger_market,
                              ledger_round_offset=ledger_round_offset)
    trainer = DPTrainer(model, optimizer, loss_fn=loss_fn, noise_multiplier=sigma, max_grad_norm=float(max_grad_norm),
                        sampler=sampler, on_event=privacy, generator=generator)
    log.info("make_private: q=%.4g, sigma=%.4g, %d steps -> epsilon %.4g (target %.4g) at delta %g",
             q, sigma, total, planned, target_epsilon, delta)
    return trainer, privacy


