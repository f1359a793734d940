"""FedMM and its baselines, as federated stages over a :class:`SecureSum`.

Three stages run one after another, each for ``rounds`` federated rounds:

1. **CF embeddings** (reads raw clicks: a DP step when privacy is on). In FedMM the side-feature
   embedding tables, whose meaning is shared by all markets, are averaged through the secure
   sum after every round; ID embeddings never leave the market.
2. **RQ-VAE** on the market's item embeddings (post-processing of stage 1: costs no epsilon).
   The level-1 codebook is global: every market sends its per-code counts and vector sums, the
   aggregator sums them, and every market applies the same statistics-based update to its copy.
   The level-2 codebook is updated from local statistics only.
3. **CTR model** (reads raw clicks: a DP step when privacy is on) over user id, item id and the
   item's level-1 and level-2 codes. In FedMM the level-1 code embeddings are averaged through
   the secure sum after every round: level-1 codes live in one space, so their embeddings can be
   shared across markets while ID spaces stay disjoint.

Methods: ``local`` (stage 3 on IDs only), ``local_codes`` (all stages, nothing federated),
``fedmm``, ``centralized`` (all markets pooled into one market: no privacy, an upper bound).

The stages are written once, per market, in :mod:`.market_pipeline`; :func:`run_method` drives
every market's pipeline in this process (:func:`drive_in_process`), the Flower runtime drives
each one in its own market's worker. This module holds the shared helpers and the drivers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score, roc_auc_score

from ..config import ModelConfig
from ..data.market import MarketData, MarketSplit
from ..errors import ConfigError
from ..metrics import hit_rate_at_k, ndcg_at_k
from ..models.calibration import calibrate_metrics
from ..models.cf import CFModel
from ..models.codebook import perplexity, update_codebook, utilization
from ..models.ctr import DeepFM
from ..models.rqvae import RQVAE
from .training import TrainerFactory, plain_trainers
from .transport import SecureSum

__all__ = ["RoundHooks", "MarketRun", "run_method", "run_pipelines", "drive_in_process", "pool_markets", "evaluate_ctr"]

class RoundHooks:
    """Called around every raw-data federated round; the privacy session overrides both.

    ``before_round`` returns the markets allowed to train this round (a market over its budget
    skips training but still takes part in the secure sum with its unchanged, already-private
    parameters); ``before_release`` runs after local training and before anything leaves the
    markets: the ledger is written there, so a crash never under-counts spent epsilon.
    """

    def before_round(self, stage: str, rnd: int, markets: Sequence[str]) -> set[str]:
        return set(markets)

    def before_release(self, stage: str, rnd: int) -> None:
        return None

    def upload_bounds(self, label: str, bounds: np.ndarray) -> np.ndarray:
        """Bounds announced to the secure sum: widened when markets add noise, so that noise is
        never clipped (clipping a share of distributed noise would void the sum's guarantee)."""
        return bounds

    def perturb_upload(self, label: str, rnd: int, market: str, vector: np.ndarray,
                       bounds: np.ndarray) -> np.ndarray:
        """Market-side noise on an upload (distributed DP on the sum); identity by default."""
        return vector


@dataclass
class MarketRun:
    """Everything one market holds during a method's run (never leaves the market except
    through the secure sum)."""

    data: MarketData
    generator: torch.Generator
    cf: CFModel | None = None
    vq: RQVAE | None = None
    ctr: DeepFM | None = None
    codes: tuple[np.ndarray, np.ndarray] | None = None
    history: dict = field(default_factory=dict)


@contextmanager
def _seeded(generator: torch.Generator):
    """Module initialisers draw from torch's global RNG; fork it and seed it from the market's
    own generator so runs are reproducible and the caller's global RNG state is untouched."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _split_tensors(split: MarketSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(split.users), torch.from_numpy(split.items), torch.from_numpy(split.click))


def _flat_params(module: torch.nn.Module, names: Sequence[str]) -> np.ndarray:
    params = dict(module.named_parameters())
    return np.concatenate([params[n].detach().double().numpy().ravel() for n in names])


@torch.no_grad()
def _load_flat(module: torch.nn.Module, names: Sequence[str], vec: np.ndarray) -> None:
    params = dict(module.named_parameters())
    pos = 0
    for n in names:
        p = params[n]
        k = p.numel()
        p.copy_(torch.from_numpy(vec[pos:pos + k].reshape(p.shape)).to(p.dtype))
        pos += k


# ----------------------------------------------------------------------------- stage 2: RQ-VAE
def _item_inputs(r: MarketRun) -> torch.Tensor:
    # Post-processing of the (DP-trained) CF model: no raw interaction is read here.
    emb = r.cf.all_item_embeddings().float()
    return (emb - emb.mean(0)) / (emb.std(0) + 1e-6)


def _apply_global(r: MarketRun, stats, cfg: ModelConfig, rng: np.random.Generator) -> None:
    new, _ = update_codebook(r.vq.global_codebook.numpy().astype(np.float64), stats, decay=cfg.codebook_decay,
                             dead_threshold=1.0, rng=rng)
    r.vq.global_codebook.copy_(torch.from_numpy(new).float())


# ----------------------------------------------------------------------------- stage 3: CTR
def _ctr_fields(r: MarketRun, cfg: ModelConfig, with_codes: bool) -> list[tuple[str, int]]:
    fields = [("user", r.data.n_users), ("item", r.data.n_items)]
    if with_codes:
        fields += [("code1", cfg.n_global), ("code2", cfg.n_local)]
    return fields


def _ctr_inputs(r: MarketRun, split: MarketSplit, with_codes: bool) -> torch.Tensor:
    cols = [split.users, split.items]
    if with_codes:
        cols += [r.codes[0][split.items], r.codes[1][split.items]]
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))


@torch.no_grad()
def _eval_logits(model: DeepFM, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    model.train()
    return out


def _logits(model: DeepFM, x: torch.Tensor) -> np.ndarray:
    return _eval_logits(model, x).double().numpy()


def _predict(model: DeepFM, x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(_eval_logits(model, x)).numpy()


def _calibrated(metrics: dict, model: DeepFM, *, valid: tuple[torch.Tensor, np.ndarray],
                test: tuple[torch.Tensor, np.ndarray]) -> dict:
    """``metrics`` of the served model: its CTR logits Platt-scaled on the market's validation
    rows (LogLoss changes; AUC and ranking metrics cannot)."""
    return calibrate_metrics(metrics, valid_logits=_logits(model, valid[0]), valid_labels=valid[1],
                             test_logits=_logits(model, test[0]), test_labels=test[1])


def evaluate_ctr(y: np.ndarray, p: np.ndarray) -> dict:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"auc": auc, "logloss": logloss}


# ----------------------------------------------------------------------------- methods
def pool_markets(markets: Sequence[MarketData]) -> MarketData:
    """All markets as one (for the non-private ``centralized`` upper bound): IDs are offset so
    they stay distinct; a pooled model sees every market's raw data."""
    uo = np.cumsum([0] + [m.n_users for m in markets])
    io = np.cumsum([0] + [m.n_items for m in markets])

    def cat(split_name: str) -> MarketSplit:
        parts = [getattr(m, split_name) for m in markets]
        return MarketSplit(np.concatenate([p.users + uo[i] for i, p in enumerate(parts)]),
                           np.concatenate([p.items + io[i] for i, p in enumerate(parts)]),
                           np.concatenate([p.click for p in parts]),
                           np.concatenate([p.conversion for p in parts]))

    has_feats = all(m.item_features is not None for m in markets)
    return MarketData(
        name="pooled", n_users=int(uo[-1]), n_items=int(io[-1]),
        train=cat("train"), valid=cat("valid"), test=cat("test"),
        item_features=np.concatenate([m.item_features for m in markets]) if has_feats else None,
        item_feature_cards=tuple(np.max([m.item_feature_cards for m in markets], axis=0)) if has_feats else (),
        item_cluster=(np.concatenate([m.item_cluster for m in markets])
                      if all(m.item_cluster is not None for m in markets) else None),
        meta={"item_offsets": io.tolist(), "user_offsets": uo.tolist()},
    )


def _code_metrics(codes: np.ndarray, n_codes: int) -> dict:
    return {"utilization": utilization(codes, n_codes), "perplexity": perplexity(codes, n_codes)}


class _SharedHooks(RoundHooks):
    """One :class:`RoundHooks` serving several in-process markets' pipelines.

    Each market's pipeline calls ``before_round`` / ``before_release`` for itself; the wrapped
    hooks (the privacy session, which keeps one ledger round per stage round) see one call per
    round for all markets: ``before_round`` at the first market's call, before any of them
    trains, and ``before_release`` at the last market's, after all of them trained and before
    the driver releases anything (the pipelines wait at a :class:`Barrier` or a sum request).
    """

    def __init__(self, inner: RoundHooks, markets: Sequence[str]) -> None:
        self.inner, self.markets = inner, list(markets)
        self._allowed: dict[tuple[str, int], set[str]] = {}
        self._released: dict[tuple[str, int], int] = {}

    def before_round(self, stage: str, rnd: int, markets: Sequence[str]) -> set[str]:
        key = (stage, rnd)
        if key not in self._allowed:
            self._allowed[key] = set(self.inner.before_round(stage, rnd, self.markets))
        return self._allowed[key] & set(markets)

    def before_release(self, stage: str, rnd: int) -> None:
        key = (stage, rnd)
        self._released[key] = self._released.get(key, 0) + 1
        if self._released[key] == len(self.markets):
            self.inner.before_release(stage, rnd)

    def upload_bounds(self, label: str, bounds: np.ndarray) -> np.ndarray:
        return self.inner.upload_bounds(label, bounds)

    def perturb_upload(self, label: str, rnd: int, market: str, vector: np.ndarray,
                       bounds: np.ndarray) -> np.ndarray:
        return self.inner.perturb_upload(label, rnd, market, vector, bounds)


def drive_in_process(pipelines: dict, secure_sum: SecureSum | None) -> dict[str, dict]:
    """Run every market's pipeline in this process, in lockstep; returns each one's result.

    Requests are answered as a distributed deployment answers them: a broadcast relays the
    first market's payload, a sum request goes to ``secure_sum`` with every market's vector,
    a barrier resumes everyone once all markets reached it.
    """
    from .market_pipeline import Barrier, BroadcastRequest, SumRequest

    results: dict[str, dict] = {}
    requests: dict[str, object] = {}
    replies: dict[str, object] = {m: None for m in pipelines}
    first = True
    while len(results) < len(pipelines):
        for m, pipe in pipelines.items():
            if m in results:
                continue
            try:
                requests[m] = next(pipe) if first else pipe.send(replies[m])
            except StopIteration as stop:
                results[m] = stop.value
                requests.pop(m, None)
        first = False
        if not requests:
            break
        kinds = {type(r) for r in requests.values()}
        if len(results) or len(kinds) != 1:
            raise RuntimeError(f"market pipelines out of step: {sorted(k.__name__ for k in kinds)}, "
                               f"{len(results)} finished")
        reqs = list(requests.values())
        if isinstance(reqs[0], Barrier):
            replies = {m: None for m in requests}
        elif isinstance(reqs[0], BroadcastRequest):
            replies = {m: reqs[0].payload for m in requests}
        elif isinstance(reqs[0], SumRequest):
            if secure_sum is None:
                raise ConfigError("secure_sum", "a federated method needs a secure sum")
            if len({(r.label, r.round_id) for r in reqs}) != 1:
                raise RuntimeError("market pipelines asked for different sums")
            out = secure_sum.secure_sum(label=reqs[0].label, round_id=reqs[0].round_id,
                                        vectors={m: r.vector for m, r in requests.items()},
                                        max_abs=reqs[0].max_abs)
            replies = {m: out.sums.get(m) for m in requests}
        else:
            raise RuntimeError(f"unknown pipeline request {type(reqs[0]).__name__}")
    return results


def run_pipelines(method: str, markets: Sequence[MarketData], cfg: ModelConfig, *, rounds: int, seed: int,
                  secure_sum: SecureSum | None, trainers: TrainerFactory = plain_trainers,
                  hooks: RoundHooks | None = None, progress: Callable[[str], None] = lambda s: None,
                  codes_only: bool = False) -> dict[str, dict]:
    """Every market's :func:`~.market_pipeline.market_pipeline` for ``method``, driven in process."""
    from .market_pipeline import PublicMeta, market_pipeline

    names = [m.name for m in markets]
    shared = _SharedHooks(hooks or RoundHooks(), names)
    n_train_max = max(len(m.train) for m in markets)
    n_items_max = max(m.n_items for m in markets)
    pipes = {m.name: market_pipeline(m, cfg, method=method, rounds=rounds, seed=seed,
                                     meta=PublicMeta(index=i, n_train_max=n_train_max, n_items_max=n_items_max),
                                     trainers=trainers, hooks=shared, codes_only=codes_only,
                                     # one progress line per round, not one per market
                                     progress=progress if i == 0 else (lambda s: None))
             for i, m in enumerate(markets)}
    return drive_in_process(pipes, secure_sum)


def run_method(method: str, markets: Sequence[MarketData], cfg: ModelConfig, *, rounds: int, seed: int,
               secure_sum: SecureSum | None, trainers: TrainerFactory = plain_trainers,
               hooks: RoundHooks | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run one method; returns ``{"markets": {m: metrics}, "runs": {m: MarketRun}, ...}``."""
    if method == "centralized":
        pooled = pool_markets(markets)
        # Non-private by definition (it pools raw data): plain trainers whatever was asked.
        out = run_method("local_codes", [pooled], cfg, rounds=rounds, seed=seed, secure_sum=None,
                         progress=progress)
        return _split_pooled(out, pooled, markets, calibrate=cfg.calibrate)
    outs = run_pipelines(method, markets, cfg, rounds=rounds, seed=seed, secure_sum=secure_sum,
                         trainers=trainers, hooks=hooks, progress=progress)
    runs = {m.name: outs[m.name]["run"] for m in markets}
    result: dict = {"markets": {m: outs[m]["metrics"] for m in runs}, "runs": runs}
    with_codes = method != "local"
    if with_codes and all(r.data.item_keys is not None for r in runs.values()) and len(runs) > 1:
        result["code_alignment"] = code_alignment({m: r.data for m, r in runs.items()},
                                                  {m: r.codes[0] for m, r in runs.items()})
    if with_codes and all(r.data.item_cluster is not None for r in runs.values()):
        # Cross-market alignment: one NMI over all markets' items together. Only a shared
        # level-1 space can score well here; per-market codebooks are unaligned by construction.
        clusters = np.concatenate([r.data.item_cluster for r in runs.values()])
        codes = np.concatenate([r.codes[0] for r in runs.values()])
        result["nmi_level1_pooled"] = float(normalized_mutual_info_score(clusters, codes))
    return result


def code_alignment(data: dict[str, MarketData], codes: dict[str, np.ndarray]) -> dict:
    """Evaluation only: how often the same product (same original item key, never used in
    training) gets the same level-1 code in two markets, against the rate expected by chance
    given each market's code frequencies."""
    from ..data.loaders import shared_item_pairs

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


def _ranking_metrics(r: MarketRun, ranking, with_codes: bool, *, user_offset: int = 0, item_offset: int = 0) -> dict:
    """HR@10 and NDCG@10 on the sampled-ranking set (positive against its sampled negatives)."""
    users = np.repeat(ranking.users + user_offset, ranking.items.shape[1])
    items = ranking.items.ravel() + item_offset
    split = MarketSplit(users, items, np.zeros(len(users), np.float32), np.zeros(len(users), np.float32))
    scores = _predict(r.ctr, _ctr_inputs(r, split, with_codes)).reshape(ranking.items.shape)
    return {"hr@10": hit_rate_at_k(scores, 10), "ndcg@10": ndcg_at_k(scores, 10)}


def _split_pooled(out: dict, pooled: MarketData, markets: Sequence[MarketData], *, calibrate: bool = False) -> dict:
    r = out["runs"]["pooled"]
    io = pooled.meta["item_offsets"]
    uo = pooled.meta["user_offsets"]
    res: dict = {"markets": {}, "runs": out["runs"]}
    for i, m in enumerate(markets):
        shifted = MarketSplit(m.test.users + uo[i], m.test.items + io[i], m.test.click, m.test.conversion)
        x = _ctr_inputs(r, shifted, True)
        metrics = evaluate_ctr(m.test.click, _predict(r.ctr, x))
        if calibrate:
            v = MarketSplit(m.valid.users + uo[i], m.valid.items + io[i], m.valid.click, m.valid.conversion)
            metrics = _calibrated(metrics, r.ctr, valid=(_ctr_inputs(r, v, True), m.valid.click),
                                  test=(x, m.test.click))
        if m.ranking is not None:
            metrics.update(_ranking_metrics(r, m.ranking, True, user_offset=uo[i], item_offset=io[i]))
        c1 = r.codes[0][io[i]:io[i + 1]]
        metrics["codebook"] = {"level1": _code_metrics(c1, r.vq.global_codebook.shape[0]),
                               "level2": _code_metrics(r.codes[1][io[i]:io[i + 1]], r.vq.local_codebook.shape[0])}
        if m.item_cluster is not None:
            metrics["nmi_level1"] = float(normalized_mutual_info_score(m.item_cluster, c1))
        res["markets"][m.name] = metrics
    if "nmi_level1_pooled" in out:
        res["nmi_level1_pooled"] = out["nmi_level1_pooled"]
    return res
