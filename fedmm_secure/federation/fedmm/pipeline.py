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
from .evaluation import logits, market_metrics
from .features import MarketRun, ctr_inputs
from .joint import JOINT_METHODS, joint_stage
from .protocol import Pipeline, PublicMeta
from .selection import served_calibration
from .stages import cf_stage, ctr_stage, rqvae_stage

__all__ = ["market_pipeline"]


def market_pipeline(data: MarketData, cfg: ModelConfig, *, method: str, rounds: int, seed: int,
                    meta: PublicMeta, trainers: TrainerFactory = plain_trainers, hooks: RoundHooks | None = None,
                    progress: Callable[[str], None] = lambda s: None, codes_only: bool = False,
                    true_level1: bool = False) -> Pipeline:
    """``method`` in {local, local_codes, fedavg, fedmm} for one market.

    ``cfg.design == "joint"`` (default): one DP-trained CTR model, codes and sharing derived
    from it (:mod:`.joint`). ``"staged"``: CF, RQ-VAE and CTR stages (``fedavg`` is joint-only);
    ``codes_only`` (the audit's recomputation of codes) stops the staged design after stage 2.
    ``true_level1`` (joint design, evaluation reference only): the item's true cluster
    (``data.item_cluster``) replaces its learned level-1 code.
    """
    if method not in JOINT_METHODS:
        raise ValueError(f"market_pipeline runs {', '.join(JOINT_METHODS)}, not {method!r}")
    hooks = hooks or RoundHooks()
    r = MarketRun(data, torch.Generator().manual_seed(seed * 1_000_003 + meta.index))
    if cfg.design == "joint" and not codes_only:
        yield from joint_stage(r, cfg, method=method, rounds=rounds, seed=seed, meta=meta, trainers=trainers,
                               hooks=hooks, progress=progress, true_level1=true_level1)
        _calibrate(r, cfg, hooks, r.codes is not None)
        return {"metrics": market_metrics(r, cfg, r.codes is not None), "run": r}
    if method == "fedavg":
        raise ValueError("fedavg exists in the joint design only (model.design = joint)")
    if true_level1:
        raise ValueError("true level-1 codes exist in the joint design only (model.design = joint)")
    federated, with_codes = method == "fedmm", method != "local"
    if with_codes:
        yield from cf_stage(r, cfg, rounds=rounds, federated=federated, meta=meta, trainers=trainers,
                            hooks=hooks, progress=progress)
        yield from rqvae_stage(r, cfg, rounds=rounds, federated=federated, seed=seed, meta=meta, hooks=hooks,
                               progress=progress)
    if codes_only:
        return {"metrics": {}, "run": r}
    yield from ctr_stage(r, cfg, rounds=rounds, with_codes=with_codes, federated=federated, meta=meta,
                         trainers=trainers, hooks=hooks, progress=progress)
    _calibrate(r, cfg, hooks, with_codes)
    return {"metrics": market_metrics(r, cfg, with_codes), "run": r}


def _calibrate(r: MarketRun, cfg: ModelConfig, hooks: RoundHooks, with_codes: bool) -> None:
    """The served model's Platt map, fitted on the market's validation rows (a noisy, accounted
    release under DP: :func:`~.selection.served_calibration`)."""
    if cfg.calibrate:
        r.platt = served_calibration(r, hooks, logits(r.ctr, ctr_inputs(r, r.data.valid, with_codes)))
