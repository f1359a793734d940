"""The Adam every local training loop uses: torch's fused kernel where it applies.

Each step of a DP-SGD loop updates every row of every embedding table (the noise makes every
gradient dense), so the optimizer's pass over the tables is a large share of a step. torch's
default Adam makes about ten passes per tensor; the fused kernel makes one, with the same update
rule (bit-level differences only). It needs floating-point tensors on one device type; anything
else gets the multi-tensor (``foreach``) implementation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["adam", "adam_kernel"]


def adam_kernel(params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """Keyword arguments selecting the fastest Adam implementation for ``params``."""
    ps = list(params)
    if ps and all(p.dtype in (torch.float32, torch.float64) and p.device.type == "cpu" for p in ps):
        return {"fused": True}
    return {"foreach": True}


def adam(params: Iterable[torch.Tensor], *, lr: float) -> torch.optim.Adam:
    ps = [p for p in params if p.requires_grad]
    return torch.optim.Adam(ps, lr=lr, **adam_kernel(ps))
