"""One market's share of a FedMM-family method, as a coroutine that asks for what it needs.

This is the single implementation of the ``local``, ``local_codes`` and ``fedmm`` methods for one
market. Whoever runs it only answers its requests, so the method does not know which runtime
carries it:

* :class:`SumRequest` -- "add this vector to the other markets' through the secure sum"; the
  caller sends back the float64 sum (or ``None`` if the market was dropped from that sum);
* :class:`BroadcastRequest` -- "everyone starts from the first market's initial shared
  parameters" (drawn from the public seed and public sizes only, never from data, so relaying
  them through the aggregator reveals nothing about any market's records);
* :class:`Barrier` -- "a training round has ended here" (after the round's privacy hooks). It
  carries nothing and never leaves the market; an in-process driver uses it to keep the markets'
  rounds in step, a lone market resumes at once;

and finally returns ``{"metrics": ..., "run": MarketRun}``. The embedded runtime
(:func:`fedmm_secure.federation.fedmm.run_method`) drives every market's pipeline in one
process; the Flower runtime's market worker drives its own market's and forwards its requests to
the aggregator (:mod:`fedmm_secure.runtime.flower_worker`).

Public metadata every market needs (:class:`PublicMeta`): the market's index in the run's market
order (it seeds the market's generator), the largest training-set size (FedAvg weights) and the
largest item count (codebook-statistics bound).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from ..config import ModelConfig
from ..data.market import MarketData
from ..models.cf import CFModel
from ..models.codebook import CodeStats, code_statistics, flatten_stats, unflatten_stats, update_codebook
from ..models.ctr import DeepFM
from ..models.rqvae import RQVAE
from .fedmm import (
    MarketRun,
    RoundHooks,
    _apply_global,
    _calibrated,
    _code_metrics,
    _ctr_fields,
    _ctr_inputs,
    _flat_params,
    _item_inputs,
    _load_flat,
    _predict,
    _ranking_metrics,
    _seeded,
    _split_tensors,
    evaluate_ctr,
)
from .training import TrainerFactory, TrainSettings, plain_trainers

__all__ = ["PublicMeta", "SumRequest", "BroadcastRequest", "Barrier", "Pipeline", "market_pipeline",
           "codebook_digest", "state_to_bytes", "state_from_bytes"]


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
    payload: bytes      # this market's candidate; the driver relays the first market's


@dataclass(frozen=True)
class Barrier:
    stage: str
    round_id: int


Request = SumRequest | BroadcastRequest | Barrier
Pipeline = Generator[Request, "np.ndarray | bytes | None", dict]


def codebook_digest(codebook: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codebook, dtype="<f4").tobytes()).hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Tensors as an ``.npz`` (no pickle: ``allow_pickle=False`` on the way back)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in state.items()})
    return buf.getvalue()


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def _request(hooks: RoundHooks, m: str, label: str, rnd: int, vec: np.ndarray, bounds: np.ndarray) -> SumRequest:
    # Everything that leaves a market goes through here: clipped to the public bounds, then
    # (optionally) noised by the market itself; the ring is sized for the noisy bounds.
    noisy = hooks.perturb_upload(label, rnd, m, np.clip(vec, -bounds, bounds), bounds)
    return SumRequest(label, rnd, noisy, hooks.upload_bounds(label, bounds))


def _average_shared(r: MarketRun, module: torch.nn.Module, names, meta: PublicMeta, label: str,
                    rnd: int, bound: float, hooks: RoundHooks) -> Pipeline:
    """FedAvg of the shared parameters, weighted by training rows, through one secure sum.

    The market uploads ``[w * theta, w]`` with ``w = n_train / n_max`` in (0, 1]; the sum gives
    the weighted average without revealing any market's parameters or weight. Market sizes are
    treated as public metadata, as DP-SGD already does when it sets the sample rate from them.
    """
    w = len(r.data.train) / meta.n_train_max
    theta = np.clip(_flat_params(module, names), -bound, bound)
    vec = np.concatenate([w * theta, [w]])
    bounds = np.concatenate([np.full(len(vec) - 1, bound), [1.0]])
    s = yield _request(hooks, r.data.name, label, rnd, vec, bounds)
    if s is not None:
        # With market-level noise the summed weight is noisy too; it stays near the true
        # total, but guard against a pathological draw.
        _load_flat(module, names, s[:-1] / max(s[-1], 1e-3))


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
        yield from _cf_stage(r, cfg, rounds=rounds, federated=federated, meta=meta, trainers=trainers,
                             hooks=hooks, progress=progress)
        yield from _rqvae_stage(r, cfg, rounds=rounds, federated=federated, seed=seed, meta=meta, hooks=hooks,
                                progress=progress)
    if codes_only:
        return {"metrics": {}, "run": r}
    yield from _ctr_stage(r, cfg, rounds=rounds, with_codes=with_codes, federated=federated, meta=meta,
                          trainers=trainers, hooks=hooks, progress=progress)
    return {"metrics": market_metrics(r, cfg, with_codes), "run": r}


# ----------------------------------------------------------------------------- stage 1: CF
def _cf_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, federated: bool, meta: PublicMeta,
              trainers: TrainerFactory, hooks: RoundHooks, progress) -> Pipeline:
    data, m = r.data, r.data.name
    settings = TrainSettings(cfg.cf_epochs, cfg.batch_size, cfg.cf_lr)
    feats = torch.from_numpy(data.item_features if data.item_features is not None
                             else np.zeros((data.n_items, 0), dtype=np.int64))
    with _seeded(r.generator):
        r.cf = CFModel(n_users=data.n_users, n_items=data.n_items, dim=cfg.cf_dim,
                       item_feature_cards=tuple(data.item_feature_cards), item_features=feats)
    if federated:
        # Shared tables start identical in every market (the first market's), as in FedAvg.
        mine = {k: v for k, v in r.cf.state_dict().items() if k.startswith("attrs.")}
        first = yield BroadcastRequest("cf-init", state_to_bytes(mine))
        r.cf.load_state_dict(state_from_bytes(first), strict=False)
    names = r.cf.shared_parameter_names()
    users, items, click = _split_tensors(data.train)

    def loss(model, idx):
        return F.binary_cross_entropy_with_logits(model(users[idx], items[idx]), click[idx], reduction="none")

    for rnd in range(rounds):
        if m in hooks.before_round("cf", rnd, [m]):
            trainers(market=m, stage="cf", model=r.cf, loss_fn=loss, n_records=len(users), users=users,
                     settings=settings, generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("cf", rnd)
        yield Barrier("cf", rnd)
        # Average between rounds, not after the last: each market keeps the shared tables its
        # own ID embeddings were last trained with (personalised FedAvg).
        if federated and names and rnd < rounds - 1:
            yield from _average_shared(r, r.cf, names, meta, "cf-shared", rnd, cfg.shared_bound, hooks)
        progress(f"cf round {rnd + 1}/{rounds}")


# ----------------------------------------------------------------------------- stage 2: RQ-VAE
def _rqvae_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, federated: bool, seed: int, meta: PublicMeta,
                 hooks: RoundHooks, progress) -> Pipeline:
    """Post-processing only: inputs are the DP-trained item embeddings."""
    init = torch.Generator().manual_seed(seed * 7919 + 17)  # public seed: same global init everywhere
    global_init = 0.5 * torch.randn(cfg.n_global, cfg.latent_dim, generator=init)
    bound = float(meta.n_items_max)
    with _seeded(r.generator):
        r.vq = RQVAE(in_dim=cfg.cf_dim, latent_dim=cfg.latent_dim, hidden=cfg.vq_hidden,
                     n_global=cfg.n_global, n_local=cfg.n_local, generator=r.generator)
    r.vq.global_codebook.copy_(global_init)
    r.history["vq_recon"] = []
    ae_names = [n for n, _ in r.vq.named_parameters()]
    if federated:
        # Encoder and decoder start identical and are averaged after every round, so the map
        # from the (aligned) CF space to the global codebook is the same everywhere.
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
        # Level 2 is local: updated from this market's residual statistics only.
        new2, _ = update_codebook(r.vq.local_codebook.numpy().astype(np.float64),
                                  code_statistics(r1, c2, cfg.n_local), decay=cfg.codebook_decay,
                                  dead_threshold=1.0, rng=np.random.default_rng([seed, rnd, 2]))
        r.vq.local_codebook.copy_(torch.from_numpy(new2).float())
        r.history["vq_recon"].append(r.vq.reconstruction_error(x))
        if federated:
            if cfg.share_autoencoder:
                yield from _average_shared(r, r.vq, ae_names, meta, "rqvae-shared", rnd, cfg.shared_bound, hooks)
            # Counts are <= n_items and |z| <= 1 (tanh), so every coordinate is bounded by the
            # largest market's item count: this sizes the masking ring so the sum cannot wrap.
            flat = flatten_stats(stats1)
            s = yield _request(hooks, r.data.name, "codebook-l1", rnd, flat, np.full(len(flat), bound))
            if s is not None:
                total = unflatten_stats(s, cfg.n_global, cfg.latent_dim)
                # Counts are integers by construction; masking/CKKS return them up to a small
                # numerical error, which must not flip a code between live and dead.
                total = CodeStats(np.maximum(np.round(total.counts), 0.0), total.sums)
                _apply_global(r, total, cfg, np.random.default_rng([seed, rnd, 1]))
        else:
            _apply_global(r, stats1, cfg, np.random.default_rng([seed, rnd, 1]))
        progress(f"rq-vae round {rnd + 1}/{rounds}")
    c1, c2, _, _ = r.vq.codes(x)
    r.codes = (c1, c2)


# ----------------------------------------------------------------------------- stage 3: CTR
def _ctr_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, with_codes: bool, federated: bool,
               meta: PublicMeta, trainers: TrainerFactory, hooks: RoundHooks, progress) -> Pipeline:
    data, m = r.data, r.data.name
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr)
    with _seeded(r.generator):
        r.ctr = DeepFM(fields=_ctr_fields(r, cfg, with_codes), dim=cfg.ctr_dim, hidden=tuple(cfg.ctr_hidden))
    r.history["valid_auc"] = []
    # Shared in FedMM: what has the same meaning in every market (level-1 code embeddings and,
    # optionally, the interaction network on top of the field embeddings); never ID embeddings.
    shared = [n for n, _ in r.ctr.named_parameters()
              if "code1" in n or (cfg.share_ctr_mlp and n.startswith("mlp."))]
    if federated:
        mine = {k: v for k, v in r.ctr.state_dict().items() if k in shared}
        first = yield BroadcastRequest("ctr-init", state_to_bytes(mine))
        r.ctr.load_state_dict(state_from_bytes(first), strict=False)
    best: tuple[float, dict] | None = None
    # The inputs do not change between rounds (codes are fixed after stage 2).
    xs, y = _ctr_inputs(r, data.train, with_codes), torch.from_numpy(data.train.click)
    x_valid = _ctr_inputs(r, data.valid, with_codes)

    def loss(model, idx):
        return F.binary_cross_entropy_with_logits(model(xs[idx]), y[idx], reduction="none")

    for rnd in range(rounds):
        if m in hooks.before_round("ctr", rnd, [m]):
            trainers(market=m, stage="ctr", model=r.ctr, loss_fn=loss, n_records=len(xs),
                     users=torch.from_numpy(data.train.users), settings=settings,
                     generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("ctr", rnd)
        yield Barrier("ctr", rnd)
        # Model selection on the market's own validation split (a local decision that changes no
        # upload): the market keeps whichever it validates best of its locally trained model and
        # the model right after averaging, so personalisation is used only where it helps.
        for phase in ("local", "averaged") if federated else ("local",):
            if phase == "averaged":
                yield from _average_shared(r, r.ctr, shared, meta, "ctr-code1", rnd, cfg.shared_bound, hooks)
            v = evaluate_ctr(data.valid.click, _predict(r.ctr, x_valid))["auc"]
            r.history["valid_auc"].append(v)
            if best is None or v > best[0]:
                best = (v, {k: t.clone() for k, t in r.ctr.state_dict().items()})
        progress(f"ctr round {rnd + 1}/{rounds}")
    r.ctr.load_state_dict(best[1])


def market_metrics(r: MarketRun, cfg: ModelConfig, with_codes: bool) -> dict:
    """Test metrics of one market's final model (evaluation only: the test split trains nothing)."""
    x = _ctr_inputs(r, r.data.test, with_codes)
    metrics = evaluate_ctr(r.data.test.click, _predict(r.ctr, x))
    if cfg.calibrate:
        metrics = _calibrated(metrics, r.ctr, valid=(_ctr_inputs(r, r.data.valid, with_codes), r.data.valid.click),
                              test=(x, r.data.test.click))
    if r.data.ranking is not None:
        metrics.update(_ranking_metrics(r, r.data.ranking, with_codes))
    if with_codes:
        metrics["codebook"] = {"level1": _code_metrics(r.codes[0], cfg.n_global),
                               "level2": _code_metrics(r.codes[1], cfg.n_local)}
        if r.data.item_cluster is not None:
            metrics["nmi_level1"] = float(normalized_mutual_info_score(r.data.item_cluster, r.codes[0]))
        metrics["rqvae_recon"] = r.history["vq_recon"][-1] if r.history.get("vq_recon") else None
        # Lets anyone check that every market ended with the same global codebook without
        # shipping it (it is the same in every market by construction of the secure sum).
        metrics["global_codebook_sha256"] = codebook_digest(r.vq.global_codebook.numpy())
    return metrics
