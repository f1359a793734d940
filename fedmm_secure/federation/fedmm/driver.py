"""Drivers: every market's FedMM pipeline in this process, and one method end to end.

:func:`drive_in_process` answers the pipelines' requests (:mod:`.protocol`) as a distributed
deployment answers them, in lockstep; :func:`run_pipelines` builds every market's pipeline and
drives them; :func:`run_method` runs one method (``centralized`` pools the markets first) and
adds the cross-market evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from ...config import ModelConfig
from ...data.market import MarketData, MarketSplit
from ...errors import ConfigError
from ...privacy.validation import ValidationAccess
from ..catalogue import PublicCatalogue
from ..hooks import RoundHooks
from ..training import TrainerFactory, plain_trainers
from ..transport import SecureSum
from .evaluation import code_alignment, split_pooled
from .finetune import finetune_pooled
from .pipeline import market_pipeline
from .protocol import Barrier, BroadcastRequest, PublicMeta, SumRequest

__all__ = ["drive_in_process", "run_pipelines", "run_method", "pool_markets", "public_catalogue",
           "check_reference"]


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

    def validation_access(self, market: str, purpose: str, releases: int = 1) -> ValidationAccess:
        return self.inner.validation_access(market, purpose, releases)

    @property
    def validation_accounted(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "validation_accounted", False))

    def perturb_upload(self, label: str, rnd: int, market: str, vector: np.ndarray,
                       bounds: np.ndarray) -> np.ndarray:
        return self.inner.perturb_upload(label, rnd, market, vector, bounds)


def drive_in_process(pipelines: dict, secure_sum: SecureSum | None) -> dict[str, dict]:
    """Run every market's pipeline in this process, in lockstep; returns each one's result.

    Requests are answered as a distributed deployment answers them: a broadcast relays the
    first market's payload, a sum request goes to ``secure_sum`` with every market's vector,
    a barrier resumes everyone once all markets reached it.
    """
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
                  codes_only: bool = False, catalogue: PublicCatalogue | None = None,
                  true_level1: bool = False) -> dict[str, dict]:
    """Every market's :func:`~.pipeline.market_pipeline` for ``method``, driven in process.

    ``catalogue``: the public shared keys (default: built from the markets' public listings for
    the sharing methods ``fedavg`` and ``fedmm``, when every market has item keys).
    ``true_level1``: the ``fedmm_oracle`` reference (level-1 codes = true clusters)."""
    names = [m.name for m in markets]
    if catalogue is None and method in ("fedavg", "fedmm"):
        catalogue = public_catalogue(markets)
    shared = _SharedHooks(hooks or RoundHooks(), names)
    n_train_max = max(len(m.train) for m in markets)
    n_items_max = max(m.n_items for m in markets)
    pipes = {m.name: market_pipeline(m, cfg, method=method, rounds=rounds, seed=seed,
                                     meta=PublicMeta(index=i, n_train_max=n_train_max, n_items_max=n_items_max,
                                                     catalogue=catalogue),
                                     trainers=trainers, hooks=shared, codes_only=codes_only,
                                     true_level1=true_level1,
                                     # one progress line per round, not one per market
                                     progress=progress if i == 0 else (lambda s: None))
             for i, m in enumerate(markets)}
    return drive_in_process(pipes, secure_sum)


def check_reference(method: str, markets: Sequence[MarketData], cfg: ModelConfig) -> int:
    """The number of true clusters a reference ``method`` (``oracle``, ``fedmm_oracle``) reads
    from ``markets``; ConfigError when it cannot run on them with ``cfg`` (no ground truth,
    ``fedmm_oracle`` with fewer level-1 codes than clusters or outside the joint design).
    A run checks every reference before it writes anything."""
    if any(m.item_cluster is None for m in markets):
        raise ConfigError("methods", f"{method} needs ground-truth clusters", allowed="synthetic data")
    k = int(max(m.item_cluster.max() for m in markets)) + 1
    if method == "fedmm_oracle":
        if k > cfg.n_global:
            raise ConfigError("model.n_global", f"fedmm_oracle needs n_global >= the {k} true clusters")
        if cfg.design != "joint":
            raise ConfigError("model.design", "fedmm_oracle exists in the joint design only", allowed="joint")
    return k


def run_method(method: str, markets: Sequence[MarketData], cfg: ModelConfig, *, rounds: int, seed: int,
               secure_sum: SecureSum | None, trainers: TrainerFactory = plain_trainers,
               hooks: RoundHooks | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run one method; returns ``{"markets": {m: metrics}, "runs": {m: MarketRun}, ...}``."""
    if method == "oracle":
        # Reference, not a method: `local` given every item's true shared cluster as one more
        # item attribute (the codes a perfect aligner would produce). Synthetic data only.
        k = check_reference(method, markets, cfg)
        with_truth = [dataclasses.replace(
            m, item_features=np.column_stack([m.item_features, m.item_cluster]) if m.item_features is not None
            else m.item_cluster[:, None], item_feature_cards=tuple(m.item_feature_cards) + (k,)) for m in markets]
        return run_method("local", with_truth, cfg, rounds=rounds, seed=seed, secure_sum=None, trainers=trainers,
                          hooks=hooks, progress=progress)
    true_level1 = method == "fedmm_oracle"
    if true_level1:
        # Reference, not a method: `fedmm` with every item's true shared cluster as its level-1
        # code (perfect, perfectly aligned codes; everything else as `fedmm`), i.e. what the
        # codes could be worth to FedMM. Synthetic data only.
        check_reference(method, markets, cfg)
        method = "fedmm"
    if method == "centralized":
        pooled = pool_markets(markets, market_field=cfg.design == "joint")
        # Non-private by definition (it pools raw data): plain trainers whatever was asked. In
        # the joint design it is a real upper bound: one model over every market's rows with a
        # market field, same-key products linked through the key field, codes.
        cat = public_catalogue(markets) if cfg.design == "joint" else None
        if cat is not None:
            pooled = dataclasses.replace(pooled, item_keys=np.concatenate([m.item_keys for m in markets]))
        outs = run_pipelines("local_codes", [pooled], cfg, rounds=rounds, seed=seed, secure_sum=None,
                             progress=progress, catalogue=cat)
        run = outs["pooled"]["run"]
        out = {"markets": {"pooled": outs["pooled"]["metrics"]}, "runs": {"pooled": run}}
        # Each market then fine-tunes the pooled model on its own rows and keeps, by its own
        # validation AUC, the pooled model or a fine-tuned state (one pooled model alone
        # under-fits market differences). Still non-private: plain trainers, raw rows.
        tuned = finetune_pooled(run, markets, cfg, rounds=rounds, seed=seed)
        run.history["finetune"] = {m: {"chosen": t.chosen, "valid_auc": t.valid_auc} for m, t in tuned.items()}
        return split_pooled(out, pooled, markets, calibrate=cfg.calibrate,
                            models={m: t.model for m, t in tuned.items()})
    outs = run_pipelines(method, markets, cfg, rounds=rounds, seed=seed, secure_sum=secure_sum,
                         trainers=trainers, hooks=hooks, progress=progress, true_level1=true_level1)
    runs = {m.name: outs[m.name]["run"] for m in markets}
    result: dict = {"markets": {m: outs[m]["metrics"] for m in runs}, "runs": runs}
    with_codes = all(r.codes is not None for r in runs.values())
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


def public_catalogue(markets: Sequence[MarketData]) -> PublicCatalogue | None:
    """Shared public keys of ``markets`` (their catalogues are public); None without keys."""
    if len(markets) < 2 or any(m.item_keys is None for m in markets):
        return None
    return PublicCatalogue.from_listings({m.name: m.item_keys for m in markets})


def pool_markets(markets: Sequence[MarketData], *, market_field: bool = False) -> MarketData:
    """All markets as one (for the non-private ``centralized`` upper bound): IDs are offset so
    they stay distinct; a pooled model sees every market's raw data. ``market_field`` adds the
    user's market as a user attribute (every user belongs to one market)."""
    uo = np.cumsum([0] + [m.n_users for m in markets])
    io = np.cumsum([0] + [m.n_items for m in markets])

    def cat(split_name: str) -> MarketSplit:
        parts = [getattr(m, split_name) for m in markets]
        return MarketSplit(np.concatenate([p.users + uo[i] for i, p in enumerate(parts)]),
                           np.concatenate([p.items + io[i] for i, p in enumerate(parts)]),
                           np.concatenate([p.click for p in parts]),
                           np.concatenate([p.conversion for p in parts]))

    has_feats = all(m.item_features is not None for m in markets)
    user_feats, user_cards = None, ()
    if market_field:
        mk = np.concatenate([np.full(m.n_users, i, dtype=np.int64) for i, m in enumerate(markets)])
        if all(m.user_features is not None for m in markets):
            user_feats = np.column_stack([np.concatenate([m.user_features for m in markets]), mk])
            user_cards = tuple(np.max([m.user_feature_cards for m in markets], axis=0)) + (len(markets),)
        else:
            user_feats, user_cards = mk[:, None], (len(markets),)
    return MarketData(
        user_features=user_feats, user_feature_cards=tuple(int(c) for c in user_cards),
        name="pooled", n_users=int(uo[-1]), n_items=int(io[-1]),
        train=cat("train"), valid=cat("valid"), test=cat("test"),
        item_features=np.concatenate([m.item_features for m in markets]) if has_feats else None,
        item_feature_cards=tuple(np.max([m.item_feature_cards for m in markets], axis=0)) if has_feats else (),
        item_cluster=(np.concatenate([m.item_cluster for m in markets])
                      if all(m.item_cluster is not None for m in markets) else None),
        meta={"item_offsets": io.tolist(), "user_offsets": uo.tolist()},
    )
