"""A model that serves the mean of its members' logits (an ensemble of CTR models)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["LogitMean"]


class LogitMean(torch.nn.Module):
    """``forward(x)``: the mean of every member's ``forward(x)`` (logits, not probabilities:
    averaging logits keeps each member's ranking information where averaging probabilities
    would let the member with the more extreme outputs dominate)."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("LogitMean needs at least one member")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)
