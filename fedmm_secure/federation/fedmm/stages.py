"""The three stages of a FedMM-family method, for one market, as sub-coroutines.

Each stage trains or updates one model of :class:`~.features.MarketRun` and yields the
requests of :mod:`.protocol` whenever something must be shared; :func:`~.pipeline.market_pipeline`
chains them. Everything that leaves a market goes through :func:`secure_request`: clipped to public
bounds, then optionally noised by the market itself.

1. :func:`cf_stage` -- CF embeddings (reads raw clicks: a DP step when privacy is on); shared
   side-feature tables averaged between rounds in FedMM.
2. :func:`rqvae_stage` -- RQ-VAE on the item embeddings (post-processing: costs no epsilon);
   global level-1 codebook from summed code statistics, local level-2 codebook.
3. :func:`ctr_stage` -- the CTR model (reads raw clicks); level-1 code embeddings (and optionally
   the MLP) averaged in FedMM, with local model selection on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ModelConfig
from ...models.cf import CFModel
from ...models.codebook import CodeStats, code_statistics, flatten_stats, unflatten_stats, update_codebook
from ...models.registry import create_ctr_model
from ...models.rqvae import RQVAE
from ..hooks import RoundHooks
from ..training import TrainerFactory, TrainSettings, seeded
from .evaluation import predict
from .features import MarketRun, ctr_fields, ctr_inputs, flat_params, item_inputs, load_flat, split_tensors
from .protocol import Barrier, BroadcastRequest, Pipeline, PublicMeta, SumRequest, state_from_bytes, state_to_bytes
from .selection import ModelSelector

__all__ = ["cf_stage", "rqvae_stage", "ctr_stage", "secure_request", "average_shared"]


def secure_request(hooks: RoundHooks, m: str, label: str, rnd: int, vec: np.ndarray, bounds: np.ndarray) -> SumRequest:
    # Everything that leaves a market goes through here: clipped to the public bounds, then
    # (optionally) noised by the market itself; the ring is sized for the noisy bounds.
    noisy = hooks.perturb_upload(label, rnd, m, np.clip(vec, -bounds, bounds), bounds)
    return SumRequest(label, rnd, noisy, hooks.upload_bounds(label, bounds))


def average_shared(r: MarketRun, module: torch.nn.Module, names: Sequence[str], meta: PublicMeta, label: str,
                    rnd: int, bound: float, hooks: RoundHooks) -> Pipeline:
    """FedAvg of the shared parameters, weighted by training rows, through one secure sum.

    The market uploads ``[w * theta, w]`` with ``w = n_train / n_max`` in (0, 1]; the sum gives
    the weighted average without revealing any market's parameters or weight. Market sizes are
    treated as public metadata, as DP-SGD already does when it sets the sample rate from them.
    """
    w = len(r.data.train) / meta.n_train_max
    theta = np.clip(flat_params(module, names), -bound, bound)
    vec = np.concatenate([w * theta, [w]])
    bounds = np.concatenate([np.full(len(vec) - 1, bound), [1.0]])
    s = yield secure_request(hooks, r.data.name, label, rnd, vec, bounds)
    if s is not None:
        # With market-level noise the summed weight is noisy too; it stays near the true
        # total, but guard against a pathological draw.
        load_flat(module, names, s[:-1] / max(s[-1], 1e-3))


def _apply_global(r: MarketRun, stats: CodeStats, cfg: ModelConfig, rng: np.random.Generator) -> None:
    new, _ = update_codebook(r.vq.global_codebook.numpy().astype(np.float64), stats, decay=cfg.codebook_decay,
                             dead_threshold=1.0, rng=rng)
    r.vq.global_codebook.copy_(torch.from_numpy(new).float())


# ----------------------------------------------------------------------------- stage 1: CF
def cf_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, federated: bool, meta: PublicMeta,
             trainers: TrainerFactory, hooks: RoundHooks, progress: Callable[[str], None]) -> Pipeline:
    data, m = r.data, r.data.name
    settings = TrainSettings(cfg.cf_epochs, cfg.batch_size, cfg.cf_lr, cfg.max_steps_per_epoch)
    feats = torch.from_numpy(data.item_features if data.item_features is not None
                             else np.zeros((data.n_items, 0), dtype=np.int64))
    with seeded(r.generator):
        r.cf = CFModel(n_users=data.n_users, n_items=data.n_items, dim=cfg.cf_dim,
                       item_feature_cards=tuple(data.item_feature_cards), item_features=feats)
    if federated:
        # Shared tables start identical in every market (the first market's), as in FedAvg.
        mine = {k: v for k, v in r.cf.state_dict().items() if k.startswith("attrs.")}
        first = yield BroadcastRequest("cf-init", state_to_bytes(mine))
        r.cf.load_state_dict(state_from_bytes(first), strict=False)
    names = r.cf.shared_parameter_names()
    users, items, click = split_tensors(data.train)

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
            yield from average_shared(r, r.cf, names, meta, "cf-shared", rnd, cfg.shared_bound, hooks)
        progress(f"cf round {rnd + 1}/{rounds}")


# ----------------------------------------------------------------------------- stage 2: RQ-VAE
def rqvae_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, federated: bool, seed: int, meta: PublicMeta,
                hooks: RoundHooks, progress: Callable[[str], None], inputs: torch.Tensor | None = None) -> Pipeline:
    """Post-processing only: inputs are DP-trained item representations (the CF stage's item
    embeddings, or ``inputs`` when the caller derived them from another DP-trained model)."""
    init = torch.Generator().manual_seed(seed * 7919 + 17)  # public seed: same global init everywhere
    global_init = 0.5 * torch.randn(cfg.n_global, cfg.latent_dim, generator=init)
    bound = float(meta.n_items_max)
    with seeded(r.generator):
        r.vq = RQVAE(in_dim=cfg.cf_dim if inputs is None else int(inputs.shape[1]), latent_dim=cfg.latent_dim, hidden=cfg.vq_hidden,
                     n_global=cfg.n_global, n_local=cfg.n_local, generator=r.generator)
    r.vq.global_codebook.copy_(global_init)
    r.history["vq_recon"] = []
    ae_names = [n for n, _ in r.vq.named_parameters()]
    if federated:
        # Encoder and decoder start identical and are averaged after every round, so the map
        # from the (aligned) CF space to the global codebook is the same everywhere.
        first = yield BroadcastRequest("rqvae-init", state_to_bytes(r.vq.state_dict()))
        r.vq.load_state_dict(state_from_bytes(first))
    x = item_inputs(r) if inputs is None else inputs
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
                yield from average_shared(r, r.vq, ae_names, meta, "rqvae-shared", rnd, cfg.shared_bound, hooks)
            # Counts are <= n_items and |z| <= 1 (tanh), so every coordinate is bounded by the
            # largest market's item count: this sizes the masking ring so the sum cannot wrap.
            flat = flatten_stats(stats1)
            s = yield secure_request(hooks, r.data.name, "codebook-l1", rnd, flat, np.full(len(flat), bound))
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
def ctr_stage(r: MarketRun, cfg: ModelConfig, *, rounds: int, with_codes: bool, federated: bool,
              meta: PublicMeta, trainers: TrainerFactory, hooks: RoundHooks,
              progress: Callable[[str], None]) -> Pipeline:
    data, m = r.data, r.data.name
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr, cfg.max_steps_per_epoch)
    with seeded(r.generator):
        r.ctr = create_ctr_model(cfg.ctr_model, fields=ctr_fields(r, cfg, with_codes), dim=cfg.ctr_dim,
                                 hidden=tuple(cfg.ctr_hidden))
    # Shared in FedMM: what has the same meaning in every market (level-1 code embeddings and,
    # optionally, the interaction network on top of the field embeddings); never ID embeddings.
    shared = [n for n, _ in r.ctr.named_parameters()
              if "code1" in n or (cfg.share_ctr_mlp and n.startswith("mlp."))]
    if federated:
        mine = {k: v for k, v in r.ctr.state_dict().items() if k in shared}
        first = yield BroadcastRequest("ctr-init", state_to_bytes(mine))
        r.ctr.load_state_dict(state_from_bytes(first), strict=False)
    selector = ModelSelector(r, hooks, enabled=cfg.select_by_validation)
    # The inputs do not change between rounds (codes are fixed after stage 2).
    xs, y = ctr_inputs(r, data.train, with_codes), torch.from_numpy(data.train.click)
    x_valid = ctr_inputs(r, data.valid, with_codes)

    def loss(model, idx):
        return F.binary_cross_entropy_with_logits(model(xs[idx]), y[idx], reduction="none")

    for rnd in range(rounds):
        if m in hooks.before_round("ctr", rnd, [m]):
            trainers(market=m, stage="ctr", model=r.ctr, loss_fn=loss, n_records=len(xs),
                     users=torch.from_numpy(data.train.users), settings=settings,
                     generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("ctr", rnd)
        yield Barrier("ctr", rnd)
        # Model selection on the market's own validation split: the market keeps whichever it
        # validates best of its locally trained model and the model right after averaging (over
        # every round without DP; the last round's pair under DP), so personalisation is used
        # only where it helps. Only the served model depends on it (training goes on from the
        # current model); under DP each comparison is a noisy, accounted release (.selection).
        selector.start_round(final=rnd == rounds - 1)
        for phase in ("local", "averaged") if federated else ("local",):
            if phase == "averaged":
                yield from average_shared(r, r.ctr, shared, meta, "ctr-code1", rnd, cfg.shared_bound, hooks)
            selector.consider(lambda: predict(r.ctr, x_valid),
                              lambda: {k: t.clone() for k, t in r.ctr.state_dict().items()})
        # Every market's comparisons of this round are on its ledger before any market opens the
        # next training round (a ledger round is one market's release, never inside another).
        yield Barrier("ctr-select", rnd)
        progress(f"ctr round {rnd + 1}/{rounds}")
    kept = selector.kept()
    if kept is not None:
        r.ctr.load_state_dict(kept)
