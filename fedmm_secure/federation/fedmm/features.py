"""One market's state during a FedMM-family run, and what its models read from it.

:class:`MarketRun` holds everything a market keeps (it never leaves the market except through
the secure sum); the helpers build the models' input tensors from a split and move named
parameters to and from the flat float64 vectors the secure sum adds up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...config import ModelConfig
from ...data.market import MarketData, MarketSplit
from ...models.calibration import PlattScaling
from ...models.cf import CFModel
from ...models.rqvae import RQVAE

__all__ = ["MarketRun", "split_tensors", "flat_params", "load_flat", "item_inputs", "ctr_fields", "ctr_inputs"]


@dataclass
class MarketRun:
    """Everything one market holds during a method's run (never leaves the market except
    through the secure sum)."""

    data: MarketData
    generator: torch.Generator
    cf: CFModel | None = None
    vq: RQVAE | None = None
    ctr: torch.nn.Module | None = None   # the registered CTR model (model.ctr_model)
    codes: tuple[np.ndarray, np.ndarray] | None = None
    history: dict = field(default_factory=dict)
    # One-budget design (:mod:`.joint`): the CTR model's fields in order, each read from a
    # per-user or per-item column ("user"/"item" side, column, cardinality). None: the staged
    # design's fixed fields (user, item[, code1, code2]).
    columns: list[tuple[str, str, np.ndarray, int]] | None = None
    # The served model's Platt map of its CTR logits (None: calibration off or not fitted yet).
    platt: PlattScaling | None = None


def split_tensors(split: MarketSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(split.users), torch.from_numpy(split.items), torch.from_numpy(split.click))


def flat_params(module: torch.nn.Module, names: Sequence[str]) -> np.ndarray:
    params = dict(module.named_parameters())
    return np.concatenate([params[n].detach().double().numpy().ravel() for n in names])


@torch.no_grad()
def load_flat(module: torch.nn.Module, names: Sequence[str], vec: np.ndarray) -> None:
    params = dict(module.named_parameters())
    pos = 0
    for n in names:
        p = params[n]
        k = p.numel()
        p.copy_(torch.from_numpy(vec[pos:pos + k].reshape(p.shape)).to(p.dtype))
        pos += k


def item_inputs(r: MarketRun) -> torch.Tensor:
    """The RQ-VAE's inputs: the market's standardised CF item embeddings."""
    # Post-processing of the (DP-trained) CF model: no raw interaction is read here.
    emb = r.cf.all_item_embeddings().float()
    return (emb - emb.mean(0)) / (emb.std(0) + 1e-6)


def ctr_fields(r: MarketRun, cfg: ModelConfig, with_codes: bool) -> list[tuple[str, int]]:
    if r.columns is not None:
        return [(name, card) for name, _, _, card in r.columns]
    fields = [("user", r.data.n_users), ("item", r.data.n_items)]
    if with_codes:
        fields += [("code1", cfg.n_global), ("code2", cfg.n_local)]
    return fields


def ctr_inputs(r: MarketRun, split: MarketSplit, with_codes: bool) -> torch.Tensor:
    if r.columns is not None:
        cols = [col[split.users if side == "user" else split.items] for _, side, col, _ in r.columns]
        return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
    cols = [split.users, split.items]
    if with_codes:
        cols += [r.codes[0][split.items], r.codes[1][split.items]]
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
