"""The one-budget FedMM design: one DP-trained CTR model per market; codes are its post-processing.

Why: with a separate CF stage, a private FedMM market split its epsilon between CF embeddings
(mostly noise under DP) and the CTR model, while ``local`` spent it all on the CTR model, and
codes built on unanchored CF spaces aligned nothing across markets (same product, same code at
chance rate). Here every method of the family trains exactly one model on raw rows, the CTR
model, under one accountant event stream per market (the same plan as ``local``), and everything
else is computed from DP-trained parameters:

* **fields**: user id, item id, public item attributes and the market's user attributes (every
  method gets them, ``local`` included), and for the shared-space methods a **key** field:
  the row of the item's public catalogue key in a shared-key table (products listed by several
  markets), or for products only this market lists, one "listed only here" row; code methods
  add the item's **level-1** (global) code and its **level-2** (local) code as fields
  (``model.code_use: key`` instead puts the level-1 code rows in the key table, after the key
  rows, for products only this market lists);
* **sharing** (``fedavg``, ``fedmm``): after each round the shared-key table is averaged row by
  row over the markets listing each row (:mod:`..catalogue`), and the attribute tables, the
  level-1 code table and the interaction MLP by FedAvg; all through the secure sum, all
  post-processing (no epsilon);
* **codes** (``local_codes``, ``fedmm``): after round ``code_round`` the item representations of
  the CTR model (item row + key row + attribute rows) go through the RQ-VAE of :mod:`.stages`
  (shared encoder and global level-1 codebook in ``fedmm``, local level-2 codebook); same-key
  items have identical inputs in every market, so they get the same level-1 code by
  construction. Post-processing: no raw row is read.

**Served model**: a federated round leaves two models, the locally trained one and the one
right after averaging. Under DP the market serves the mean of the last round's two models'
logits (``model.serve: ensemble``; measured above the noisy choice between them on every XMRec
market, bench/RESULTS_fedmm_dp.md): nothing is compared, so no validation row is read for it.
Without DP the model selection (:mod:`.selection`) keeps the best by validation AUC of every
round's two models and their ensemble. ``serve: select``: the two models compete on their own.

Methods: ``local`` (no key field, no codes), ``local_codes`` (codes, nothing shared),
``fedavg`` (shared keys + FedAvg, no codes), ``fedmm`` (both).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ModelConfig
from ...models.ensemble import LogitMean
from ...models.registry import create_ctr_model
from ...privacy.validation import unit_index
from ..catalogue import apply_keyed_sum, count_weights, key_counts, keyed_upload
from ..hooks import RoundHooks
from ..training import TrainerFactory, TrainSettings, seeded
from .evaluation import predict
from .features import MarketRun, ctr_fields, ctr_inputs
from .protocol import Barrier, BroadcastRequest, Pipeline, PublicMeta, state_from_bytes, state_to_bytes
from .selection import ModelSelector
from .stages import average_shared, rqvae_stage, secure_request

__all__ = ["JOINT_METHODS", "joint_stage", "item_representations"]

JOINT_METHODS = ("local", "local_codes", "fedavg", "fedmm")
# Clip of every coordinate of a code input before its statistics are summed (sizes the ring).
_INPUT_BOUND = 4.0
KEY_COUNTS = "key-counts"   # ledger stage label of the per-product count release


def _columns(r: MarketRun, cfg: ModelConfig, *, keyed: bool, with_codes: bool, meta: PublicMeta) -> None:
    d = r.data
    cols: list[tuple[str, str, np.ndarray, int]] = [("user", "user", np.arange(d.n_users), d.n_users),
                                                    ("item", "item", np.arange(d.n_items), d.n_items)]
    if d.item_features is not None:
        cols += [(f"iattr{f}", "item", d.item_features[:, f], int(c)) for f, c in enumerate(d.item_feature_cards)]
    if d.user_features is not None:
        cols += [(f"uattr{f}", "user", d.user_features[:, f], int(c)) for f, c in enumerate(d.user_feature_cards)]
    if keyed or with_codes:
        cat = meta.catalogue if keyed else None
        n_shared = len(cat.shared_keys) if cat is not None else 0
        key = (cat.key_column(d.item_keys) if cat is not None and d.item_keys is not None
               else np.full(d.n_items, n_shared, dtype=np.int64))
        r.history["n_shared_rows"] = n_shared
        code_rows = cfg.n_global if with_codes and cfg.code_use == "key" else 0
        cols.append(("key", "item", key, n_shared + 1 + code_rows))
    if with_codes and cfg.code_use == "field":
        # Row 0 for every item until codes exist (then it is just an item bias).
        cols.append(("code1", "item", np.zeros(d.n_items, dtype=np.int64), cfg.n_global))
    if with_codes:
        cols.append(("code2", "item", np.zeros(d.n_items, dtype=np.int64), cfg.n_local))
    r.columns = cols


def _column(r: MarketRun, name: str) -> np.ndarray:
    return next(c for n, _, c, _ in r.columns if n == name)


def _set_column(r: MarketRun, name: str, values: np.ndarray) -> None:
    r.columns = [(n, side, values if n == name else c, card) for n, side, c, card in r.columns]


@torch.no_grad()
def item_representations(r: MarketRun) -> torch.Tensor:
    """Every item's vector in the CTR model's own embedding space (where the FM term pairs it
    with a user): its public attribute rows plus, for a product several markets list, its
    shared-key row, else its own (private) item row. Shared-key items thus have the same input
    in every market after averaging, and the same level-1 code by construction; their private
    item rows stay market nuance the CTR model keeps beside the codes."""
    emb = r.ctr.embeddings
    x = emb["item"].weight.detach().clone()
    key = _column(r, "key") if any(n == "key" for n, *_ in r.columns) else None
    if key is not None:
        shared = key < r.history.get("n_shared_rows", 0)
        x[torch.from_numpy(shared)] = emb["key"].weight.detach()[torch.from_numpy(key[shared])]
    for n, side, col, _ in r.columns:
        if side == "item" and n.startswith("iattr"):
            x += emb[n].weight.detach()[torch.from_numpy(col)]
    return x.float()


def _code_inputs(r: MarketRun, meta: PublicMeta, hooks: RoundHooks, rnd: int, federated: bool) -> Pipeline:
    """Standardised item representations; in federated methods the mean and variance come from
    the secure sum of every market's (sum, sum of squares, count), so that identical rows in
    two markets stay identical after standardising."""
    x = item_representations(r).double().clamp(-_INPUT_BOUND, _INPUT_BOUND)
    n, dim = x.shape
    stats = np.concatenate([x.sum(0).numpy(), (x * x).sum(0).numpy(), [float(n)]])
    if federated:
        bounds = np.concatenate([np.full(dim, _INPUT_BOUND * meta.n_items_max),
                                 np.full(dim, _INPUT_BOUND ** 2 * meta.n_items_max), [float(meta.n_items_max)]])
        total = yield secure_request(hooks, r.data.name, "code-input-stats", rnd, stats, bounds)
        stats = stats if total is None else total
    count = max(stats[-1], 1.0)
    mean = stats[:dim] / count
    std = np.sqrt(np.maximum(stats[dim:2 * dim] / count - mean ** 2, 1e-12))
    return ((x - torch.from_numpy(mean)) / torch.from_numpy(std)).float()


def _count_weights(r: MarketRun, hooks: RoundHooks) -> np.ndarray | None:
    """This market's weight of every shared product's row from its training interactions with
    the product (``model.key_weights: counts``, :mod:`..catalogue`): one Gaussian release of
    sensitivity 1 under DP, on the market's ledger before the noise is drawn. None: the budget
    refused it, and the size weight is used."""
    n_shared = r.history["n_shared_rows"]
    access = hooks.validation_access(r.data.name, KEY_COUNTS, 1)
    if access.mode == "refused":
        r.history["key_weights"] = "size (count release refused)"
        return None
    train = r.data.train
    unit, n_units = unit_index(train, access.unit)
    counts = key_counts(_column(r, "key")[train.items], train.click, unit, n_units, n_shared)
    if access.mode == "private":
        counts = counts + access.noise(n_shared, 1.0)
    r.history["key_weights"] = "counts"
    return count_weights(counts)


def _average_keys(r: MarketRun, meta: PublicMeta, hooks: RoundHooks, rnd: int, bound: float,
                  shared_weights: np.ndarray | None = None) -> Pipeline:
    """Row-wise average of the shared-key table (embedding and first-order weight together)
    over the markets that use each row; shared products' rows weighted by ``shared_weights``
    when given, every other row (and every row otherwise) by the market's training-set size."""
    emb, lin = r.ctr.embeddings["key"].weight, r.ctr.linear["key"].weight
    table = np.clip(torch.cat([emb, lin], dim=1).detach().double().numpy(), -bound, bound)
    listed = np.zeros(table.shape[0])
    listed[np.unique(_column(r, "key"))] = 1.0
    w = np.full(table.shape[0], len(r.data.train) / meta.n_train_max)
    if shared_weights is not None:
        w[:len(shared_weights)] = shared_weights
    vec = keyed_upload(table, listed, w)
    bounds = np.concatenate([np.full(table.size, bound), np.ones(table.shape[0])])
    total = yield secure_request(hooks, r.data.name, "ctr-keys", rnd, vec, bounds)
    if total is not None:
        new = torch.from_numpy(apply_keyed_sum(table, listed, total)).float()
        with torch.no_grad():
            emb.copy_(new[:, :emb.shape[1]])
            lin.copy_(new[:, emb.shape[1]:])


def joint_stage(r: MarketRun, cfg: ModelConfig, *, method: str, rounds: int, seed: int, meta: PublicMeta,
                trainers: TrainerFactory, hooks: RoundHooks, progress: Callable[[str], None],
                true_level1: bool = False) -> Pipeline:
    """``method`` for one market; the only raw-data stage is ``"ctr"`` (one DP event stream).
    ``true_level1`` (the ``fedmm_oracle`` reference): the true clusters replace the learned
    level-1 codes."""
    if method not in JOINT_METHODS:
        raise ValueError(f"joint_stage runs {', '.join(JOINT_METHODS)}, not {method!r}")
    data, m = r.data, r.data.name
    federated = method in ("fedavg", "fedmm")
    with_codes = method in ("local_codes", "fedmm")
    keyed = meta.catalogue is not None and (federated or method == "local_codes")
    _columns(r, cfg, keyed=keyed, with_codes=with_codes, meta=meta)
    settings = TrainSettings(cfg.ctr_epochs, cfg.batch_size, cfg.ctr_lr, cfg.max_steps_per_epoch)
    with seeded(r.generator):
        r.ctr = create_ctr_model(cfg.ctr_model, fields=ctr_fields(r, cfg, True), dim=cfg.ctr_dim,
                                 hidden=tuple(cfg.ctr_hidden))
    has_key = any(n == "key" for n, *_ in r.columns)
    # FedAvg'd: what means the same in every market (attribute tables, the level-1 code table of
    # the global codebook, the interaction MLP); the key table is averaged row-wise instead; user
    # and item ID tables and the level-2 (local) code table never leave.
    shared = [n for n, _ in r.ctr.named_parameters()
              if (n.startswith(("embeddings.", "linear.")) and n.split(".")[1].startswith(("iattr", "uattr", "code1")))
              or (cfg.share_ctr_mlp and n.startswith("mlp."))]
    if federated:
        mine = {k: v for k, v in r.ctr.state_dict().items()
                if k in shared or (has_key and k.split(".")[1] == "key")}
        first = yield BroadcastRequest("ctr-init", state_to_bytes(mine))
        r.ctr.load_state_dict(state_from_bytes(first), strict=False)
    code_round = min(cfg.code_round, max(rounds - 2, 0))
    selector = ModelSelector(r, hooks, enabled=cfg.select_by_validation)
    # A federated round's candidate: its two models' logit mean, or each model on its own.
    pair = federated and cfg.serve == "ensemble"
    # Released once, at the first average (between rounds, as every release from raw rows).
    count_release = federated and has_key and cfg.key_weights == "counts" and r.history["n_shared_rows"] > 0
    shared_weights: np.ndarray | None = None
    local_state: dict[str, torch.Tensor] | None = None   # a federated round's locally trained model
    users_t = torch.from_numpy(data.train.users)
    y = torch.from_numpy(data.train.click)
    for rnd in range(rounds):
        # Inputs are rebuilt each round: code columns change once, after ``code_round``.
        xs = ctr_inputs(r, data.train, True)

        def loss(model: torch.nn.Module, idx: torch.Tensor, xs: torch.Tensor = xs) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(model(xs[idx]), y[idx], reduction="none")

        if m in hooks.before_round("ctr", rnd, [m]):
            trainers(market=m, stage="ctr", model=r.ctr, loss_fn=loss, n_records=len(xs), users=users_t,
                     settings=settings, generator=r.generator).train_epochs(settings.epochs)
        hooks.before_release("ctr", rnd)
        yield Barrier("ctr", rnd)
        x_valid = ctr_inputs(r, data.valid, True)
        # Model selection on the market's own validation split (only the served model depends
        # on it), between the locally trained model, the one right after averaging and (pair)
        # their ensemble; under DP each comparison is a noisy, accounted release (.selection),
        # so a pair is offered as its ensemble alone, and nothing is compared.
        final = rnd == rounds - 1
        selector.start_round(final=final)
        for phase in ("local", "averaged") if federated else ("local",):
            if phase == "averaged":
                if has_key:
                    if count_release:
                        shared_weights, count_release = _count_weights(r, hooks), False
                    yield from _average_keys(r, meta, hooks, rnd, cfg.shared_bound, shared_weights)
                if shared:
                    yield from average_shared(r, r.ctr, shared, meta, "ctr-shared", rnd, cfg.shared_bound, hooks)
            # Copies only of what may be kept or served: a pair's local half when this round is
            # scored or is the last; any model only when the selector keeps it.
            if pair and phase == "local" and (selector.looking or final):
                local_state = _state(r.ctr)
            if not pair or selector.exact:
                selector.consider(lambda: predict(r.ctr, x_valid), lambda: ([_state(r.ctr)], list(r.columns)))
            if pair and phase == "averaged":
                selector.consider(lambda: predict(_ensemble(r.ctr, local_state), x_valid),
                                  lambda: ([local_state, _state(r.ctr)], list(r.columns)))
        # Every market's comparisons are on its ledger before any market opens another round.
        yield Barrier("ctr-select", rnd)
        if with_codes and rnd == code_round:
            x = yield from _code_inputs(r, meta, hooks, rnd, federated)
            yield from rqvae_stage(r, cfg, rounds=cfg.vq_rounds, federated=federated, seed=seed, meta=meta,
                                   hooks=hooks, progress=progress, inputs=x)
            c1, c2, _, _ = r.vq.codes(x)
            if true_level1:
                c1 = np.asarray(data.item_cluster, dtype=np.int64)
            r.codes = (c1, c2)
            if rnd < rounds - 1:
                if cfg.code_use == "key":
                    # Unshared items move from the placeholder row to their level-1 code's row.
                    n_shared = r.history["n_shared_rows"]
                    key = _column(r, "key")
                    _set_column(r, "key", np.where(key >= n_shared, n_shared + 1 + c1, key))
                else:
                    _set_column(r, "code1", c1)
                _set_column(r, "code2", c2)
        progress(f"ctr round {rnd + 1}/{rounds}")
    kept = selector.kept()
    if kept is not None:
        states, r.columns = kept
        if len(states) == 1:
            r.ctr.load_state_dict(states[0])
        else:
            local, averaged = states
            r.ctr.load_state_dict(averaged)
            r.ctr = _ensemble(r.ctr, local)
    elif pair:   # selection off or never scored: the final round's ensemble
        r.ctr = _ensemble(r.ctr, local_state)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in model.state_dict().items()}


def _ensemble(averaged: torch.nn.Module, local_state: dict[str, torch.Tensor] | None) -> LogitMean:
    """The logit mean of ``averaged`` and a copy of it holding ``local_state`` (``model.serve:
    ensemble``: a round's locally trained and averaged models)."""
    assert local_state is not None, "the pair's local half is copied whenever it can be served"
    local = copy.deepcopy(averaged)
    local.load_state_dict(local_state)
    return LogitMean([local, averaged])
