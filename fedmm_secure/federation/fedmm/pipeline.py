"""One market's share of a FedMM-family method, as a coroutine that asks for what it needs.

This is the single implementation of the ``local``, ``local_codes`` and ``fedmm`` methods for one
market. Whoever runs it only answers its requests (:mod:`.protocol`), so the method does not
know which runtime carries it, and finally gets ``{"metrics": ..., "run": MarketRun}`` back.
The embedded runtime (:func:`~.driver.run_method`) drives every market's pipeline in one
process; the Flower runtime's market worker drives its own market's and forwards its requests to
the aggregator (:mod:`fedmm_secure.runtime.flower.worker`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...config import ModelConfig
from ...data.market import MarketData
from ..hooks import RoundHooks
from ..training import TrainerFactory, plain_trainers
from .evaluation import market_metrics
from .features import MarketRun
from .protocol import Pipeline, PublicMeta
from .stages import cf_stage, ctr_stage, rqvae_stage

__all__ = ["market_pipeline"]


def market_pipeline(data: MarketData, cfg: ModelConfig, *, method: str, rounds: int, seed: int,
                    meta: PublicMeta, trainers: TrainerFactory = plain_trainers, hooks: RoundHooks | None = None,
                    progress: Callable[[str], None] = lambda s: None, codes_only: bool = False) -> Pipeline:
    """``method`` in {local, local_codes, fedmm} for one market; ``codes_only`` stops after stage 2."""
    if method not in ("local", "local_codes", "fedmm"):
        raise ValueError(f"market_pipeline runs local, local_codes or fedmm, not {method!r}")
    hooks = hooks or RoundHooks()
    federated, with_codes = method == "fedmm", method != "local"
    r = MarketRun(data, torch.Generator().manual_seed(seed * 1_000_003 + meta.index))
    if with_codes:
        yield from cf_stage(r, cfg, rounds=rounds, federated=federated, meta=meta, trainers=trainers,
                            hooks=hooks, progress=progress)
        yield from rqvae_stage(r, cfg, rounds=rounds, federated=federated, seed=seed, meta=meta, hooks=hooks,
                               progress=progress)
    if codes_only:
        return {"metrics": {}, "run": r}
    yield from ctr_stage(r, cfg, rounds=rounds, with_codes=with_codes, federated=federated, meta=meta,
                         trainers=trainers, hooks=hooks, progress=progress)
    return {"metrics": market_metrics(r, cfg, with_codes), "run": r}
