"""Local training loops, shaped for DP-SGD.

Every loop Poisson-samples its batches (each record joins a step independently with probability
``sample_rate``), so the sample rate an accountant needs is known exactly, and losses are
per-record (``reduction='none'``), which is what per-sample clipping needs. A loop that reads raw
interactions is given a :class:`StepSink`: a non-private sink for baselines, or a DP trainer that
clips, noises and reports a privacy event for every step it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["TrainSettings", "poisson_batches", "PlainSteps", "train_poisson"]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError("epochs", "must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be >= 1")
        if not self.lr > 0:
            raise ConfigError("lr", "must be > 0")


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator):
    """Yield ``steps`` index tensors, each a Poisson sample of ``range(n)``.

    Empty batches are yielded too: skipping them would change the sampling distribution the
    accountant assumes."""
    for _ in range(steps):
        mask = torch.rand(n, generator=generator) < sample_rate
        yield torch.nonzero(mask, as_tuple=False).squeeze(1)


class PlainSteps:
    """Non-private optimisation: mean of per-record losses, one optimizer step. Baselines only."""

    private = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def step(self, per_record_loss: Callable[[], torch.Tensor], *, expected_batch: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        losses = per_record_loss()
        if losses.numel() == 0:
            return 0.0
        # Divide by the expected batch size, as DP-SGD does under Poisson sampling, so private
        # and non-private runs take steps of the same scale.
        loss = losses.sum() / expected_batch
        loss.backward()
        self.optimizer.step()
        return float(losses.detach().mean())


def train_poisson(*, n: int, settings: TrainSettings, steps_sink, per_record_loss: Callable[[torch.Tensor], torch.Tensor],
                  generator: torch.Generator, on_epoch: Callable[[int, float], None] | None = None) -> int:
    """Run ``settings.epochs`` epochs of Poisson-sampled steps; returns the number of steps."""
    if n == 0:
        return 0
    q = min(1.0, settings.batch_size / n)
    steps_per_epoch = max(1, int(round(1.0 / q)))
    total = 0
    for epoch in range(settings.epochs):
        losses = []
        for idx in poisson_batches(n, q, steps_per_epoch, generator):
            losses.append(steps_sink.step(lambda idx=idx: per_record_loss(idx), expected_batch=q * n))
            total += 1
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(1, len(losses)))
    return total
