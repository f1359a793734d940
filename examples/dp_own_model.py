"""DP-SGD on your own PyTorch model in one call: ``fedmm_secure.make_private``.

A small classifier on made-up tabular data is trained to (epsilon=3, delta=1e-5) record-level
DP. ``make_private`` calibrates the noise to the target, draws noise and batches from an
OS-keyed stream, and refuses any optimizer step that did not go through the accountant.

    python examples/dp_own_model.py            # full size
    python examples/dp_own_model.py --small    # what the test suite runs
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fedmm_secure as fm


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1.0, 1.0, 8)
    y = ((x @ w + 0.5 * torch.randn(n, generator=g)) > 0).float()
    return x, y


def per_record_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    xb, yb = batch
    # One loss per record: the trainer clips each record's gradient before it sums them.
    return F.binary_cross_entropy_with_logits(model(xb).squeeze(-1), yb, reduction="none")


def main(small: bool = False) -> dict:
    n = 600 if small else 20_000
    x, y = make_data(n)
    x_test, y_test = make_data(2_000, seed=1)
    torch.manual_seed(0)
    # LayerNorm, not BatchNorm: BatchNorm mixes the records of a batch and is refused.
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    trainer, privacy = fm.make_private(
        model, optimizer, loss_fn=per_record_loss,
        data_size=n, batch_size=60 if small else 256, epochs=2 if small else 5,
        target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)

    for _ in range(privacy.plan.epochs):
        fm.dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]))

    with torch.no_grad():
        accuracy = float(((model(x_test).squeeze(-1) > 0).float() == y_test).float().mean())
    summary = {"epsilon": round(privacy.epsilon(), 4), "target_epsilon": privacy.plan.target_epsilon,
               "delta": privacy.plan.delta, "noise_multiplier": round(privacy.plan.noise_multiplier, 4),
               "sample_rate": privacy.plan.sample_rate, "steps": trainer.steps_taken,
               "test_accuracy": round(accuracy, 4)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(small="--small" in sys.argv)
