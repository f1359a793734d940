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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score, roc_auc_score

from ..config import ModelConfig
from ..data.market import MarketData, MarketSplit
from ..metrics import hit_rate_at_k, ndcg_at_k
from ..models.cf import CFModel
from ..models.codebook import CodeStats, code_statistics, flatten_stats, perplexity, unflatten_stats, update_codebook, utilization
from ..models.ctr import DeepFM
from ..models.rqvae import RQVAE
from .training import LocalTrainer, TrainerFactory, TrainSettings, plain_trainers
from .transport import SecureSum

__all__ = ["RoundHooks", "MarketRun", "run_method", "pool_markets", "evaluate_ctr"]

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


def _upload(secure_sum: SecureSum, hooks: RoundHooks, label: str, round_id: int,
            vectors: dict[str, np.ndarray], bounds: np.ndarray):
    """Everything that leaves a market goes through here: clipped to the public bounds, then
    (optionally) noised by the market itself, then securely summed."""
    noisy = {m: hooks.perturb_upload(label, round_id, m, np.clip(v, -bounds, bounds), bounds)
             for m, v in vectors.items()}
    return secure_sum.secure_sum(label=label, round_id=round_id, vectors=noisy,
                                 max_abs=hooks.upload_bounds(label, bounds))


def _average_shared(runs: dict[str, MarketRun], module_of: Callable[[MarketRun], torch.nn.Module],
                    names: Sequence[str], secure_sum: SecureSum, label: str, round_id: int, bound: float,
                    hooks: RoundHooks) -> None:
    """FedAvg of the shared parameters, weighted by training rows, through one secure sum.

    Each market uploads ``[w * theta, w]`` with ``w = n_train / n_max`` in (0, 1]; the sum gives
    the weighted average without revealing any market's parameters or weight. Market sizes are
    treated as public metadata, as DP-SGD already does when it sets the sample rate from them.
    """
    n_max = max(len(r.data.train) for r in runs.values())
    vectors = {}
    for m, r in runs.items():
        w = len(r.data.train) / n_max
        theta = np.clip(_flat_params(module_of(r), names), -bound, bound)
        vectors[m] = np.concatenate([w * theta, [w]])
    dim = len(next(iter(vectors.values()))) - 1
    bounds = np.concatenate([np.full(dim, bound), [1.0]])
    result = _upload(secure_sum, hooks, label, round_id, vectors, bounds)
    for m, s in result.sums.items():
        # With market-level noise the summed weight is noisy too; it stays near the true
        # total, but guard against a pathological draw.
        _load_flat(module_of(runs[m]), names, s[:-1] / max(s[-1], 1e-3))


# ----------------------------------------------------------------------------- stage 1: CF
def train_cf(runs: dict[str, MarketRun], cfg: ModelConfig, *, rounds: int, federated: bool,
             secure_sum: SecureSum | None, trainers: TrainerFactory, hooks: RoundHooks,
             progress: Callable[[str], None]) -> None:
    settings = TrainSettings(cfg.cf_epochs, cfg.batch_size, cfg.cf_lr)
    for m, r in runs.items():
        d = r.data
        feats = torch.from_numpy(d.item_features if d.item_features is not None
                                 else np.zeros((d.n_items, 0), dtype=np.int64))
        with _seeded(r.generator):
            r.cf = CFModel(n_users=d.n_users, n_items=d.n_items, dim=cfg.cf_dim,
                           item_feature_cards=tuple(d.item_feature_cards), item_features=feats)
    if federated:
        # Shared tables start identical in every market (a public seed), as in FedAvg.
        first = next(iter(runs.values())).cf
        for r in runs.values():
            r.cf.load_state_dict({k: v for k, v in first.state_dict().items() if k.startswith("attrs.")}, strict=False)
    names = next(iter(runs.values())).cf.shared_parameter_names()
    for rnd in range(rounds):
        allowed = hooks.before_round("cf", rnd, list(runs))
        for m, r in runs.items():
            if m not in allowed:
                continue
            users, items, click = _split_tensors(r.data.train)

            def loss(model, idx, users=users, items=items, click=click):
                return F.binary_cross_entropy_with_logits(model(users[idx], items[idx]), click[idx], reduction="none")

            trainers(market=m, stage="cf", model=r.cf, loss_fn=loss, n_records=len(users), users=users,
                     settings=settings, generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("cf", rnd)
        # Average between rounds, not after the last: each market keeps the shared tables its
        # own ID embeddings were last trained with (personalised FedAvg).
        if federated and names and rnd < rounds - 1:
            _average_shared(runs, lambda r: r.cf, names, secure_sum, "cf-shared", rnd, cfg.shared_bound, hooks)
        progress(f"cf round {rnd + 1}/{rounds}")


# ----------------------------------------------------------------------------- stage 2: RQ-VAE
def _item_inputs(r: MarketRun) -> torch.Tensor:
    # Post-processing of the (DP-trained) CF model: no raw interaction is read here.
    emb = r.cf.all_item_embeddings().float()
    return (emb - emb.mean(0)) / (emb.std(0) + 1e-6)


def train_rqvae(runs: dict[str, MarketRun], cfg: ModelConfig, *, rounds: int, federated: bool,
                secure_sum: SecureSum | None, seed: int, hooks: RoundHooks, progress: Callable[[str], None]) -> None:
    """Stage 2. Post-processing only: inputs are the DP-trained item embeddings."""
    init = torch.Generator().manual_seed(seed * 7919 + 17)  # public seed: same global init everywhere
    global_init = 0.5 * torch.randn(cfg.n_global, cfg.latent_dim, generator=init)
    bound = float(max(r.data.n_items for r in runs.values()))
    for m, r in runs.items():
        with _seeded(r.generator):
            r.vq = RQVAE(in_dim=cfg.cf_dim, latent_dim=cfg.latent_dim, hidden=cfg.vq_hidden,
                         n_global=cfg.n_global, n_local=cfg.n_local, generator=r.generator)
        r.vq.global_codebook.copy_(global_init)
        r.history["vq_recon"] = []
    ae_names = [n for n, _ in next(iter(runs.values())).vq.named_parameters()]
    if federated:
        # Encoder and decoder start identical (public seed) and are averaged after every round,
        # so the map from the (aligned) CF space to the global codebook is the same everywhere.
        first = next(iter(runs.values())).vq
        for r in runs.values():
            r.vq.load_state_dict(first.state_dict())
    inputs = {m: _item_inputs(r) for m, r in runs.items()}
    for rnd in range(rounds):
        stats1 = {}
        for m, r in runs.items():
            x = inputs[m]
            opt = torch.optim.Adam(list(r.vq.encoder.parameters()) + list(r.vq.decoder.parameters()), lr=cfg.vq_lr)
            for _ in range(cfg.vq_epochs):
                perm = torch.randperm(len(x), generator=r.generator)
                for i in range(0, len(x), cfg.batch_size):
                    opt.zero_grad()
                    loss, _ = r.vq(x[perm[i:i + cfg.batch_size]], beta=cfg.beta)
                    loss.backward()
                    opt.step()
            c1, c2, z, r1 = r.vq.codes(x)
            stats1[m] = code_statistics(z, c1, cfg.n_global)
            # Level 2 is local: updated from this market's residual statistics only.
            local_rng = np.random.default_rng([seed, rnd, 2])
            new2, _ = update_codebook(r.vq.local_codebook.numpy().astype(np.float64),
                                      code_statistics(r1, c2, cfg.n_local), decay=cfg.codebook_decay,
                                      dead_threshold=1.0, rng=local_rng)
            r.vq.local_codebook.copy_(torch.from_numpy(new2).float())
            r.history["vq_recon"].append(r.vq.reconstruction_error(x))
        if federated and cfg.share_autoencoder:
            _average_shared(runs, lambda r: r.vq, ae_names, secure_sum, "rqvae-shared", rnd, cfg.shared_bound, hooks)
        if federated:
            vectors = {m: flatten_stats(s) for m, s in stats1.items()}
            # Counts are <= n_items and |z| <= 1 (tanh), so every coordinate is bounded by the
            # largest market's item count: this sizes the masking ring so the sum cannot wrap.
            result = _upload(secure_sum, hooks, "codebook-l1", rnd, vectors,
                             np.full(len(next(iter(vectors.values()))), bound))
            for m, s in result.sums.items():
                total = unflatten_stats(s, cfg.n_global, cfg.latent_dim)
                # Counts are integers by construction; masking/CKKS return them up to a small
                # numerical error, which must not flip a code between live and dead.
                total = CodeStats(np.maximum(np.round(total.counts), 0.0), total.sums)
                _apply_global(runs[m], total, cfg, np.random.default_rng([seed, rnd, 1]))
        else:
            for m, r in runs.items():
                _apply_global(r, stats1[m], cfg, np.random.default_rng([seed, rnd, 1]))
        progress(f"rq-vae round {rnd + 1}/{rounds}")
    for m, r in runs.items():
        c1, c2, _, _ = r.vq.codes(inputs[m])
        r.codes = (c1, c2)


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
def _predict(model: DeepFM, x: torch.Tensor) -> np.ndarray:
    model.eval()
    out = torch.sigmoid(model(x)).numpy()
    model.train()
    return out


def evaluate_ctr(y: np.ndarray, p: np.ndarray) -> dict:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"auc": auc, "logloss": logloss}


def train_ctr(runs: dict[str, MarketRun], cfg: ModelConfig, *, rounds: int, with_codes: bool, federated: bool,
              secure_sum: SecureSum | None, trainers: TrainerFactory, hooks: RoundHooks,
              progress: Callable[[str], None]) -> None:
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr)
    for m, r in runs.items():
        with _seeded(r.generator):
            r.ctr = DeepFM(fields=_ctr_fields(r, cfg, with_codes), dim=cfg.ctr_dim, hidden=tuple(cfg.ctr_hidden))
        r.history["valid_auc"] = []
    first = next(iter(runs.values())).ctr
    # Shared in FedMM: what has the same meaning in every market (level-1 code embeddings and,
    # optionally, the interaction network on top of the field embeddings); never ID embeddings.
    shared = [n for n, _ in first.named_parameters()
              if "code1" in n or (cfg.share_ctr_mlp and n.startswith("mlp."))]
    if federated:
        init = {k: v.clone() for k, v in first.state_dict().items() if k in shared}
        for r in runs.values():
            r.ctr.load_state_dict(init, strict=False)
    best: dict[str, tuple[float, dict]] = {}
    for rnd in range(rounds):
        allowed = hooks.before_round("ctr", rnd, list(runs))
        for m, r in runs.items():
            if m not in allowed:
                continue
            x = _ctr_inputs(r, r.data.train, with_codes)
            y = torch.from_numpy(r.data.train.click)

            def loss(model, idx, x=x, y=y):
                return F.binary_cross_entropy_with_logits(model(x[idx]), y[idx], reduction="none")

            trainers(market=m, stage="ctr", model=r.ctr, loss_fn=loss, n_records=len(x),
                     users=torch.from_numpy(r.data.train.users), settings=settings,
                     generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("ctr", rnd)
        # Model selection on the market's own validation split (a local decision that changes no
        # upload): each market keeps whichever it validates best of its locally trained model and
        # the model right after averaging, so personalisation is used only where it helps.
        def select() -> None:
            for m, r in runs.items():
                v = evaluate_ctr(r.data.valid.click, _predict(r.ctr, _ctr_inputs(r, r.data.valid, with_codes)))["auc"]
                r.history["valid_auc"].append(v)
                if m not in best or v > best[m][0]:
                    best[m] = (v, {k: t.clone() for k, t in r.ctr.state_dict().items()})

        select()
        if federated:
            _average_shared(runs, lambda r: r.ctr, shared, secure_sum, "ctr-code1", rnd, cfg.shared_bound, hooks)
            select()
        progress(f"ctr round {rnd + 1}/{rounds}")
    for m, r in runs.items():
        r.ctr.load_state_dict(best[m][1])


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


def run_method(method: str, markets: Sequence[MarketData], cfg: ModelConfig, *, rounds: int, seed: int,
               secure_sum: SecureSum | None, trainers: TrainerFactory = plain_trainers,
               hooks: RoundHooks | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run one method; returns ``{"markets": {m: metrics}, "codes": {...}}``."""
    if method == "centralized":
        pooled = pool_markets(markets)
        # Non-private by definition (it pools raw data): plain trainers whatever was asked.
        out = run_method("local_codes", [pooled], cfg, rounds=rounds, seed=seed, secure_sum=None,
                         progress=progress)
        return _split_pooled(out, pooled, markets)
    federated = method == "fedmm"
    hooks = hooks or RoundHooks()
    runs = {m.name: MarketRun(m, torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i, m in enumerate(markets)}
    with_codes = method != "local"
    if with_codes:
        train_cf(runs, cfg, rounds=rounds, federated=federated, secure_sum=secure_sum, trainers=trainers,
                 hooks=hooks, progress=progress)
        train_rqvae(runs, cfg, rounds=rounds, federated=federated, secure_sum=secure_sum, seed=seed, hooks=hooks,
                    progress=progress)
    train_ctr(runs, cfg, rounds=rounds, with_codes=with_codes, federated=federated, secure_sum=secure_sum,
              trainers=trainers, hooks=hooks, progress=progress)
    result: dict = {"markets": {}, "runs": runs}
    for m, r in runs.items():
        p = _predict(r.ctr, _ctr_inputs(r, r.data.test, with_codes))
        metrics = evaluate_ctr(r.data.test.click, p)
        if r.data.ranking is not None:
            metrics.update(_ranking_metrics(r, r.data.ranking, with_codes))
        if with_codes:
            metrics["codebook"] = {"level1": _code_metrics(r.codes[0], cfg.n_global),
                                   "level2": _code_metrics(r.codes[1], cfg.n_local)}
            if r.data.item_cluster is not None:
                metrics["nmi_level1"] = float(normalized_mutual_info_score(r.data.item_cluster, r.codes[0]))
            metrics["rqvae_recon"] = r.history["vq_recon"][-1] if r.history.get("vq_recon") else None
        result["markets"][m] = metrics
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


def _split_pooled(out: dict, pooled: MarketData, markets: Sequence[MarketData]) -> dict:
    r = out["runs"]["pooled"]
    io = pooled.meta["item_offsets"]
    uo = pooled.meta["user_offsets"]
    res: dict = {"markets": {}, "runs": out["runs"]}
    for i, m in enumerate(markets):
        shifted = MarketSplit(m.test.users + uo[i], m.test.items + io[i], m.test.click, m.test.conversion)
        p = _predict(r.ctr, _ctr_inputs(r, shifted, True))
        metrics = evaluate_ctr(m.test.click, p)
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
