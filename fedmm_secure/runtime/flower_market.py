"""One market's share of the FedMM pipeline, as a coroutine that asks for secure sums.

In the embedded runtime :func:`fedmm_secure.federation.fedmm.run_method` holds every market
and calls the secure sum with all markets' vectors at once. In a distributed deployment each
market runs alone, so its pipeline must *pause* wherever the federation needs the other
markets. :func:`fedmm_market_pipeline` is that pipeline for one market: a generator that yields

* :class:`SumRequest` -- "add this vector to the other markets' through the secure sum"; the
  caller sends back the float64 sum (or ``None`` if the market was dropped from that sum);
* :class:`BroadcastRequest` -- "everyone starts from the first market's initial shared
  parameters" (the embedded runtime copies them in memory; they are drawn from the public seed
  and public sizes only, never from data, so relaying them through the aggregator reveals
  nothing about any market's records);

and finally returns the market's metrics. It mirrors ``run_method("fedmm", ...)`` step for step
and reuses fedmm.py's helpers, so with the same seed, market order and survivors a market ends
with exactly the parameters (and the global codebook) the embedded runtime gives it.

Public metadata every market needs (the embedded runtime reads it off the other markets'
objects): the market's index in the run's market order (it seeds the market's generator), the
largest training-set size (FedAvg weights) and the largest item count (codebook-statistics
bound). The coordinator collects it from the markets' hello messages.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from ..config import ModelConfig
from ..data.market import MarketData
from ..federation.fedmm import (
    MarketRun,
    RoundHooks,
    _apply_global,
    _code_metrics,
    _ctr_fields,
    _ctr_inputs,
    _flat_params,
    _item_inputs,
    _load_flat,
    _predict,
    _seeded,
    _split_tensors,
    evaluate_ctr,
)
from ..federation.training import TrainerFactory, TrainSettings, plain_trainers
from ..models.cf import CFModel
from ..models.codebook import CodeStats, code_statistics, flatten_stats, unflatten_stats, update_codebook
from ..models.ctr import DeepFM
from ..models.rqvae import RQVAE

__all__ = ["codebook_digest", "PublicMeta", "SumRequest", "BroadcastRequest", "fedmm_market_pipeline",
           "secure_sum_pipeline", "workload_vector", "state_to_bytes", "state_from_bytes"]


@dataclass(frozen=True)
class PublicMeta:
    index: int          # position of the market in the run's market order
    n_train_max: int    # largest training-set size over all markets
    n_items_max: int    # largest item count over all markets


@dataclass(frozen=True)
class SumRequest:
    label: str
    round_id: int
    vector: np.ndarray
    max_abs: float | np.ndarray


@dataclass(frozen=True)
class BroadcastRequest:
    label: str
    payload: bytes      # this market's candidate; the coordinator relays the first market's


def codebook_digest(codebook: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(codebook, dtype="<f4").tobytes()).hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Tensors as an ``.npz`` (no pickle: ``allow_pickle=False`` on the way back)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in state.items()})
    return buf.getvalue()


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


Pipeline = Generator["SumRequest | BroadcastRequest", "np.ndarray | bytes | None", dict]


def _request(hooks: RoundHooks, m: str, label: str, rnd: int, vec: np.ndarray, bounds: np.ndarray) -> SumRequest:
    # What fedmm._upload does for every market: clip to the public bounds, then (optionally)
    # the market's own share of market-level noise; the ring is sized for the noisy bounds.
    noisy = hooks.perturb_upload(label, rnd, m, np.clip(vec, -bounds, bounds), bounds)
    return SumRequest(label, rnd, noisy, hooks.upload_bounds(label, bounds))


def _average_shared(r: MarketRun, module: torch.nn.Module, names, meta: PublicMeta, label: str,
                    rnd: int, bound: float, hooks: RoundHooks) -> Pipeline:
    # Same vector as fedmm._average_shared builds for this market: [w * theta, w].
    w = len(r.data.train) / meta.n_train_max
    theta = np.clip(_flat_params(module, names), -bound, bound)
    vec = np.concatenate([w * theta, [w]])
    bounds = np.concatenate([np.full(len(vec) - 1, bound), [1.0]])
    s = yield _request(hooks, r.data.name, label, rnd, vec, bounds)
    if s is not None:
        # As fedmm._average_shared: with market-level noise the summed weight is noisy too.
        _load_flat(module, names, s[:-1] / max(s[-1], 1e-3))


def fedmm_market_pipeline(data: MarketData, cfg: ModelConfig, *, rounds: int, seed: int, meta: PublicMeta,
                          trainers: TrainerFactory = plain_trainers, hooks: RoundHooks | None = None) -> Pipeline:
    """The ``fedmm`` method for one market (see the module docstring)."""
    hooks = hooks or RoundHooks()
    m = data.name
    r = MarketRun(data, torch.Generator().manual_seed(seed * 1_000_003 + meta.index))

    # ---------------------------------------------------------------- stage 1: CF
    settings = TrainSettings(cfg.cf_epochs, cfg.batch_size, cfg.cf_lr)
    feats = torch.from_numpy(data.item_features if data.item_features is not None
                             else np.zeros((data.n_items, 0), dtype=np.int64))
    with _seeded(r.generator):
        r.cf = CFModel(n_users=data.n_users, n_items=data.n_items, dim=cfg.cf_dim,
                       item_feature_cards=tuple(data.item_feature_cards), item_features=feats)
    mine = {k: v for k, v in r.cf.state_dict().items() if k.startswith("attrs.")}
    first = yield BroadcastRequest("cf-init", state_to_bytes(mine))
    r.cf.load_state_dict(state_from_bytes(first), strict=False)
    names = r.cf.shared_parameter_names()
    for rnd in range(rounds):
        if m in hooks.before_round("cf", rnd, [m]):
            users, items, click = _split_tensors(data.train)

            def loss(model, idx, users=users, items=items, click=click):
                return F.binary_cross_entropy_with_logits(model(users[idx], items[idx]), click[idx], reduction="none")

            trainers(market=m, stage="cf", model=r.cf, loss_fn=loss, n_records=len(users), users=users,
                     settings=settings, generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("cf", rnd)
        if names and rnd < rounds - 1:
            yield from _average_shared(r, r.cf, names, meta, "cf-shared", rnd, cfg.shared_bound, hooks)

    # ---------------------------------------------------------------- stage 2: RQ-VAE
    init = torch.Generator().manual_seed(seed * 7919 + 17)
    global_init = 0.5 * torch.randn(cfg.n_global, cfg.latent_dim, generator=init)
    bound = float(meta.n_items_max)
    with _seeded(r.generator):
        r.vq = RQVAE(in_dim=cfg.cf_dim, latent_dim=cfg.latent_dim, hidden=cfg.vq_hidden,
                     n_global=cfg.n_global, n_local=cfg.n_local, generator=r.generator)
    r.vq.global_codebook.copy_(global_init)
    r.history["vq_recon"] = []
    ae_names = [n for n, _ in r.vq.named_parameters()]
    first = yield BroadcastRequest("rqvae-init", state_to_bytes(r.vq.state_dict()))
    r.vq.load_state_dict(state_from_bytes(first))
    x = _item_inputs(r)
    for rnd in range(rounds):
        opt = torch.optim.Adam(list(r.vq.encoder.parameters()) + list(r.vq.decoder.parameters()), lr=cfg.vq_lr)
        for _ in range(cfg.vq_epochs):
            perm = torch.randperm(len(x), generator=r.generator)
            for i in range(0, len(x), cfg.batch_size):
                opt.zero_grad()
                loss_v, _ = r.vq(x[perm[i:i + cfg.batch_size]], beta=cfg.beta)
                loss_v.backward()
                opt.step()
        c1, c2, z, r1 = r.vq.codes(x)
        stats1 = code_statistics(z, c1, cfg.n_global)
        new2, _ = update_codebook(r.vq.local_codebook.numpy().astype(np.float64),
                                  code_statistics(r1, c2, cfg.n_local), decay=cfg.codebook_decay,
                                  dead_threshold=1.0, rng=np.random.default_rng([seed, rnd, 2]))
        r.vq.local_codebook.copy_(torch.from_numpy(new2).float())
        r.history["vq_recon"].append(r.vq.reconstruction_error(x))
        if cfg.share_autoencoder:
            yield from _average_shared(r, r.vq, ae_names, meta, "rqvae-shared", rnd, cfg.shared_bound, hooks)
        flat = flatten_stats(stats1)
        s = yield _request(hooks, m, "codebook-l1", rnd, flat, np.full(len(flat), bound))
        if s is not None:
            total = unflatten_stats(s, cfg.n_global, cfg.latent_dim)
            # As fedmm.train_rqvae: summed counts are integers up to the backend's error.
            total = CodeStats(np.maximum(np.round(total.counts), 0.0), total.sums)
            _apply_global(r, total, cfg, np.random.default_rng([seed, rnd, 1]))
    c1, c2, _, _ = r.vq.codes(x)
    r.codes = (c1, c2)

    # ---------------------------------------------------------------- stage 3: CTR
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr)
    with _seeded(r.generator):
        r.ctr = DeepFM(fields=_ctr_fields(r, cfg, True), dim=cfg.ctr_dim, hidden=tuple(cfg.ctr_hidden))
    r.history["valid_auc"] = []
    shared = [n for n, _ in r.ctr.named_parameters()
              if "code1" in n or (cfg.share_ctr_mlp and n.startswith("mlp."))]
    mine = {k: v for k, v in r.ctr.state_dict().items() if k in shared}
    first = yield BroadcastRequest("ctr-init", state_to_bytes(mine))
    r.ctr.load_state_dict(state_from_bytes(first), strict=False)
    best: tuple[float, dict] | None = None
    for rnd in range(rounds):
        if m in hooks.before_round("ctr", rnd, [m]):
            xs = _ctr_inputs(r, data.train, True)
            y = torch.from_numpy(data.train.click)

            def loss(model, idx, xs=xs, y=y):
                return F.binary_cross_entropy_with_logits(model(xs[idx]), y[idx], reduction="none")

            trainers(market=m, stage="ctr", model=r.ctr, loss_fn=loss, n_records=len(xs),
                     users=torch.from_numpy(data.train.users), settings=settings,
                     generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("ctr", rnd)
        # Same selection rule as federation/fedmm.py: the locally trained and the just-averaged
        # model both compete on the market's own validation split.
        for phase in ("local", "averaged"):
            if phase == "averaged":
                yield from _average_shared(r, r.ctr, shared, meta, "ctr-code1", rnd, cfg.shared_bound, hooks)
            v = evaluate_ctr(data.valid.click, _predict(r.ctr, _ctr_inputs(r, data.valid, True)))["auc"]
            r.history["valid_auc"].append(v)
            if best is None or v > best[0]:
                best = (v, {k: t.clone() for k, t in r.ctr.state_dict().items()})
    r.ctr.load_state_dict(best[1])

    metrics = evaluate_ctr(data.test.click, _predict(r.ctr, _ctr_inputs(r, data.test, True)))
    if getattr(data, "ranking", None) is not None:
        from ..federation.fedmm import _ranking_metrics
        metrics.update(_ranking_metrics(r, data.ranking, True))
    metrics["codebook"] = {"level1": _code_metrics(r.codes[0], cfg.n_global),
                           "level2": _code_metrics(r.codes[1], cfg.n_local)}
    if data.item_cluster is not None:
        metrics["nmi_level1"] = float(normalized_mutual_info_score(data.item_cluster, r.codes[0]))
    metrics["rqvae_recon"] = r.history["vq_recon"][-1] if r.history.get("vq_recon") else None
    # Lets anyone check that every market ended with the same global codebook without
    # shipping it (it is the same in every market by construction of the secure sum).
    metrics["global_codebook_sha256"] = codebook_digest(r.vq.global_codebook.numpy())
    return {"metrics": metrics, "run": r}


def workload_vector(*, seed: int, index: int, round_id: int, length: int) -> np.ndarray:
    """Market ``index``'s input to round ``round_id`` of the secure-sum workload (public seed)."""
    return np.random.default_rng([seed, index, round_id]).uniform(-1.0, 1.0, length)


def secure_sum_pipeline(*, length: int, rounds: int, seed: int, meta: PublicMeta, n_markets: int) -> Pipeline:
    """Benchmark workload: ``rounds`` secure sums of ``length`` values in [-1, 1], nothing else.

    Inputs come from a public seed, so each market can check the sum it receives against the
    sum of every market's input (valid when no market drops out).
    """
    worst = 0.0
    for rnd in range(rounds):
        s = yield SumRequest("secure-sum", rnd, workload_vector(seed=seed, index=meta.index, round_id=rnd,
                                                                  length=length), 1.0)
        expected = sum(workload_vector(seed=seed, index=i, round_id=rnd, length=length) for i in range(n_markets))
        worst = max(worst, float(np.max(np.abs(np.asarray(s) - expected))))
    return {"metrics": {"rounds": rounds, "length": length, "max_abs_error": worst}}
