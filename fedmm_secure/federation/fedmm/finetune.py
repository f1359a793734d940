"""Per-market fine-tuning and selection of the pooled ``centralized`` model.

Why: one pooled model (every market's raw rows, a market field) under-fits market differences:
it wins on small markets and loses on large ones, so it was no upper bound. Here each market
continues from the pooled model on **its own training rows only** and keeps, by AUC on **its
own validation split**, either the pooled model or one of its fine-tuned states (the same kind
of selection every federated method makes). The test split is read by nobody here.

Budget: ``rounds`` rounds of ``cfg.ctr_epochs`` epochs each (the pooled training's own
schedule, now on one market's rows), at ``cfg.ctr_lr`` and ``cfg.batch_size``; the
candidates are the pooled model and the state after every round. Non-private by definition
(plain trainers, raw rows), like the pooled model it starts from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...config import ModelConfig
from ...data.market import MarketData, MarketSplit
from ...metrics import evaluate_ctr
from ..training import TrainerFactory, TrainSettings, plain_trainers
from .evaluation import predict
from .features import MarketRun, ctr_inputs

__all__ = ["FineTuned", "shifted", "finetune_market", "finetune_pooled"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FineTuned:
    """One market's selected model: ``chosen`` 0 is the pooled model, k >= 1 the state after
    fine-tuning round k; ``valid_auc[k]`` is candidate k's AUC on the market's validation rows."""

    model: torch.nn.Module
    chosen: int
    valid_auc: list[float]


def shifted(split: MarketSplit, user_offset: int, item_offset: int) -> MarketSplit:
    """``split`` of one market in the pooled market's ID space."""
    return MarketSplit(split.users + user_offset, split.items + item_offset, split.click, split.conversion)


def finetune_market(pooled_run: MarketRun, market: MarketData, index: int, cfg: ModelConfig, *, rounds: int,
                    seed: int, trainers: TrainerFactory = plain_trainers) -> FineTuned:
    """Fine-tune a copy of the pooled CTR model on ``market``'s training rows (market ``index``
    of the pool) and select on its validation rows. Reads only ``market.train`` and
    ``market.valid``; the pooled run's per-user / per-item columns give the fields."""
    uo, io = pooled_run.data.meta["user_offsets"][index], pooled_run.data.meta["item_offsets"][index]
    train, valid = shifted(market.train, uo, io), shifted(market.valid, uo, io)
    xs, y = ctr_inputs(pooled_run, train, True), torch.from_numpy(train.click)
    x_valid = ctr_inputs(pooled_run, valid, True)
    model = copy.deepcopy(pooled_run.ctr)

    def loss(m: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(m(xs[idx]), y[idx], reduction="none")

    def auc() -> float:
        return float(evaluate_ctr(market.valid.click, predict(model, x_valid))["auc"])

    scores = [auc()]
    best = (scores[0], 0, {k: t.clone() for k, t in model.state_dict().items()})
    # Its own generator: a market's result does not depend on the other markets' rows or order.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + index)
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr, cfg.max_steps_per_epoch)
    trainer = trainers(market=market.name, stage="ctr-finetune", model=model, loss_fn=loss, n_records=len(xs),
                       users=torch.from_numpy(train.users), settings=settings, generator=gen)
    for rnd in range(1, rounds + 1):
        trainer.train_epochs(settings.epochs)
        scores.append(auc())
        if scores[-1] > best[0]:
            best = (scores[-1], rnd, {k: t.clone() for k, t in model.state_dict().items()})
    model.load_state_dict(best[2])
    log.info("centralized %s: candidate %d of %d kept (valid AUC %.4f, pooled %.4f)",
             market.name, best[1], rounds, best[0], scores[0])
    return FineTuned(model=model, chosen=best[1], valid_auc=scores)


def finetune_pooled(pooled_run: MarketRun, markets: Sequence[MarketData], cfg: ModelConfig, *, rounds: int,
                    seed: int) -> dict[str, FineTuned]:
    """:func:`finetune_market` for every market of the pool (plain trainers: non-private)."""
    return {m.name: finetune_market(pooled_run, m, i, cfg, rounds=rounds, seed=seed) for i, m in enumerate(markets)}
