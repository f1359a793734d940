"""White-box gradient-canary audit of DP-SGD (Nasr et al. 2023; one run, Steinke et al. 2023).

The auditor plants ``m`` Dirac canaries: canary ``i`` owns one coordinate of the model that no
real record touches (extra embedding rows appended for the audit) and its gradient is ``+C`` on
that coordinate (norm exactly the clipping norm ``C``). Each canary is included in the data
independently with probability 1/2. An included canary is a unit of the DP mechanism like any
other: the run's own Poisson sampler draws it at rate ``q`` each step, its gradient is clipped as
its unit is (at user level a canary is a user with several records whose summed gradient is
clipped), added to the clipped sum, noised and scaled by the run's :class:`DPTrainer`. The
auditor sees what DP-SGD's accounting protects: the privatised gradient of every step (white
box, intermediate updates), read from the optimizer as the trainer hands it over. Canary ``i``
is scored by the Neyman-Pearson log-likelihood ratio of "in" against "out" over the steps::

    sum_t log((1 - q) + q exp((y_t C - C^2 / 2) / (sigma C)^2)),

``y_t`` its coordinate of the step's noisy clipped sum, ``sigma`` the ledger's noise multiplier.

Same code path as training. :func:`run_gradient_canaries` builds a model whose only trainable
parameters are the canary coordinates and drives :class:`~fedmm_secure.privacy.dpsgd.DPTrainer`
``.sample()`` / ``.step()`` with the project's samplers, clipping and noise sources. Real records
are left out of the simulation because they contribute exactly zero to these coordinates and the
noise is independent per coordinate: the canary coordinates of the full run's privatised
gradient have the same distribution, up to the public ``1 / (q N)`` scale that the auditor
multiplies out. Several independent audits (``repeats``) share one trainer as disjoint blocks of
coordinates: each record touches only its own coordinate and is sampled independently, so the
blocks are independent runs of the mechanism.

The planted accounting bug (``trained_noise_multiplier``): the trainer noises with a different
multiplier than the ledger reports; the scores and the claim tested use the ledger's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..privacy.dpsgd import DPTrainer
from ..privacy.events import SubsampledGaussianEvent
from ..privacy.randomness import RandomSource, SecureRandom
from ..privacy.sampling import PoissonRecordSampler, PoissonUserSampler

__all__ = ["DPSGDMechanism", "CanaryObservation", "canary_llr", "run_gradient_canaries"]


@dataclass(frozen=True)
class DPSGDMechanism:
    """What a market's ledger says its DP-SGD did: rate, noise multiplier, steps, clipping, unit."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float
    unit: str
    delta: float

    def __post_init__(self) -> None:
        if not (0 < self.sample_rate <= 1):
            raise ConfigError("sample_rate", f"must be in (0, 1], got {self.sample_rate!r}")
        for name in ("noise_multiplier", "max_grad_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(name, f"must be finite and > 0, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError("steps", f"must be a positive int, got {self.steps!r}")
        if self.unit not in ("record", "user", "interaction"):
            raise ConfigError("unit", f"unknown unit {self.unit!r}", allowed="record, user, interaction")
        if not (0 < self.delta < 1):
            raise ConfigError("delta", f"must be in (0, 1), got {self.delta!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CanaryObservation:
    """Per repeat and canary: the inclusion coin and the auditor's score (repeats x m)."""

    included: np.ndarray
    scores: np.ndarray
    trained_noise_multiplier: float


def canary_llr(y: np.ndarray, *, sample_rate: float, noise_multiplier: float, max_grad_norm: float) -> np.ndarray:
    """One step's log-likelihood ratio of "in" vs "out" for noisy clipped-sum coordinates ``y``."""
    c, s = float(max_grad_norm), float(noise_multiplier)
    z = (np.asarray(y, float) * c - c * c / 2.0) / (s * c) ** 2
    with np.errstate(divide="ignore"):  # q = 1: the "not sampled" branch has probability 0
        return np.logaddexp(np.log1p(-sample_rate), math.log(sample_rate) + z)


def run_gradient_canaries(mechanism: DPSGDMechanism, *, m: int, repeats: int = 1,
                          trained_noise_multiplier: float | None = None, records_per_user: int = 2,
                          coins: np.random.Generator | None = None, generator: RandomSource | None = None,
                          progress: Callable[[int], None] | None = None) -> CanaryObservation:
    """Run ``repeats`` independent audits of ``m`` Dirac canaries through the project's DP-SGD.

    ``coins``: the auditor's inclusion coins (default fresh OS entropy). ``generator``: the
    trainer's sampling and noise source, a :class:`SecureRandom` by default as in every run (a
    seeded ``torch.Generator`` makes tests reproducible). ``progress(step)`` after every step.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ConfigError("canaries", f"need an int >= 2, got {m!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError("repeats", f"must be a positive int, got {repeats!r}")
    if not isinstance(records_per_user, int) or records_per_user < 1:
        raise ConfigError("records_per_user", f"must be a positive int, got {records_per_user!r}")
    trained = float(trained_noise_multiplier if trained_noise_multiplier is not None else mechanism.noise_multiplier)
    coins = coins if coins is not None else np.random.default_rng()
    generator = generator if generator is not None else SecureRandom()
    included = coins.random((repeats, m)) < 0.5
    coord = torch.from_numpy(np.flatnonzero(included.ravel())).long()
    if coord.numel() == 0:  # probability 2^-(repeats m)
        raise ConfigError("canaries", "no canary was included (every coin came up tails); run again")
    c = float(mechanism.max_grad_norm)
    user_level = mechanism.unit != "record"
    # One coordinate per canary of every repeat; no other trainable parameter.
    model = nn.Embedding(repeats * m, 1)
    nn.init.zeros_(model.weight)
    records = coord.repeat_interleave(records_per_user) if user_level else coord
    sampler: PoissonRecordSampler | PoissonUserSampler
    if user_level:
        owner = torch.arange(coord.numel()).repeat_interleave(records_per_user)
        sampler = PoissonUserSampler(user_of_record=owner, sample_rate=mechanism.sample_rate,
                                     generator=generator, unit=mechanism.unit)
    else:
        sampler = PoissonRecordSampler(num_records=int(records.numel()), sample_rate=mechanism.sample_rate,
                                       generator=generator)

    def loss_fn(mdl: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        # d loss / d w_i = C on the canary's own coordinate: a Dirac gradient of norm C per
        # record (a user's records add up and are clipped back to C, as the user unit is).
        return mdl(records[idx]).view(-1) * c

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scores = np.zeros(repeats * m)
    scale = sampler.expected_batch_size  # the trainer divides the noisy sum by q N; undo it

    def observe(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        # The privatised gradient exactly as the trainer hands it to the optimizer.
        y = model.weight.grad.detach().view(-1).numpy() * scale
        np.add(scores, canary_llr(y, sample_rate=mechanism.sample_rate,
                                  noise_multiplier=mechanism.noise_multiplier, max_grad_norm=c), out=scores)

    events: list[SubsampledGaussianEvent] = []
    trainer = DPTrainer(model, optimizer, loss_fn=loss_fn, noise_multiplier=trained, max_grad_norm=c,
                        sampler=sampler, on_event=events.append, generator=generator)
    optimizer.register_step_pre_hook(observe)
    try:
        for step in range(mechanism.steps):
            draw = trainer.sample()
            trainer.step(draw.indices, draw=draw)
            if progress is not None:
                progress(step + 1)
    finally:
        trainer.close()
    return CanaryObservation(included=included, scores=scores.reshape(repeats, m),
                             trained_noise_multiplier=trained)
