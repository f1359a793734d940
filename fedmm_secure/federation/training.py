"""Local training loops, shaped for DP-SGD.

Every raw-data loop Poisson-samples its batches (each record joins a step independently with
probability ``sample_rate``), so the sample rate an accountant needs is known exactly, and
losses are per record (``reduction='none'``), which per-sample clipping needs. The federation
code asks a :data:`TrainerFactory` for a trainer per (market, stage): baselines get
:class:`PlainTrainer`; private runs get a DP trainer (``privacy.session``) that clips, noises
and reports a privacy event for every step it takes. Models are built under :func:`seeded`, so
their initial weights come from the market's own generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError
from ..models.optim import adam
from ..privacy.randomness import poisson_indices
from ..privacy.sampling import capped_sample_rate

__all__ = ["TrainSettings", "LocalTrainer", "TrainerFactory", "PlainTrainer", "plain_trainers", "sample_rate_for",
           "seeded"]

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (model, record indices) -> (B,) losses


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    max_steps_per_epoch: int | None = None   # see capped_sample_rate

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError("epochs", "must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be >= 1")
        if not self.lr > 0:
            raise ConfigError("lr", "must be > 0")


@contextmanager
def seeded(generator: torch.Generator) -> Iterator[None]:
    """Module initialisers draw from torch's global RNG; fork it and seed it from the market's
    own generator so runs are reproducible and the caller's global RNG state is untouched."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def sample_rate_for(n_records: int, batch_size: int, max_steps_per_epoch: int | None = None) -> float:
    """Poisson sample rate giving ``batch_size`` records per step in expectation, raised to
    ``1 / max_steps_per_epoch`` for a market too large for that many steps (``capped_sample_rate``)."""
    return capped_sample_rate(min(1.0, batch_size / max(1, n_records)), max_steps_per_epoch)


class LocalTrainer(Protocol):
    def train_epochs(self, epochs: int) -> int:
        """Train ``epochs`` expected passes; returns the number of steps taken."""


class TrainerFactory(Protocol):
    def __call__(self, *, market: str, stage: str, model: torch.nn.Module, loss_fn: LossFn, n_records: int,
                 users: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> LocalTrainer: ...


class PlainTrainer:
    """Non-private Poisson-sampled Adam. Baselines and non-private runs only."""

    private = False

    def __init__(self, *, model: torch.nn.Module, loss_fn: LossFn, n_records: int, settings: TrainSettings,
                 generator: torch.Generator) -> None:
        self.model, self.loss_fn, self.n = model, loss_fn, n_records
        self.q = sample_rate_for(n_records, settings.batch_size, settings.max_steps_per_epoch)
        self.optimizer = adam(model.parameters(), lr=settings.lr)
        self.generator = generator

    def train_epochs(self, epochs: int) -> int:
        steps = epochs * max(1, math.ceil(1.0 / self.q))
        self.train_steps(steps)
        return steps

    def train_steps(self, steps: int) -> None:
        """``steps`` Poisson-sampled Adam steps (benchmarks time blocks of steps with this)."""
        expected = self.q * self.n
        for _ in range(steps):
            # Geometric skips: O(batch) random numbers per step, not one per record.
            idx = poisson_indices(self.generator, self.n, self.q)
            self.optimizer.zero_grad(set_to_none=True)
            if idx.numel() == 0:
                continue
            # Divide by the expected batch size, as DP-SGD does under Poisson sampling, so private
            # and non-private runs take steps of the same scale.
            (self.loss_fn(self.model, idx).sum() / expected).backward()
            self.optimizer.step()


def plain_trainers(*, market: str, stage: str, model: torch.nn.Module, loss_fn: LossFn, n_records: int,
                   users: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> LocalTrainer:
    return PlainTrainer(model=model, loss_fn=loss_fn, n_records=n_records, settings=settings, generator=generator)
