"""Test-time metrics of FedMM-family models (evaluation only: the test split trains nothing).

Per market: CTR AUC and LogLoss (optionally of the served, Platt-calibrated model), HR@10 and
NDCG@10 on the sampled-ranking set, codebook health and, across markets, how well the level-1
codes align (:func:`code_alignment`, which reads original item keys and so is never used in
training). :func:`split_pooled` scores the ``centralized`` upper bound per original market.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from ...config import ModelConfig
from ...data.market import MarketData, MarketSplit, RankingSet
from ...metrics import evaluate_ctr, hit_rate_at_k, ndcg_at_k
from ...models.calibration import calibrate_metrics, served_metrics
from ...models.codebook import perplexity, utilization
from .features import MarketRun, ctr_inputs
from .protocol import codebook_digest

__all__ = ["logits", "predict", "calibrated", "code_metrics", "ranking_metrics", "market_metrics",
           "code_alignment", "split_pooled"]


@torch.no_grad()
def _eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    model.train()
    return out


def logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return _eval_logits(model, x).double().numpy()


def predict(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(_eval_logits(model, x)).numpy()


def calibrated(metrics: dict, model: torch.nn.Module, *, valid: tuple[torch.Tensor, np.ndarray],
               test: tuple[torch.Tensor, np.ndarray]) -> dict:
    """``metrics`` of the served model: its CTR logits Platt-scaled on the market's validation
    rows (LogLoss changes; AUC and ranking metrics cannot)."""
    return calibrate_metrics(metrics, valid_logits=logits(model, valid[0]), valid_labels=valid[1],
                             test_logits=logits(model, test[0]), test_labels=test[1])


def code_metrics(codes: np.ndarray, n_codes: int) -> dict:
    return {"utilization": utilization(codes, n_codes), "perplexity": perplexity(codes, n_codes)}


def ranking_metrics(r: MarketRun, ranking: RankingSet, with_codes: bool, *, user_offset: int = 0, item_offset: int = 0) -> dict:
    """HR@10 and NDCG@10 on the sampled-ranking set (positive against its sampled negatives)."""
    users = np.repeat(ranking.users + user_offset, ranking.items.shape[1])
    items = ranking.items.ravel() + item_offset
    split = MarketSplit(users, items, np.zeros(len(users), np.float32), np.zeros(len(users), np.float32))
    scores = predict(r.ctr, ctr_inputs(r, split, with_codes)).reshape(ranking.items.shape)
    return {"hr@10": hit_rate_at_k(scores, 10), "ndcg@10": ndcg_at_k(scores, 10)}


def market_metrics(r: MarketRun, cfg: ModelConfig, with_codes: bool) -> dict:
    """Test metrics of one market's final model (evaluation only: the test split trains nothing)."""
    x = ctr_inputs(r, r.data.test, with_codes)
    metrics = evaluate_ctr(r.data.test.click, predict(r.ctr, x))
    if cfg.calibrate and r.platt is not None:
        # The map the market fitted (privately under DP) before serving; this only scores it.
        metrics = served_metrics(metrics, r.platt, test_logits=logits(r.ctr, x), test_labels=r.data.test.click)
    if r.data.ranking is not None:
        metrics.update(ranking_metrics(r, r.data.ranking, with_codes))
    if with_codes:
        metrics["codebook"] = {"level1": code_metrics(r.codes[0], cfg.n_global),
                               "level2": code_metrics(r.codes[1], cfg.n_local)}
        if r.data.item_cluster is not None:
            metrics["nmi_level1"] = float(normalized_mutual_info_score(r.data.item_cluster, r.codes[0]))
        metrics["rqvae_recon"] = r.history["vq_recon"][-1] if r.history.get("vq_recon") else None
        # Lets anyone check that every market ended with the same global codebook without
        # shipping it (it is the same in every market by construction of the secure sum).
        metrics["global_codebook_sha256"] = codebook_digest(r.vq.global_codebook.numpy())
    return metrics


def code_alignment(data: dict[str, MarketData], codes: dict[str, np.ndarray]) -> dict:
    """Evaluation only: how often the same product (same original item key, never used in
    training) gets the same level-1 code in two markets, against the rate expected by chance
    given each market's code frequencies."""
    from ...data.loaders import shared_item_pairs

    names = list(data)
    pairs = shared_item_pairs([data[m] for m in names])
    if not pairs:
        return {"pairs": 0}
    same = np.array([codes[a][i] == codes[b][j] for a, i, b, j in pairs], dtype=bool)
    chance = []
    for a, _, b, _ in pairs:
        k = max(codes[a].max(), codes[b].max()) + 1
        pa = np.bincount(codes[a], minlength=k) / len(codes[a])
        pb = np.bincount(codes[b], minlength=k) / len(codes[b])
        chance.append(float(pa @ pb))
    return {"pairs": len(pairs), "same_code_rate": float(same.mean()), "chance_rate": float(np.mean(chance))}


def split_pooled(out: dict, pooled: MarketData, markets: Sequence[MarketData], *, calibrate: bool = False,
                 models: dict[str, torch.nn.Module] | None = None) -> dict:
    """Per-market test metrics of the model trained on ``pooled`` (all ``markets`` as one), or
    of market ``m``'s own model ``models[m]`` (the pooled model fine-tuned and selected on
    ``m``'s rows) where given; codes are the pooled run's either way."""
    pooled_run = out["runs"]["pooled"]
    io = pooled.meta["item_offsets"]
    uo = pooled.meta["user_offsets"]
    res: dict = {"markets": {}, "runs": out["runs"]}
    for i, m in enumerate(markets):
        r = pooled_run if models is None or m.name not in models else dataclasses.replace(pooled_run, ctr=models[m.name])
        shifted = MarketSplit(m.test.users + uo[i], m.test.items + io[i], m.test.click, m.test.conversion)
        x = ctr_inputs(r, shifted, True)
        metrics = evaluate_ctr(m.test.click, predict(r.ctr, x))
        if calibrate:
            v = MarketSplit(m.valid.users + uo[i], m.valid.items + io[i], m.valid.click, m.valid.conversion)
            metrics = calibrated(metrics, r.ctr, valid=(ctr_inputs(r, v, True), m.valid.click),
                                 test=(x, m.test.click))
        if m.ranking is not None:
            metrics.update(ranking_metrics(r, m.ranking, True, user_offset=uo[i], item_offset=io[i]))
        c1 = r.codes[0][io[i]:io[i + 1]]
        metrics["codebook"] = {"level1": code_metrics(c1, r.vq.global_codebook.shape[0]),
                               "level2": code_metrics(r.codes[1][io[i]:io[i + 1]], r.vq.local_codebook.shape[0])}
        if m.item_cluster is not None:
            metrics["nmi_level1"] = float(normalized_mutual_info_score(m.item_cluster, c1))
        res["markets"][m.name] = metrics
    if "nmi_level1_pooled" in out:
        res["nmi_level1_pooled"] = out["nmi_level1_pooled"]
    return res
